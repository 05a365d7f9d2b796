"""The Triton shifted-diagonal kernel against the naive float64 reference, under Triton's CPU interpreter.

Triton picks interpreted or compiled kernels when a kernel module is first
imported, reading TRITON_INTERPRET. So the kernel checks run in a pytest
subprocess started with TRITON_INTERPRET=1 (`test_kernel_under_the_interpreter`),
whatever other test modules imported earlier; run directly with
`TRITON_INTERPRET=1 pytest tests/test_triton_kernel.py` they run in-process.
fp32 and fp16 only: the interpreter's tl.dot returns garbage for bf16 inputs, so
bf16 is checked on a GPU only (`python -m leviathan.kernels.check`).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

from leviathan.kernels import triton_available  # noqa: E402  (does not import triton)

ROOT = Path(__file__).resolve().parents[1]


def kernels_interpreted() -> bool:
    """True when this process runs Triton's interpreter for the kernel module."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from leviathan.kernels import shifted_diagonal

    return isinstance(shifted_diagonal._forward_kernel, InterpretedFunction)


INTERPRETED = kernels_interpreted()
interpreted_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of test_kernel_under_the_interpreter"
)


COMPILED_ONLY = "runs in this file's compiled (not interpreted) process"


def compiled_only(why: str):
    """Skip under the interpreter: the test drives compiled kernels or its own subprocess."""
    return pytest.mark.skipif(INTERPRETED, reason=f"{COMPILED_ONLY}: {why}")


@compiled_only("it starts the interpreter run")
def test_kernel_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    this_file = str(Path(__file__).relative_to(ROOT))
    cmd = [sys.executable, "-m", "pytest", this_file, "-q", "-rs", "-p", "no:cacheprovider"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"interpreter checks failed:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert " passed" in run.stdout and all(COMPILED_ONLY in line for line in skips), run.stdout[-2000:]


def test_triton_available_follows_the_interpreter_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_available() == torch.cuda.is_available()


# ---- references (float64) -------------------------------------------------------------


def naive_reference(q, k, v, a, scale):
    """The kernel's contract term by term, O(T^2 w): score[i, j] = sum_u a[h,u] q[i-u].k[j-u] * scale."""
    B, H, T, d = q.shape
    out = torch.zeros_like(v)
    for i in range(T):
        score = torch.zeros(B, H, i + 1, dtype=q.dtype)
        for j in range(i + 1):
            for u in range(a.shape[1]):
                if i - u >= 0 and j - u >= 0:
                    score[:, :, j] += a[:, u] * (q[:, :, i - u] * k[:, :, j - u]).sum(-1) * scale
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", score.softmax(-1), v[:, :, : i + 1])
    return out


def dense_reference(q, k, v, a, scale):
    """The same scores as a sum of diagonal shifts of S = q k^T * scale (fast enough for autograd)."""
    T = q.size(-2)
    S = q @ k.transpose(-1, -2) * scale  # (B, H, T, T)
    score = torch.zeros_like(S)
    for u in range(a.shape[1]):
        score[..., u:, u:] += a[:, u, None, None] * S[..., : T - u, : T - u]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return score.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def inputs(B, H, T, d, w, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=gen).to(dtype) for _ in range(3))
    a = torch.randn(H, w, generator=gen)  # lag weights stay fp32, as the model's parameter does
    return q, k, v, a


def test_dense_reference_is_the_naive_formula() -> None:
    q, k, v, a = (x.double() for x in inputs(2, 2, 9, 4, 3, torch.float64))
    torch.testing.assert_close(dense_reference(q, k, v, a, 0.5), naive_reference(q, k, v, a, 0.5))


# ---- the kernel (interpreter) ---------------------------------------------------------

