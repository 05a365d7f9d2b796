"""The correlation mixer against the DESIGN formula, attention, causality and its decode cache."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

import leviathan.model.correlation as correlation
from leviathan.model.correlation import CorrelationCache, MultiHeadedCorrelation

C, H = 16, 2
D = C // H
CPU_PATHS = ["shifted_diagonal", "lag_stacked"]


def make(
    window: int, mixer: str = "correlation", seed: int = 0, random_lags: bool = True, path: str | None = None
) -> MultiHeadedCorrelation:
    torch.manual_seed(seed)
    m = MultiHeadedCorrelation(C, H, window, mixer=mixer).double()
    m.force_path = path
    if random_lags and m.lag_weight is not None:
        with torch.no_grad():
            m.lag_weight.copy_(torch.randn(H, window, dtype=torch.float64))
    return m


def heads(m: MultiHeadedCorrelation, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, T, d) from the module's own projection."""
    B, T, _ = x.shape
    q, k, v = m.c_attn(x).split(C, dim=2)
    return tuple(t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))


def naive_correlation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """DESIGN section 2, term by term: an explicit loop over (i, j, u), O(L^2 w).

    score[i, j] = sum_{u<w} a[h,u] * dot(q[i-u], k[j-u]) / sqrt(d), with q, k = 0
    before position 0; out[i] = sum_{j<=i} softmax_j(score[i, :]) v[j].
    """
    B, Hh, T, d = q.shape
    w = a.shape[1]
    out = torch.zeros_like(v)
    for i in range(T):
        row = []
        for j in range(i + 1):
            s = torch.zeros(B, Hh, dtype=q.dtype)
            for u in range(w):
                if i - u >= 0 and j - u >= 0:  # a position before 0 contributes a zero vector
                    s = s + a[:, u] * (q[:, :, i - u] * k[:, :, j - u]).sum(-1)
            row.append(s / math.sqrt(d))
        p = torch.softmax(torch.stack(row, dim=-1), dim=-1)  # (B, H, i+1)
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", p, v[:, :, : i + 1])
    return out


def naive_forward(m: MultiHeadedCorrelation, x: torch.Tensor) -> torch.Tensor:
    q, k, v = heads(m, x)
    y = naive_correlation(q, k, v, m.lag_weight)
    B, T, _ = x.shape
    return m.c_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("mixer", ["correlation", "attention"])
def test_window_one_equals_causal_sdpa(mixer: str) -> None:
    m = make(1, mixer, random_lags=False).float()
    x = torch.randn(3, 11, C)
    q, k, v = heads(m, x)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # default scale 1/sqrt(d)
    ref = m.c_proj(ref.transpose(1, 2).reshape(3, 11, C))
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)


def test_fresh_correlation_equals_attention_twin() -> None:
    """Lag weights start at a = (1, 0, ..., 0): a fresh correlation mixer computes attention."""
    corr = make(4, random_lags=False)
    att = make(4, "attention", random_lags=False)
    att.load_state_dict({k: v for k, v in corr.state_dict().items() if k != "lag_weight"})
    x = torch.randn(2, 9, C, dtype=torch.float64)
    torch.testing.assert_close(corr(x), att(x))
    assert sum(p.numel() for p in corr.parameters()) - sum(p.numel() for p in att.parameters()) == H * 4


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("window", [2, 3, 5])
def test_outputs_and_gradients_match_naive_formula(window: int, path: str) -> None:
    m = make(window, seed=window, path=path)
    x = torch.randn(2, 9, C, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 9, C, dtype=torch.float64)

    fast = m(x)
    g_fast = torch.autograd.grad((fast * target).sum(), [x, *m.parameters()])
    slow = naive_forward(m, x)
    g_slow = torch.autograd.grad((slow * target).sum(), [x, *m.parameters()])

    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-9, msg="outputs differ from the naive formula")
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"gradient of {name} differs")
    assert m.last_path.startswith(path)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_lags_change_the_output(path: str) -> None:
    """Non-zero lag weights must matter (guards against a mixer that ignores them)."""
    m = make(3, path=path)
    x = torch.randn(1, 8, C, dtype=torch.float64)
    y = m(x)
    with torch.no_grad():
        m.lag_weight[:, 1:] = 0
    assert (m(x) - y).abs().max() > 1e-3


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("window", [1, 3, 5])
def test_causal_future_inputs_change_nothing_before(window: int, path: str) -> None:
    m = make(window, path=path)
    T = 12
    x = torch.randn(2, T, C, dtype=torch.float64)
    y = m(x)
    for p in (0, 4, T - 2):
        x2 = x.clone()
        x2[:, p + 1 :] = torch.randn(2, T - p - 1, C, dtype=torch.float64)
        y2 = m(x2)
        torch.testing.assert_close(y2[:, : p + 1], y[:, : p + 1], msg=f"output at <= {p} changed")
        assert (y2[:, p + 1 :] - y[:, p + 1 :]).abs().max() > 1e-6, "later positions must depend on later inputs"


