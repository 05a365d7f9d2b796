"""Forward+backward FLOPs of a component model, following the mixer path in use.

One training step of `batch_size` sequences of T tokens counts, in FLOPs
(2 per multiply-add; the backward costs twice the forward, so a step is
3x the forward: the factor 6 below):

    weights:  6 * B * T * (L * (4 C^2 + 2 r C^2) + V C)
              (every nn.Linear's weight, counted on the model built on the
              meta device: per layer q, k, v and output projections and the
              MLP of hidden width r C, then the LM head; embeddings are lookups)
    mixer:    6 * B * L * H * T (T + 1) / 2 * (score + d)
              (causal query-key pairs, per head: the score's multiply-adds
              plus d for the value sum)

The score's multiply-adds per query-key pair depend on the path
(`leviathan.model.correlation.mixer_path`):

    sdpa              d          (attention, and correlation with w = 1)
    lag_stacked       d * w      (SDPA on lag-stacked queries and keys)
    shifted_diagonal  d + w      (S = q k^T once, then w diagonal shifts)
    triton            d + w      (the same, tiled on the GPU)

So attention is the w = 1 case. Only useful arithmetic is counted: the masked
upper triangle that the CPU shifted-diagonal path also multiplies, and the zero
padding of the values on the CPU lag-stacked path, are left out, as are
elementwise work (norms, activations, softmax, loss) and the lag weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ComponentConfig
from .correlation import PATHS, mixer_path
from .component import build_component


def weight_multiply_adds(config: ComponentConfig) -> int:
    """Multiply-adds per token of every nn.Linear of the model: L (4 C^2 + 2 r C^2) + V C.

    Built on the meta device, so nothing is allocated or initialised.
    """
    with torch.device("meta"):
        model = build_component(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def score_multiply_adds(path: str, head_dim: int, window: int) -> int:
    """Multiply-adds of one query-key score on `path` (see the module docstring)."""
    if path == "sdpa":
        return head_dim
    if path == "lag_stacked":
        return head_dim * window
    if path in ("shifted_diagonal", "triton"):
        return head_dim + window
    raise ValueError(f"path: {path!r} is not one of {', '.join(PATHS)}")


def flops(
    config: ComponentConfig,
    seq_len: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    path: str | None = None,
) -> int:
    """Forward+backward FLOPs of one step: batch_size sequences of seq_len tokens.

    seq_len defaults to config.block_size. The mixer path is the one a forward
    takes on `device` ("cpu" or "cuda") for this length, unless `path` names
    one. FLOPs per token = flops(...) / (batch_size * seq_len).
    """
    T = config.block_size if seq_len is None else seq_len
    if T < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size: must be >= 1, got {T} and {batch_size}")
    L, H, d = config.n_layer, config.n_head, config.head_dim
    window = config.window if config.mixer == "correlation" else 1
    if path is None:
        path = mixer_path(device, T, window, dropout=config.dropout > 0)
    weights = weight_multiply_adds(config)
    pairs = T * (T + 1) // 2
    mixer = L * H * pairs * (score_multiply_adds(path, d, window) + d)
    return 6 * batch_size * (T * weights + mixer)
