"""The shifted-diagonal kernel as torch.library custom ops, with autograd and fake (meta) versions.

`leviathan::shifted_diagonal_forward(q, k, v, lag_weight, scale) -> (out, lse)` and
`leviathan::shifted_diagonal_backward(...) -> (dq, dk, dv, d lag_weight)` are opaque
to torch.compile, which traces through them with their fake versions (shapes
and dtypes only) instead of breaking the graph; the forward's autograd formula
calls the backward op, so a compiled backward graph holds it too.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from . import shifted_diagonal as kernel


def on_device(x: Tensor) -> contextlib.AbstractContextManager:
    """Make x's GPU the current one while launching: Triton launches on the current device,
    so a tensor on cuda:1 while cuda:0 is current would otherwise be read from the wrong GPU."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("leviathan::shifted_diagonal_forward", mutates_args=())
def shifted_diagonal_forward(q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """out (B, H, T, d) and the row logsumexp of the scores lse (B, H, T, fp32)."""
    with on_device(q):
        return kernel.forward(q.contiguous(), k.contiguous(), v.contiguous(), lag_weight.contiguous(), scale)


@shifted_diagonal_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("leviathan::shifted_diagonal_backward", mutates_args=())
def shifted_diagonal_backward(
    q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the forward's out with respect to q, k, v and lag_weight."""
    contiguous = (x.contiguous() for x in (q, k, v, lag_weight, out, lse, grad_out))
    with on_device(q):
        return kernel.backward(*contiguous, scale)


@shifted_diagonal_backward.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, lag_weight))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, lag_weight, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, lag_weight, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    # lse is an internal output (never returned by `shifted_diagonal_attention`), so grad_lse is unused.
    q, k, v, lag_weight, out, lse = ctx.saved_tensors
    dq, dk, dv, da = shifted_diagonal_backward(q, k, v, lag_weight, out, lse, grad_out, ctx.scale)
    return dq, dk, dv, da, None


shifted_diagonal_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor) -> None:
    """One-line errors for what the kernel does not take."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, T, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.size(-1) > kernel.MAX_HEAD_DIM:
        raise ValueError(f"head dim d={q.size(-1)} exceeds {kernel.MAX_HEAD_DIM}")
    if lag_weight.dim() != 2 or lag_weight.size(0) != q.size(1) or not 1 <= lag_weight.size(1) <= kernel.MAX_WINDOW:
        raise ValueError(
            f"lag_weight must be (H={q.size(1)}, w) with 1 <= w <= {kernel.MAX_WINDOW}, got {tuple(lag_weight.shape)}"
        )
    if q.dtype not in kernel.DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {kernel.DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({x.device for x in (q, k, v, lag_weight)}) != 1:
        raise ValueError("q, k, v and lag_weight must be on one device")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the Triton kernel runs on CUDA (or on CPU with TRITON_INTERPRET=1), got {q.device}")


def shifted_diagonal_attention(q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, scale: float) -> Tensor:
    """Causal shifted-diagonal correlation: (B, H, T, d) x3, (H, w) -> (B, H, T, d).

    The lag weights go in as fp32 whatever their dtype (the kernel sums the shifts in fp32,
    and a bf16 copy would round them to 8 bits); their gradient comes back in their dtype."""
    _check_inputs(q, k, v, lag_weight)
    out, _ = shifted_diagonal_forward(q, k, v, lag_weight.float(), float(scale))
    return out