@pytest.mark.parametrize("path", CPU_PATHS)
def test_sequence_start_is_zero_padded(path: str) -> None:
    """Lags reaching before position 0 contribute nothing (q, k = 0 there), not a wrap-around."""
    w = 3
    m = make(w, path=path)
    x = torch.randn(1, 6, C, dtype=torch.float64)
    q, k, v = heads(m, x)
    a = m.lag_weight
    y = m(x)
    dot = lambda i, j: (q[:, :, i] * k[:, :, j]).sum(-1)  # (B, H)  # noqa: E731
    # Position 1: score[1,0] = a0 q1.k0 (the lag-1 term pairs q0 with k[-1] = 0);
    #             score[1,1] = a0 q1.k1 + a1 q0.k0 (the lag-2 term needs q[-1] = 0).
    s10 = a[:, 0] * dot(1, 0)
    s11 = a[:, 0] * dot(1, 1) + a[:, 1] * dot(0, 0)
    p = torch.softmax(torch.stack([s10, s11], -1) / math.sqrt(D), dim=-1)  # (B, H, 2)
    out1 = torch.einsum("bhj,bhjd->bhd", p, v[:, :, :2]).reshape(1, C)
    torch.testing.assert_close(y[:, 1], m.c_proj(out1))
    # Position 0 sees only itself: out[0] = v[0].
    torch.testing.assert_close(y[:, 0], m.c_proj(v[:, :, 0].reshape(1, C)))


@pytest.mark.parametrize("window,mixer", [(1, "correlation"), (4, "correlation"), (4, "attention")])
def test_cached_decoding_equals_full_forward(window: int, mixer: str) -> None:
    m = make(window, mixer)
    T = 13
    x = torch.randn(2, T, C, dtype=torch.float64)
    full = m(x)
    # A 2-token prefill (shorter than the window), then chunks of 1, 3 and 1 tokens.
    cache = CorrelationCache()
    pieces, start = [], 0
    for n in (2, 1, 1, 3, 1, 5):
        pieces.append(m(x[:, start : start + n], cache))
        start += n
        assert cache.length == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, msg="cached decoding differs from the full forward")


def test_constructor_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="n_embd"):
        MultiHeadedCorrelation(10, 3, 2)
    with pytest.raises(ValueError, match="window"):
        MultiHeadedCorrelation(8, 2, 0)
    with pytest.raises(ValueError, match="mixer"):
        MultiHeadedCorrelation(8, 2, 2, mixer="conv")


def profiled_ops(m: MultiHeadedCorrelation, x: torch.Tensor) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m(x).sum().backward()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("window", [1, 4])
def test_no_score_matrix_above_the_measured_length(window: int) -> None:
    """Above the measured length (and always at w = 1) SDPA takes its fused kernel, no L x L scores."""
    m = MultiHeadedCorrelation(C, H, window)
    x = torch.randn(1, correlation.shifted_diagonal_max_len(window) + 1, C)
    ops = profiled_ops(m, x)
    assert any("flash_attention" in op for op in ops), sorted(ops)
    assert "aten::_softmax" not in ops and "aten::bmm" not in ops, "math kernel (L x L scores) was used"
    assert m.last_path.startswith("lag_stacked" if window > 1 else "sdpa")


def test_scores_materialised_up_to_the_measured_length() -> None:
    m = MultiHeadedCorrelation(C, H, 4)
    ops = profiled_ops(m, torch.randn(2, 32, C))
    assert "ShiftedDiagonalCorrelation" in ops and not any("flash_attention" in op for op in ops), sorted(ops)


