"""Multi-headed correlation: the token mixer that replaces dot-product attention.

Per head h (width d), with queries q, keys k, values v and learned lag weights
a[h, u] for lags u = 0..w-1:

    score[i, j] = sum_{u<w} a[h,u] * dot(q[i-u], k[j-u]) / sqrt(d)    (q, k = 0 before position 0)
    out[i]      = sum_{j<=i} softmax_j(score[i, :]) * v[j]

A dot product is a cross-correlation at zero lag; the lags let token i relate
to token j through their recent contexts. Query window i-u <= i and key window
j-u <= j <= i, so the mixer is causal by construction.

The sum over lags factorises (the diagonal case of a key-query convolution):

    Q~[i] = concat_u a[h,u] * q[i-u]        K~[j] = concat_u k[j-u]       (width d*w)
    score[i, j] = dot(Q~[i], K~[j]) / sqrt(d)

so the mixer can be one `scaled_dot_product_attention` call on lag-stacked
queries and keys (scale 1/sqrt(d), not 1/sqrt(d*w)), which never builds the
L x L score matrix but does d*w multiply-adds per query-key pair. The exact
score needs only d + w: S = q k^T / sqrt(d) once, then its w diagonal shifts

    score[i, j] = sum_u a[h,u] * S[i-u, j-u]                          (S = 0 before position 0)

With w = 1 and a = 1 it is exactly causal attention, and `mixer="attention"`
is that baseline twin: the same projections, no lag weights.

Which computation runs is chosen by shape and device (`mixer_path`):

    "sdpa"              w = 1: one SDPA call at width d
    "shifted_diagonal"  CPU, T <= 512 (w < 4) or 1024, and the (B, H, T, T) scores
                        within SCORE_BYTES_MAX: S materialised, shifts added in place
    "lag_stacked"       CPU above either limit, or CUDA without Triton: SDPA on width d*w
    "triton"            CUDA with Triton: the tiled shifted-diagonal kernel of `leviathan.kernels`

Incremental decoding (a `CorrelationCache`) always keeps lag-stacked keys.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import MIXERS, _check_choice, _check_int
from ..kernels import cpu as cpu_kernel

log = logging.getLogger(__name__)

SHIFTED_DIAGONAL_MAX_LEN = 1024
"""Longest sequence for which the CPU materialises the (T, T) scores at w >= 4
(SHORT_WINDOW_MAX_LEN at w = 2, 3).

