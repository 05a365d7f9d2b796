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

so the whole mixer is one `scaled_dot_product_attention` call on lag-stacked
queries and keys (scale 1/sqrt(d), not 1/sqrt(d*w)) and never builds the L x L
score matrix. With w = 1 and a = 1 it is exactly causal attention, and
`mixer="attention"` is that baseline twin: the same projections, no lag weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import MIXERS, _check_choice, _check_int


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


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """`scaled_dot_product_attention` for query/key width d*w and value width d.

    q, k: (B, H, T, d*w); v: (B, H, S, d) -> (B, H, T, d). On CPU the fused
    (flash) kernel needs equal widths and otherwise PyTorch falls back to the
    math kernel, which builds the L x L score matrix; zero-padding v to d*w and
    dropping the padded output columns is exact and keeps the fused kernel
    (measured in benchmarks/mixer.py). CUDA's memory-efficient kernel takes a
    narrower v as it is.
    """
    dv = v.size(-1)
    if q.device.type == "cpu" and q.size(-1) != dv:
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

    def _stacked_queries(self, q: Tensor, history: Tensor | None) -> Tensor:
        """Q~ = concat_u a[h,u] * q[t-u]: (B, H, T, d) -> (B, H, T, d*w)."""
        if self.lag_weight is None:
            return q
        B, H, T, d = q.shape
        stacked = lag_stack(q, self.window, history).view(B, H, T, self.window, d)
        stacked = stacked * self.lag_weight.view(1, H, 1, self.window, 1)
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
            qs = self._stacked_queries(q, None)  # (B, H, T, d*w)
            ks = lag_stack(k, w)  # (B, H, T, d*w)
            y = sdpa(qs, ks, v, dropout_p=dropout_p, is_causal=True, scale=scale)
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

    def extra_repr(self) -> str:
        return f"mixer={self.mixer!r}, n_head={self.n_head}, head_dim={self.head_dim}, window={self.window}"