# (dtype, w, d, T): T is never a multiple of the 64-row tile and spans 1-4 tiles, so the
# scratch rings wrap around; d = 40 and 24 pad to 64 and 32 inside the kernel; d = 72 pads
# to 128, where key tiles (32) are half the query tiles (64); w = 3 pads the lag axis to 4.
CASES = [
    (torch.float32, 1, 16, 37),
    (torch.float32, 2, 40, 80),
    (torch.float32, 8, 16, 70),
    (torch.float16, 2, 24, 70),
    (torch.float16, 4, 40, 80),
    (torch.float32, 3, 16, 100),
    (torch.float32, 8, 16, 230),
    (torch.float32, 5, 72, 150),
    (torch.float16, 8, 72, 99),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}  # relative to the largest reference entry


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@interpreted_only
@pytest.mark.parametrize("dtype,w,d,T", CASES, ids=lambda x: str(x).removeprefix("torch."))
def test_outputs_and_gradients_match_the_reference(dtype, w, d, T) -> None:
    from leviathan.kernels import shifted_diagonal_attention

    q, k, v, a = (x.requires_grad_() for x in inputs(1, 2, T, d, w, dtype))
    scale = 1 / math.sqrt(d)
    out = shifted_diagonal_attention(q, k, v, a, scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v, a), grad_out)

    exact = [x.detach().double().requires_grad_() for x in (q, k, v, a)]
    ref = dense_reference(*exact, scale)
    ref_grads = torch.autograd.grad(ref, exact, grad_out.double())

    assert out.dtype == dtype and all(g.dtype == x.dtype for g, x in zip(grads, (q, k, v, a)))
    errors = {
        name: relative_error(got, want)
        for name, got, want in zip(("out", "dq", "dk", "dv", "dlag"), (out, *grads), (ref, *ref_grads))
    }
    assert max(errors.values()) < TOLERANCE[dtype], f"relative errors {errors}"


def test_tile_settings_parse_their_names() -> None:
    from leviathan.kernels.shifted_diagonal import DEFAULT_TILES, TILES_BY_ARCH, Tiles

    for tiles in (DEFAULT_TILES, Tiles(128, 64, 8, 3), *TILES_BY_ARCH.values()):
        assert Tiles.parse(tiles.name()) == tiles
    with pytest.raises(ValueError, match="tiles: expected MxN/Ww/Ss"):
        Tiles.parse("64x64/8w")


@interpreted_only
@pytest.mark.parametrize("block_m,block_n", [(128, 64), (64, 64)])
def test_every_swept_tile_shape_matches_the_reference(block_m, block_n) -> None:
    """kernel_sweep's tile shapes compute the same mixer (T = 150 is a multiple of neither tile)."""
    from leviathan.kernels import shifted_diagonal as kernel

    tiles = kernel.Tiles(block_m=block_m, block_n=block_n, num_warps=4, num_stages=2)
    q, k, v, a = inputs(1, 2, 150, 16, 4, torch.float32)
    scale = 0.25
    out, lse = kernel.forward(q, k, v, a, scale, tiles=tiles)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = kernel.backward(q, k, v, a, out, lse, grad_out, scale, tiles=tiles)

    exact = [x.double().requires_grad_() for x in (q, k, v, a)]
    ref = dense_reference(*exact, scale)
    ref_grads = torch.autograd.grad(ref, exact, grad_out.double())
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert relative_error(got, want) < TOLERANCE[torch.float32]


@interpreted_only
def test_lag_weights_reach_the_kernel_in_fp32() -> None:
    """A 16-bit copy of the lag weights is widened, and its gradient keeps the caller's dtype."""
    from leviathan.kernels import shifted_diagonal_attention

    q, k, v, a = inputs(1, 2, 40, 16, 3, torch.float16)
    a16 = a.half().requires_grad_()
    out = shifted_diagonal_attention(q, k, v, a16, 0.25)
    (grad_a,) = torch.autograd.grad(out.float().sum(), a16)
    assert grad_a.dtype == torch.float16
    torch.testing.assert_close(out, shifted_diagonal_attention(q, k, v, a16.detach().float(), 0.25))


@interpreted_only
def test_window_one_is_causal_attention() -> None:
    from leviathan.kernels import shifted_diagonal_attention

    q, k, v, _ = inputs(2, 2, 50, 32, 1, torch.float32)
    out = shifted_diagonal_attention(q, k, v, torch.ones(2, 1), 0.2)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2))


@interpreted_only
def test_custom_ops_pass_opcheck() -> None:
    """Schema, fake (meta) versions, autograd registration and AOT dispatch of both ops."""
    from leviathan.kernels.ops import shifted_diagonal_backward, shifted_diagonal_forward

    q, k, v, a = (x.requires_grad_() for x in inputs(1, 2, 20, 16, 2, torch.float32))
    torch.library.opcheck(shifted_diagonal_forward, (q, k, v, a, 0.25))
    out, lse = shifted_diagonal_forward(q, k, v, a, 0.25)
    grad_args = (*(x.detach() for x in (q, k, v, a, out, lse)), torch.randn_like(out), 0.25)
    torch.library.opcheck(shifted_diagonal_backward, grad_args, test_utils=("test_schema", "test_faketensor"))