Measured with `benchmarks/mixer.py --threads 1 --sections mixer --seqs
512,1024,2048 --windows 2,4,8` (C = 384, 6 heads of 64, 2048 tokens, forward +
backward CPU time against attention). Shifted-diagonal / lag-stacked:
T = 512: 1.40 / 1.47 (w = 2), 1.45 / 2.61 (w = 4), 1.64 / 5.25 (w = 8);
T = 1024: 2.00 / 1.55, 2.26 / 2.71, 3.58 / 5.22;
T = 2048: 3.09 / 1.58, 3.93 / 3.01, 5.02 / 5.63, with twice the lag-stacked
path's memory at w = 8 (495 against 241 MiB), which is why it stops at 1024.
The lag-stacked cost grows with w and the shifted-diagonal cost with T^2.
"""

SHORT_WINDOW_MAX_LEN = 512
"""The same limit at w = 2 and 3, where the lag-stacked path is cheaper (above)."""


def shifted_diagonal_max_len(window: int) -> int:
    """Longest sequence the CPU runs on the shifted-diagonal path at this window."""
    return SHIFTED_DIAGONAL_MAX_LEN if window >= 4 else SHORT_WINDOW_MAX_LEN


SCORE_BYTES_MAX = 1 << 30
"""Largest (B, H, T, T) score matrix, in bytes, the CPU materialises (the
shifted-diagonal path holds two or three of that size at once). Training
shapes stay under it (B = 32, H = 6, T = 1024 in fp32 is 805 MB); evaluation
at a large batch, e.g. B = 256 at T = 512, goes lag-stacked instead of holding
gigabytes of scores.
"""


def score_bytes(batch: int, heads: int, seq_len: int, itemsize: int = 4) -> int:
    """Bytes of one (batch, heads, seq_len, seq_len) score matrix of `itemsize`-byte elements."""
    return batch * heads * seq_len * seq_len * itemsize


PATHS = ("sdpa", "shifted_diagonal", "lag_stacked", "triton")
"""How the mixer computes its scores (see the module docstring)."""

FORCEABLE_PATHS = PATHS[1:]
"""Paths `MultiHeadedCorrelation.force_path` may pin a correlation mixer to."""

CUDA_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
"""SDPA backends tried on CUDA, in order. Flash needs equal query and value
widths (w = 1); the memory-efficient kernel takes queries d*w wide and values
d wide; math always runs. cuDNN is left out: it has failed on unequal widths,
and PyTorch does not fall back when a chosen backend fails."""


@functools.cache
def triton_kernels() -> ModuleType | None:
    """`leviathan.kernels` when it imports and Triton can run, else None."""
    try:
        from .. import kernels
    except ImportError:
        return None
    return kernels if kernels.triton_available() else None


def mixer_path(
    device_type: str, seq_len: int, window: int, triton: bool | None = None, dropout: bool = False,
    scores: int | None = None,
) -> str:
    """The path a full (uncached) forward takes for this shape; one of PATHS.

    triton: whether the Triton kernel can run (looked up when None; only asked on CUDA).
    dropout: attention dropout is on; the Triton kernel has none, so CUDA then stacks.
    scores: bytes of the (B, H, T, T) score matrix (`score_bytes`); on CPU above
        SCORE_BYTES_MAX the lag-stacked path runs, which never builds it. None: T decides alone.
    """
    if window == 1:
        return "sdpa"
    if device_type == "cuda":
        if dropout:
            return "lag_stacked"
        if triton is None:
            triton = triton_kernels() is not None
        return "triton" if triton else "lag_stacked"
    if seq_len > shifted_diagonal_max_len(window) or (scores is not None and scores > SCORE_BYTES_MAX):
        return "lag_stacked"
    return "shifted_diagonal"


_logged: set[tuple] = set()


def log_once(*key: object) -> None:
    """Log the path a shape runs on, once per distinct key (not once per call)."""
    if key not in _logged:
        _logged.add(key)
        log.info("correlation: %s", " ".join(map(str, key)))


def shift_right(x: Tensor, u: int) -> Tensor:
    """x[..., t - u, :] along dim -2, zeros for t < u. (..., T, d) -> (..., T, d)."""
    if u == 0:
        return x
    return F.pad(x, (0, 0, u, 0))[..., : x.size(-2), :]


def lag_stack(x: Tensor, window: int, history: Tensor | None = None) -> Tensor:
    """Stack x[t], x[t-1], ..., x[t-w+1] on the feature axis.

    x: (B, H, T, d); history: (B, H, w-1, d), the w-1 rows before x (zeros at
    the sequence start when None). Returns (B, H, T, d*w), lag u in the u-th
    block of d features.
    """
    if window == 1:
        return x
    T = x.size(-2)
    if history is None:
        return torch.cat([shift_right(x, u) for u in range(window)], dim=-1)
    full = torch.cat([history, x], dim=-2)  # (B, H, w-1+T, d)
    w1 = window - 1
    return torch.cat([full[..., w1 - u : w1 - u + T, :] for u in range(window)], dim=-1)


def shifted_diagonal(q: Tensor, k: Tensor, v: Tensor, a: Tensor, scale: float, dropout_p: float = 0.0) -> Tensor:
    """Causal correlation through the materialised scores: (B, H, T, d) x3, a (H, w) -> (B, H, T, d).

    The CPU kernel of `leviathan.kernels.cpu`: S = q k^T and its w diagonal
    shifts on the lower block triangle only, kept for a backward that
    recomputes nothing.
    """
    return cpu_kernel.shifted_diagonal(q, k, v, a, scale, dropout_p)


_cuda_backend: dict[tuple, SDPBackend] = {}


def sdpa_on_backends(q: Tensor, k: Tensor, v: Tensor, backends: tuple[SDPBackend, ...], **kwargs) -> Tensor:
    """SDPA on the first of `backends` that accepts these inputs, chosen explicitly.

    Each backend is tried alone, in order; the first that runs is remembered
    for this list and kind of input (device, dtype, widths, mask, dropout) and logged,
    so later calls go straight to it.
    """
    key = (backends, q.device, q.dtype, q.size(-1), v.size(-1), kwargs.get("attn_mask") is not None, bool(kwargs.get("dropout_p")))
    known = _cuda_backend.get(key)
    if known is not None:
        with sdpa_kernel(known):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    failures = []
    for backend in backends:
        # PyTorch gives the reason a backend cannot run as warnings, then raises.
        with warnings.catch_warnings(record=True) as reasons:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
            except RuntimeError as e:
                why = [str(r.message).split(" (Triggered")[0] for r in reasons] or [str(e).splitlines()[0]]
                failures.append(f"{backend.name}: {' '.join(why)}")
                continue
        _cuda_backend[key] = backend
        log.info(
            "correlation: SDPA backend %s for %s q width %d, v width %d%s",
            backend.name, q.dtype, q.size(-1), v.size(-1),
            "" if not failures else " (after " + "; ".join(failures) + ")",
        )
        return out
    raise RuntimeError("no SDPA backend ran: " + "; ".join(failures))


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """`scaled_dot_product_attention` for query/key width d*w and value width d.

    q, k: (B, H, T, d*w); v: (B, H, S, d) -> (B, H, T, d). On CPU the fused
    (flash) kernel needs equal widths and otherwise PyTorch falls back to the
    math kernel, which builds the L x L score matrix; zero-padding v to d*w and
    dropping the padded output columns is exact and keeps the fused kernel
    (measured in benchmarks/mixer.py). On CUDA values stay d wide and the
    backend is picked from CUDA_SDPA_BACKENDS.
    """
    dv = v.size(-1)
    if q.device.type == "cuda":
        return sdpa_on_backends(q, k, v, CUDA_SDPA_BACKENDS, **kwargs)
    if q.size(-1) != dv:
        v = F.pad(v, (0, q.size(-1) - dv))
        return F.scaled_dot_product_attention(q, k, v, **kwargs)[..., :dv]
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


@dataclass
class CorrelationCache:
    """Per-layer state for incremental decoding.

    keys:    (B, H, P, d*w)  lag-stacked keys K~ of the P positions seen so far
    values:  (B, H, P, d)
    queries: (B, H, w-1, d)  the last w-1 raw queries (zeros before position 0)

    K~'s last row already holds the last w raw keys, so the next K~ row is
    built from it. Updated in place by `MultiHeadedCorrelation.forward`.
    """

    keys: Tensor | None = None
    values: Tensor | None = None
    queries: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.size(-2)


class MultiHeadedCorrelation(nn.Module):
    """Causal multi-headed correlation (or, with mixer="attention", causal attention).

    forward(x: (B, T, C), cache=None) -> (B, T, C). With a `CorrelationCache`,
    x holds the next T positions after the cached ones (a prompt prefill or one
    decoded token); the cache is extended in place and the output equals the
    matching rows of a full forward over the whole sequence.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        window: int,
        mixer: str = "correlation",
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_int("n_embd", n_embd, 1)
        _check_int("n_head", n_head, 1)
        _check_int("window", window, 1)
        _check_choice("mixer", mixer, MIXERS)
        if n_embd % n_head:
            raise ValueError(f"n_embd: {n_embd} is not divisible by n_head={n_head}")
        self.n_embd, self.n_head, self.head_dim = n_embd, n_head, n_embd // n_head
        self.mixer = mixer
        # The attention twin scores with the zero-lag product only.
        self.window = window if mixer == "correlation" else 1
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        if mixer == "correlation":
            # a[h, 0] = 1, other lags 0: a fresh model computes exactly attention,
            # and d loss / d a[h, u] = sum dL/dscore * q[i-u].k[j-u] / sqrt(d) is
            # non-zero, so the lags are learned from the first step.
            lag = torch.zeros(n_head, window)
            lag[:, 0] = 1.0
            self.lag_weight = nn.Parameter(lag)  # (H, w)
        else:
            self.register_parameter("lag_weight", None)
        # None: the path follows `mixer_path` (shape and device); a name from
        # PATHS forces it (benchmarks compare the paths this way).
        self.force_path: str | None = None
        self.last_path: str | None = None  # the path of the latest full forward, shown in the repr

    def _stacked_queries(self, q: Tensor, history: Tensor | None) -> Tensor:
        """Q~ = concat_u a[h,u] * q[t-u]: (B, H, T, d) -> (B, H, T, d*w)."""
        if self.lag_weight is None:
            return q
        B, H, T, d = q.shape
        stacked = lag_stack(q, self.window, history).view(B, H, T, self.window, d)
        # In q's dtype: under autocast q is bf16 while the weights stay fp32.
        stacked = stacked * self.lag_weight.to(q.dtype).view(1, H, 1, self.window, 1)
        return stacked.view(B, H, T, self.window * d)

    def forward(self, x: Tensor, cache: CorrelationCache | None = None) -> Tensor:
        B, T, C = x.size()
        H, d, w = self.n_head, self.head_dim, self.window
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        k = k.view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        v = v.view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        scale = 1.0 / math.sqrt(d)
        dropout_p = self.dropout if self.training else 0.0

        if cache is None:
            y = self._full(q, k, v, scale, dropout_p)
        else:
            P = cache.length
            q_hist = k_hist = None
            if w > 1:
                if P == 0:
                    q_hist = q.new_zeros(B, H, w - 1, d)
                    k_hist = k.new_zeros(B, H, w - 1, d)
                else:
                    q_hist = cache.queries
                    # K~[P-1] = [k[P-1], k[P-2], ..., k[P-w]]: reversed, its first w-1 blocks.
                    last = cache.keys[..., -1, :].view(B, H, w, d)[:, :, : w - 1]
                    k_hist = last.flip(2)
            qs = self._stacked_queries(q, q_hist)  # (B, H, T, d*w)
            ks_new = lag_stack(k, w, k_hist)  # (B, H, T, d*w)
            ks = ks_new if P == 0 else torch.cat([cache.keys, ks_new], dim=2)  # (B, H, P+T, d*w)
            vs = v if P == 0 else torch.cat([cache.values, v], dim=2)  # (B, H, P+T, d)
            if P == 0:
                y = sdpa(qs, ks, vs, dropout_p=dropout_p, is_causal=True, scale=scale)
            else:
                # Query t (absolute P+t) sees keys 0..P+t: SDPA's is_causal aligns
                # the mask top-left, so a prefill after cached positions needs it spelled out.
                mask = None
                if T > 1:
                    mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
                y = sdpa(qs, ks, vs, attn_mask=mask, dropout_p=dropout_p, scale=scale)
            cache.keys, cache.values = ks, vs
            if w > 1:
                cache.queries = torch.cat([q_hist, q], dim=2)[:, :, -(w - 1) :]
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def path_for(self, device_type: str, seq_len: int, scores: int | None = None) -> str:
        """The path a full forward over seq_len positions takes on this device (scores: as in `mixer_path`)."""
        if self.force_path is not None and self.lag_weight is not None:
            _check_choice("force_path", self.force_path, FORCEABLE_PATHS)
            return self.force_path
        return mixer_path(device_type, seq_len, self.window, dropout=self.dropout > 0 and self.training, scores=scores)

    def _full(self, q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float) -> Tensor:
        """Causal mixing of a whole sequence: (B, H, T, d) x3 -> (B, H, T, d), on the chosen path."""
        B, H, T, d = q.shape
        path = self.path_for(q.device.type, T, score_bytes(B, H, T, q.element_size()))
        self.last_path = f"{path} (T={T}, {q.device.type})"
        log_once(path, q.device.type, f"T={T}", f"H={H}", f"d={d}", f"w={self.window}", q.dtype)
        if path == "shifted_diagonal":
            return shifted_diagonal(q, k, v, self.lag_weight, scale, dropout_p)
        if path == "triton":
            kernels = triton_kernels()
            if kernels is None:
                raise RuntimeError("force_path='triton': leviathan.kernels or Triton is not available")
            return kernels.shifted_diagonal_attention(q, k, v, self.lag_weight, scale)
        qs = self._stacked_queries(q, None)  # (B, H, T, d*w)
        ks = lag_stack(k, self.window)  # (B, H, T, d*w)
        return sdpa(qs, ks, v, dropout_p=dropout_p, is_causal=True, scale=scale)

    def extra_repr(self) -> str:
        rule = (f"cpu: shifted_diagonal up to T={shifted_diagonal_max_len(self.window)}, and scores up to "
                f"{SCORE_BYTES_MAX >> 20} MiB, lag_stacked above; cuda: triton or lag_stacked")
        path = "sdpa" if self.window == 1 else self.force_path or f"auto ({rule})"
        return (
            f"mixer={self.mixer!r}, n_head={self.n_head}, head_dim={self.head_dim}, window={self.window}, "
            f"path={path}, last_path={self.last_path}"
        )
