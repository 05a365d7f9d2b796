"""The CPU shifted-diagonal correlation: materialised scores, causal blocks only.

Exact causal correlation from S = q k^T (see `leviathan.model.correlation`):

    score[i, j] = c * sum_u a[h,u] * S[i-u, j-u]     (c = scale, S = 0 before position 0, -inf above the diagonal)

On CPU its cost beyond attention's fused kernel is the matrix products and the
passes over (B, H, T, T) tensors. Attention's CPU kernel skips the key blocks
above the diagonal; so does this one. Rows are cut into blocks of `BLOCK`:
row block [i0, i1) needs only columns < i1, so every product and every lag
term works on the lower block triangle ((n+1)/2n of the matrix with n blocks),
and the rest of S and dP is zero-filled (P and dS are exactly zero there).

Each lag u pairs a block of the later rows with the block u rows and columns
before it (`lag_pairs`): the forward adds c a_u S[earlier] into score[later];
the backward adds c a_u dS'[later] into dS[earlier] and sums their products
for the lag weight's gradient. The scale rides on the lag weights, so q and k
are never rescaled, the softmax runs in place, dS takes dP's buffer, and the
gradient's products share one scratch block (fewer fresh T x T buffers, each
of which costs page faults).

It is plain eager PyTorch, so it costs nothing at startup. Fusing the lag
adds, mask and softmax with `torch.compile` (inductor's C++ backend) was
measured against the earlier unblocked kernel: the first call compiled for
60 s on a cold cache and 12-17 s for each further shape, and the step was no
faster at T = 64 and about 15% faster at T = 256, less than the blocks give.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import Tensor

BLOCK = 64
"""Rows per block; blocks above the diagonal are skipped.