@interpreted_only
def test_torch_compile_traces_through_without_graph_breaks() -> None:
    from leviathan.kernels import shifted_diagonal_attention

    def loss(q, k, v, a):
        return shifted_diagonal_attention(q, k, v, a, 0.25).square().sum()

    q, k, v, a = (x.requires_grad_() for x in inputs(1, 2, 20, 16, 2, torch.float32))
    eager = torch.autograd.grad(loss(q, k, v, a), (q, k, v, a))
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled = torch.autograd.grad(compiled_loss(q, k, v, a), (q, k, v, a))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)


@interpreted_only
def test_gpu_self_check_runs_on_cpu() -> None:
    """The GPU check's code path at toy sizes (fp32 only: bf16 needs a GPU)."""
    from leviathan.kernels.check import gpu_self_check

    report = gpu_self_check(
        device="cpu", accuracy_cases=[(torch.float32, 2, 16)], accuracy_length=20,
        windows=(2,), head_dims=(16,), lengths=(20,), batch=1, heads=1, repeats=1,
    )
    assert report["ok"], report["accuracy"]
    assert report["timing"][0]["kernel_fwd_bwd_ms"] > 0 and report["timing"][0]["fwd_bwd_ratio"] > 0


@interpreted_only
@pytest.mark.parametrize(
    "shape_change,message",
    [
        (dict(v=(1, 2, 9, 16)), "share one"),
        (dict(a=(2, 9)), "lag_weight"),
        (dict(a=(3, 2)), "lag_weight"),
        (dict(q=(1, 2, 8, 136), k=(1, 2, 8, 136), v=(1, 2, 8, 136)), "head dim"),
        (dict(dtype=torch.float64), "dtype"),
    ],
)
def test_rejects_what_the_kernel_does_not_take(shape_change, message) -> None:
    from leviathan.kernels import shifted_diagonal_attention

    dtype = shape_change.get("dtype", torch.float32)
    shapes = {"q": (1, 2, 8, 16), "k": (1, 2, 8, 16), "v": (1, 2, 8, 16), "a": (2, 2)}
    shapes.update({name: s for name, s in shape_change.items() if name != "dtype"})
    q, k, v = (torch.zeros(shapes[n], dtype=dtype) for n in "qkv")
    with pytest.raises(ValueError, match=message):
        shifted_diagonal_attention(q, k, v, torch.ones(shapes["a"]), 0.25)


@compiled_only("the interpreter never lowers kernels")
def test_kernels_compile_for_hopper_without_a_gpu() -> None:
    """The full GPU pipeline (Triton IR -> LLVM -> PTX -> cubin for sm_90) on this machine:
    catches what only the GPU compiler rejects. fp16 and bf16 (fp32, whose tf32x3 products
    triple the compile time, is in `python -m leviathan.kernels.aot`), the tile sizes of
    d <= 64 and of d = 128, and the widest window."""
    from leviathan.kernels.aot import compile_kernels

    rows = compile_kernels([("float16", 40, 4), ("bfloat16", 128, 8)])
    assert [(r["kernel"], r["d"]) for r in rows] == [("forward", 40), ("backward", 40), ("forward", 128), ("backward", 128)]
    assert all(r["has_cubin"] and 0 < r["shared_bytes"] <= 227 * 1024 for r in rows), rows


@compiled_only("the benchmark starts its own interpreter process")
def test_kernel_does_attention_plus_halo_work_not_lag_stacked_work() -> None:
    """The d + w claim, counted: at w = 4 the kernel's tile products stay within the halo's
    share of FlashAttention's (forward 1 + 16/64 on the score half, backward its rings), where
    lag stacking does (w + 1) / 2 = 2.5x forward and (3w + 2) / 5 = 2.8x backward."""
    import json

    cmd = [sys.executable, "benchmarks/kernel_work.py", "--seq", "256", "--windows", "4"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    w4 = json.loads(run.stdout)["windows"]["w4"]
    assert w4["forward_macs_over_flash"] <= 1.13 and w4["backward_macs_over_flash"] <= 1.3, w4
    assert w4["forward_read_other_bytes"] > 0, "the shifts are read back from the scratch ring"