@pytest.mark.parametrize(
    "device,seq_len,window,triton,dropout,expected",
    [
        ("cpu", 64, 1, None, False, "sdpa"),
        ("cpu", 64, 4, None, False, "shifted_diagonal"),
        ("cpu", correlation.SHIFTED_DIAGONAL_MAX_LEN, 4, None, False, "shifted_diagonal"),
        ("cpu", correlation.SHIFTED_DIAGONAL_MAX_LEN + 1, 8, None, False, "lag_stacked"),
        ("cpu", correlation.SHORT_WINDOW_MAX_LEN, 3, None, False, "shifted_diagonal"),
        ("cpu", correlation.SHORT_WINDOW_MAX_LEN + 1, 2, None, False, "lag_stacked"),
        ("cuda", 4096, 1, True, False, "sdpa"),
        ("cuda", 4096, 4, True, False, "triton"),
        ("cuda", 64, 4, False, False, "lag_stacked"),
        ("cuda", 64, 4, True, True, "lag_stacked"),
    ],
)
def test_path_is_chosen_by_shape_and_device(device, seq_len, window, triton, dropout, expected) -> None:
    assert correlation.mixer_path(device, seq_len, window, triton=triton, dropout=dropout) == expected


def test_path_shows_in_repr_and_is_logged_once_per_shape(caplog: pytest.LogCaptureFixture) -> None:
    m = MultiHeadedCorrelation(C, H, 3)
    assert "path=auto" in repr(m) and f"T={correlation.SHORT_WINDOW_MAX_LEN}," in repr(m)
    with caplog.at_level("INFO", logger="leviathan.model.correlation"):
        for T in (13, 13, 13, 14):
            m(torch.randn(1, T, C))
    records = [r.getMessage() for r in caplog.records]
    assert records == [
        "correlation: shifted_diagonal cpu T=13 H=2 d=8 w=3 torch.float32",
        "correlation: shifted_diagonal cpu T=14 H=2 d=8 w=3 torch.float32",
    ], records
    assert "last_path=shifted_diagonal (T=14, cpu)" in repr(m)
    m.force_path = "lag_stacked"
    m(torch.randn(1, 13, C))
    assert "path=lag_stacked" in repr(m) and "last_path=lag_stacked" in repr(m)
    m.force_path = "flash"
    with pytest.raises(ValueError, match="force_path"):
        m(torch.randn(1, 13, C))


def reference_probabilities(q: torch.Tensor, k: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """softmax of sum_u a_u S[i-u, j-u] (S = q k^T / sqrt(d)), by zero-padded shifts: (B, H, T, T)."""
    T, d = q.shape[-2:]
    s = q @ k.transpose(-2, -1) / math.sqrt(d)
    score = sum(a[:, u].view(1, -1, 1, 1) * F.pad(s, (u, 0, u, 0))[..., :T, :T] for u in range(a.size(1)))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(score.masked_fill(~causal, float("-inf")), dim=-1)


def test_shifted_diagonal_dropout_matches_reference() -> None:
    """Attention dropout on the probabilities: same mask, same outputs and gradients as autograd."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, H, 10, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a = torch.randn(H, 3, generator=g, dtype=torch.float64, requires_grad=True)
    p_drop = 0.3
    torch.manual_seed(11)
    out = correlation.shifted_diagonal(q, k, v, a, 1 / math.sqrt(D), p_drop)
    torch.manual_seed(11)
    keep = torch.empty(2, H, 10, 10, dtype=torch.bool).bernoulli_(1 - p_drop)
    ref = (reference_probabilities(q, k, a) * keep / (1 - p_drop)) @ v
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    for name, x, y in zip("qkva", torch.autograd.grad(out, (q, k, v, a), dout), torch.autograd.grad(ref, (q, k, v, a), dout)):
        torch.testing.assert_close(x, y, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("path", CPU_PATHS)
def test_autocast_keeps_the_activations_dtype(path: str) -> None:
    """Under bf16 autocast the lag weights follow q: no fp32 copy of the stacked queries or scores."""
    m = MultiHeadedCorrelation(C, H, 3)
    m.force_path = path
    x = torch.randn(2, 9, C)
    q = torch.randn(2, H, 9, D).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m._stacked_queries(q, None).dtype == torch.bfloat16
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.lag_weight.grad.dtype == torch.float32 and m.lag_weight.grad.abs().sum() > 0
    torch.testing.assert_close(y.float(), m(x), atol=0.05, rtol=0.05)


def test_sdpa_backend_fallback_is_explicit_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The CUDA backend chooser, run on CPU: the memory-efficient kernel is not there, so MATH runs."""
    from torch.nn.attention import SDPBackend

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, H, 7, 3 * D, generator=g) for _ in range(2))
    v = torch.randn(2, H, 7, D, generator=g)
    backends = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
    ref = correlation.sdpa(q, k, v, is_causal=True, scale=0.3)  # CPU: zero-padded values, fused kernel
    with caplog.at_level("INFO", logger="leviathan.model.correlation"):
        out = correlation.sdpa_on_backends(q, k, v, backends, is_causal=True, scale=0.3)
        again = correlation.sdpa_on_backends(q, k, v, backends, is_causal=True, scale=0.3)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(again, ref)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "SDPA backend MATH" in logged[0] and "EFFICIENT_ATTENTION" in logged[0], logged
    with pytest.raises(RuntimeError, match="no SDPA backend ran"):
        correlation.sdpa_on_backends(q, k, v, (SDPBackend.FLASH_ATTENTION,), is_causal=True)


