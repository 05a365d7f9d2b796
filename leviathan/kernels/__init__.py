"""GPU kernels for the correlation mixer (Triton), with a check of when they can run.

Triton is optional: `triton_available()` says whether the kernels can run here
(Triton importable and a CUDA device, or Triton's CPU interpreter switched on
with TRITON_INTERPRET=1). `shifted_diagonal_attention` imports Triton on first
use, so importing this package never needs it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor


def triton_available() -> bool:
    """True when Triton is installed and has a device to run on (CUDA, or its interpreter on CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def shifted_diagonal_attention(q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, scale: float) -> Tensor:
    """Causal correlation with score[i, j] = sum_u a[h,u] * S[i-u, j-u], S = q k^T * scale.

    q, k, v: (B, H, T, d), d <= 128; lag_weight a: (H, w), w <= 8 -> out (B, H, T, d).
    Differentiable in q, k, v and lag_weight; see `leviathan.kernels.shifted_diagonal`.
    """
    from .ops import shifted_diagonal_attention as op

    return op(q, k, v, lag_weight, scale)


__all__ = ["shifted_diagonal_attention", "triton_available"]