Forward+backward CPU time at w = 4 (6 heads of 64, 2048 tokens, one thread):
blocks of 32 and 64 cost the same at T = 256, and at T = 64 one block of 64
beats two of 32 (small matrix products lose more to per-call overhead than
the skipped block saves), and so does one block at 4 heads of 32.
"""

Slice2 = tuple[slice, slice]


def blocks(T: int, block: int) -> list[tuple[int, int]]:
    """Row blocks [i0, i1) of a length-T sequence."""
    return [(i, min(i + block, T)) for i in range(0, T, block)]


def lag_pairs(T: int, u: int, block: int) -> Iterator[tuple[Slice2, Slice2]]:
    """(later, earlier) index pairs with later[i, j] = earlier[i-u, j-u], over the lower block triangle.

    Together they cover every (i, j) with u <= i, u <= j < i1 of i's block: all
    of S'[:, :, u:, u:] += S[:, :, :-u, :-u] that lands on or below the diagonal.
    """
    for i0, i1 in blocks(T, block):
        r0 = max(i0, u)
        if r0 < i1:
            yield (slice(r0, i1), slice(u, i1)), (slice(r0 - u, i1 - u), slice(0, i1 - u))


@functools.lru_cache(maxsize=8)
def causal_mask(T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, T): 0 on and below the diagonal, -inf above. Cached (a few shapes per run): read only."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)


def lower_product(x: Tensor, y: Tensor, block: int) -> Tensor:
    """x y^T on the lower block triangle, zeros above it: (B, H, T, d) x2 -> (B, H, T, T).

    Each block product is written in place (beta = 0: the empty buffer is never read).
    """
    *lead, T, d = x.shape
    if T <= block:
        return torch.matmul(x, y.transpose(-2, -1))
    out = x.new_empty(*lead, T, T)
    o, x3, y3 = out.view(-1, T, T), x.reshape(-1, T, d), y.reshape(-1, T, d)
    for i0, i1 in blocks(T, block):
        o[:, i0:i1, :i1].baddbmm_(x3[:, i0:i1], y3[:, :i1].transpose(1, 2), beta=0)
        o[:, i0:i1, i1:].zero_()
    return out


def lower_times(m: Tensor, y: Tensor, block: int) -> Tensor:
    """m y for m zero above its diagonal: (B, H, T, T) x (B, H, T, d) -> (B, H, T, d)."""
    T = m.size(-1)
    if T <= block:
        return torch.matmul(m, y)
    out = torch.empty_like(y)
    o, m3, y3 = out.view(-1, T, y.size(-1)), m.reshape(-1, T, T), y.reshape(-1, T, y.size(-1))
    for i0, i1 in blocks(T, block):
        o[:, i0:i1].baddbmm_(m3[:, i0:i1, :i1], y3[:, :i1], beta=0)
    return out


def lower_t_times(m: Tensor, y: Tensor, block: int) -> Tensor:
    """m^T y for m zero above its diagonal: (B, H, T, T) x (B, H, T, d) -> (B, H, T, d)."""
    T = m.size(-1)
    if T <= block:
        return torch.matmul(m.transpose(-2, -1), y)
    out = torch.empty_like(y)
    o, m3, y3 = out.view(-1, T, y.size(-1)), m.reshape(-1, T, T), y.reshape(-1, T, y.size(-1))
    for j0, j1 in blocks(T, block):
        o[:, j0:j1].baddbmm_(m3[:, j0:, j0:j1].transpose(1, 2), y3[:, j0:], beta=0)
    return out


class ShiftedDiagonalCorrelation(torch.autograd.Function):
    """Exact causal correlation from the materialised score matrix (the CPU path).

    q, k, v: (B, H, T, d); a: (H, w) lag weights; returns (B, H, T, d).
    Forward (every matrix (B, H, T, T), products on the lower block triangle):
        S  = q k^T                                          one matmul, d per pair
        S' = c a_0 S + mask;  S'[:, :, u:, u:] += c a_u S[:, :, :-u, :-u]   in place, c = scale
        P  = softmax(S'),   out = dropout(P) v
    Backward, from dO (flash's identities, nothing recomputed):
        dV  = dropout(P)^T dO,  dP = dropout'(dO v^T)
        dS' = P * (dP - rowsum(dP * P))                     (zero above the diagonal)
        dS  = c a_0 dS' + sum_u c a_u dS'[:, :, u:, u:] (placed at [:, :, :-u, :-u]), in dP's buffer
        da_u = c sum_{b,i,j} dS'[i, j] S[i-u, j-u]
        dq  = dS k,  dk = dS^T q
    It keeps S and P (two (B, H, T, T) tensors) for the backward.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, a: Tensor, scale: float, dropout_p: float) -> Tensor:
        T, w = q.size(-2), a.size(1)
        ctx.block = block = BLOCK
        s = lower_product(q, k, block)  # unscaled: the scale rides on the lag weights
        lag = (a * scale).view(1, -1, 1, w)  # (1, H, 1, w)
        scores = torch.addcmul(causal_mask(T, s.dtype, s.device), s, lag[..., 0:1])
        for u in range(1, min(w, T)):
            for later, earlier in lag_pairs(T, u, ctx.block):
                scores[..., later[0], later[1]].addcmul_(s[..., earlier[0], earlier[1]], lag[..., u : u + 1])
        p = torch.softmax(scores, dim=-1, out=scores)  # row by row, in place
        keep = None
        if dropout_p > 0:
            keep = torch.empty_like(p, dtype=torch.bool).bernoulli_(1 - dropout_p)
            out = lower_times(p * keep / (1 - dropout_p), v, block)
        else:
            out = lower_times(p, v, block)
        ctx.save_for_backward(q, k, v, a, s, p, keep)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, a, s, p, keep = ctx.saved_tensors
        scale, dropout_p = ctx.scale, ctx.dropout_p
        dout = dout.contiguous()
        T, w = q.size(-2), a.size(1)
        block = ctx.block
        if keep is None:
            dv = lower_t_times(p, dout, block)
            dp = lower_product(dout, v, block)
        else:
            dv = lower_t_times(p * keep / (1 - dropout_p), dout, block)
            dp = lower_product(dout, v, block) * keep / (1 - dropout_p)
        dscores = torch._softmax_backward_data(dp, p, -1, p.dtype)  # dS'
        lag = (a * scale).view(1, -1, 1, w)
        ds = torch.mul(dscores, lag[..., 0:1], out=dp)  # dP is spent: its buffer holds dS
        da = []  # (H,) per lag
        scratch = s.new_empty(s.numel() // T * min(block, T))  # one row block: every product fits
        for u in range(min(w, T)):
            da_u = 0
            for later, earlier in lag_pairs(T, u, block):
                g = dscores[..., later[0], later[1]]
                if u > 0:
                    ds[..., earlier[0], earlier[1]].addcmul_(g, lag[..., u : u + 1])
                product = torch.mul(g, s[..., earlier[0], earlier[1]], out=scratch[: g.numel()].view(g.shape))
                da_u = da_u + product.sum((-2, -1))
            da.append(da_u.sum(0))
        da += [torch.zeros_like(da[0])] * (w - len(da))  # lags longer than the sequence
        dq = lower_times(ds, k, block)
        dk = lower_t_times(ds, q, block)
        return dq, dk, dv, torch.stack(da, 1) * scale, None, None


def shifted_diagonal(q: Tensor, k: Tensor, v: Tensor, a: Tensor, scale: float, dropout_p: float = 0.0) -> Tensor:
    """Causal correlation through the materialised scores: (B, H, T, d) x3, a (H, w) -> (B, H, T, d).

    q, k and v are made contiguous once here: the mixer hands in head views of
    its (B, T, C) projections, and every block product would copy them again.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return ShiftedDiagonalCorrelation.apply(q, k, v, a.to(q.dtype), scale, dropout_p)