@settings(max_examples=12, deadline=None)
@given(
    T=st.integers(1, 7),
    heads=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([2, 4]),
    window=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
@pytest.mark.parametrize("path", CPU_PATHS)
def test_random_shapes_match_naive_formula(T: int, heads: int, head_dim: int, window: int, seed: int, path: str) -> None:
    """Windows longer than the sequence, single positions, one head: still the formula."""
    torch.manual_seed(seed)
    n_embd = heads * head_dim
    m = MultiHeadedCorrelation(n_embd, heads, window).double()
    m.force_path = path
    with torch.no_grad():
        m.lag_weight.normal_()
    x = torch.randn(2, T, n_embd, dtype=torch.float64)
    q, k, v = m.c_attn(x).split(n_embd, dim=2)
    q, k, v = (t.view(2, T, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    ref = m.c_proj(naive_correlation(q, k, v, m.lag_weight).transpose(1, 2).reshape(2, T, n_embd))
    torch.testing.assert_close(m(x), ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("block", [3, 4, 64])
@pytest.mark.parametrize("window", [1, 2, 4, 12])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_cpu_kernel_blocks_match_reference(
    monkeypatch: pytest.MonkeyPatch, block: int, window: int, p_drop: float
) -> None:
    """The CPU kernel on the lower block triangle (blocks that do not divide T, windows longer
    than the sequence, dropout): outputs and every gradient equal plain autograd on the full scores."""
    from leviathan.kernels import cpu

    monkeypatch.setattr(cpu, "BLOCK", block)
    T = 10
    g = torch.Generator().manual_seed(block * 100 + window)
    q, k, v = (torch.randn(2, H, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a = torch.randn(H, window, generator=g, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    out = correlation.shifted_diagonal(q, k, v, a, 1 / math.sqrt(D), p_drop)
    torch.manual_seed(5)
    probs = reference_probabilities(q, k, a)
    keep = torch.empty(2, H, T, T, dtype=torch.bool).bernoulli_(1 - p_drop) if p_drop else torch.ones(2, H, T, T, dtype=torch.bool)
    ref = (probs * keep / (1 - p_drop)) @ v
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, a), dout)
    for name, x, y in zip("qkva", grads, torch.autograd.grad(ref, (q, k, v, a), dout)):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10, msg=f"gradient of {name} differs")


def test_cpu_kernel_skips_the_blocks_above_the_diagonal() -> None:
    """Each block product reads only the causal columns: no row block multiplies a key after its last row."""
    from leviathan.kernels import cpu

    x, y = torch.randn(1, 1, 130, 4), torch.randn(1, 1, 130, 4)
    s = cpu.lower_product(x, y, 64)
    full = x @ y.transpose(-2, -1)
    for i0, i1 in cpu.blocks(130, 64):
        torch.testing.assert_close(s[..., i0:i1, :i1], full[..., i0:i1, :i1])
        assert not s[..., i0:i1, i1:].any()
    assert cpu.blocks(130, 64) == [(0, 64), (64, 128), (128, 130)]


def test_blocked_cpu_path_equals_lag_stacked_in_the_mixer() -> None:
    """At a length of several blocks (the last one partial) the mixer's two CPU paths agree, gradients included."""
    from leviathan.kernels import cpu

    T = 2 * cpu.BLOCK + 5
    grads = {}
    for path in CPU_PATHS:
        m = make(4, path=path)
        x = torch.randn(2, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y = m(x)
        y.pow(2).sum().backward()
        grads[path] = [y.detach()] + [p.grad for p in (m.c_attn.weight, m.lag_weight)]
    for name, a, b in zip(("output", "c_attn", "lag_weight"), *grads.values()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"{name} differs")
