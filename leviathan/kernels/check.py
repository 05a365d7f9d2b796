"""Self-check of the shifted-diagonal kernel on a GPU: accuracy and speed in one call.

Accuracy: the kernel's output and gradients (q, k, v, lag weights) against the
lag-stacked formula of `leviathan.model.correlation` evaluated in float64,

    score[i, j] = dot(Q~[i], K~[j]) * scale,   Q~[i] = concat_u a[h,u] q[i-u],   K~[j] = concat_u k[j-u],

an independent route to the same scores. Speed: median forward and
forward + backward times of the kernel against SDPA's flash attention (plain
causal attention at the same B, H, T, d and dtype), and their ratio.

    python -m leviathan.kernels.check          # prints JSON; needs CUDA and Triton
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..model.correlation import lag_stack
from . import shifted_diagonal_attention, triton_available


def lag_stacked_reference(q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, scale: float) -> Tensor:
    """The same mixer through SDPA on lag-stacked queries and keys: (B, H, T, d) -> (B, H, T, d)."""
    B, H, T, d = q.shape
    w = lag_weight.size(1)
    qs = (lag_stack(q, w).view(B, H, T, w, d) * lag_weight.view(1, H, 1, w, 1)).view(B, H, T, w * d)
    return F.scaled_dot_product_attention(qs, lag_stack(k, w), v, is_causal=True, scale=scale)


def _inputs(B: int, H: int, T: int, d: int, w: int, dtype: torch.dtype, device: str) -> list[Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
    lag_weight = 0.5 * torch.randn(H, w, generator=gen, device=device)
    lag_weight[:, 0] = 1.0
    return [q, k, v, lag_weight]


def accuracy(B: int, H: int, T: int, d: int, w: int, dtype: torch.dtype, device: str) -> dict[str, float]:
    """Max |kernel - reference| / max |reference| of out, dq, dk, dv and d lag_weight."""
    inputs = [x.requires_grad_() for x in _inputs(B, H, T, d, w, dtype, device)]
    scale = d**-0.5
    out = shifted_diagonal_attention(*inputs, scale)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    exact = [x.detach().double().requires_grad_() for x in inputs]
    ref = lag_stacked_reference(*exact, scale)
    ref_grads = torch.autograd.grad(ref, exact, grad_out.double())
    names = ("out", "dq", "dk", "dv", "dlag")
    return {
        name: ((got.double() - want).abs().max() / want.abs().max()).item()
        for name, got, want in zip(names, (out, *grads), (ref, *ref_grads))
    }


def _median_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time of fn in milliseconds after one warm-up call (synchronising CUDA)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timing(B: int, H: int, T: int, d: int, w: int, dtype: torch.dtype, device: str, repeats: int) -> dict[str, float]:
    """Forward and forward + backward milliseconds of the kernel and of SDPA flash attention, and the ratios."""
    q, k, v, lag_weight = (x.requires_grad_() for x in _inputs(B, H, T, d, w, dtype, device))
    scale = d**-0.5
    grad_out = torch.randn_like(q)

    def kernel_forward() -> Tensor:
        return shifted_diagonal_attention(q, k, v, lag_weight, scale)

    def flash_forward() -> Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    result = {}
    for name, forward in (("kernel", kernel_forward), ("flash", flash_forward)):
        with torch.no_grad():
            result[f"{name}_fwd_ms"] = _median_ms(forward, device, repeats)
        result[f"{name}_fwd_bwd_ms"] = _median_ms(lambda: forward().backward(grad_out), device, repeats)
    result["fwd_ratio"] = result["kernel_fwd_ms"] / result["flash_fwd_ms"]
    result["fwd_bwd_ratio"] = result["kernel_fwd_bwd_ms"] / result["flash_fwd_bwd_ms"]
    return result


# Largest relative error accepted per dtype: fp32 products run as tf32x3, bf16 keeps 8 bits.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# fp32 kernels take minutes to compile, so one fp32 case checks that path; bf16 covers the range of w and d.
ACCURACY_CASES = ((torch.float32, 4, 64), (torch.bfloat16, 1, 64), (torch.bfloat16, 4, 64), (torch.bfloat16, 8, 128))


def gpu_self_check(
    device: str = "cuda",
    accuracy_cases: Sequence[tuple[torch.dtype, int, int]] = ACCURACY_CASES,
    accuracy_length: int = 1000,
    windows: Sequence[int] = (1, 4, 8),
    head_dims: Sequence[int] = (64, 128),
    lengths: Sequence[int] = (1024, 2048, 4096),
    batch: int = 4,
    heads: int = 16,
    repeats: int = 20,
) -> dict:
    """Accuracy rows (each (dtype, w, d) case; B=2, H=4, T=accuracy_length) and timing
    rows (bf16 on CUDA, every length, window and head dim; B=batch, H=heads), with `ok`
    true when every accuracy row is within TOLERANCE. Returns a JSON-ready dict."""
    rows = []
    for dtype, w, d in accuracy_cases:
        errors = accuracy(2, 4, accuracy_length, d, w, dtype, device)
        ok = max(errors.values()) <= TOLERANCE[dtype]
        rows.append({"dtype": str(dtype).removeprefix("torch."), "w": w, "d": d, "ok": ok, **errors})
    timings = []
    timing_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for T in lengths:
        for w in windows:
            for d in head_dims:
                ms = timing(batch, heads, T, d, w, timing_dtype, device, repeats)
                timings.append({"T": T, "w": w, "d": d, "B": batch, "H": heads, **ms})
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
        "ok": all(row["ok"] for row in rows),
        "accuracy": rows,
        "timing_dtype": str(timing_dtype).removeprefix("torch."),
        "timing": timings,
    }


if __name__ == "__main__":
    if not (torch.cuda.is_available() and triton_available()):
        raise SystemExit(json.dumps({"error": "needs a CUDA device and Triton", "torch": torch.__version__}))
    print(json.dumps(gpu_self_check(), indent=1))
