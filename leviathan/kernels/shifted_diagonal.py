"""Shifted-diagonal correlation as a flash-style Triton kernel (forward and backward).

Per head h, with lag weights a[h, u] (u < w) and S = (q k^T) * scale, where
q, k = 0 before position 0:

    score[i, j] = sum_{u<w} a[h,u] * S[i-u, j-u]                  (causal: j <= i)
    out[i]      = sum_{j<=i} softmax_j(score[i, :]) v[j]

The causal mask never cuts a shift: j <= i implies j-u <= i-u. Each score tile
(rows i, columns j) is the sum of w shifted tile products: the u-th multiplies
q rows i-u by k rows j-u, the same tile offset by u on both axes, so a tile
reads a (w-1)-row halo of q and k above it. The online softmax and the value
product run at width d, and nothing of size T x T reaches memory.

Backward, FlashAttention-2 style: the forward saves lse[i] = logsumexp_j score[i, j];
one program per key tile walks the query tiles at and below the diagonal and recomputes

    P   = exp(score - lse)                 dV[j]       += sum_i P[i, j] dO[i]
    dP  = dO V^T                           dS'[i, j]    = P[i, j] (dP[i, j] - delta[i]),  delta[i] = dO[i] . O[i]

then, per lag u, with G_u[i] = sum_j dS'[i, j] k[j-u]:

    dQ[i-u] += a_u scale G_u[i]            dK[j-u] += a_u scale sum_i dS'[i, j] q[i-u]
    da[h, u] += sum_{i,j} dS'[i, j] S[i-u, j-u] = scale sum_i q[i-u] . G_u[i]

A shifted row i-u or j-u may belong to a neighbouring tile, so dQ and dK
accumulate with fp32 atomic adds; dV rows belong to the program alone.

Cost per tile: w score products + 1 value product forward, 3w + 2 backward
(w = 1 is FlashAttention's 2 and 5). The shifts are reloads of the same q and
k rows, so memory traffic stays attention's and no (T, d*w) lag-stacked tensor
is built, but the score work is d*w multiply-adds per pair, as with lag
stacking; the d + w form (one halo tile, its shifts summed on chip) is not
what this kernel does.

Inputs may be fp32, fp16 or bf16; every product accumulates in fp32. fp32
products run on tensor cores as three TF32 products (tf32x3, near fp32 accuracy):
plain TF32 would cost fp32 its accuracy, and IEEE products unroll into scalar
FMAs that take ptxas minutes to compile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_WINDOW = 8
MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_rows(base, rows, dims, T, HEAD_DIM: tl.constexpr):
    """x[rows, :HEAD_DIM] of a row-major (T, HEAD_DIM) matrix, zero outside 0 <= row < T."""
    mask = ((rows >= 0) & (rows < T))[:, None] & (dims < HEAD_DIM)[None, :]
    return tl.load(base + rows[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _scores(q_base, k_base, a_base, rows, cols, dims, T, scale,
            HEAD_DIM: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """score[rows, cols] = sum_u a_u S[rows-u, cols-u]: (BLOCK_M, BLOCK_N) fp32.

    The u-th term multiplies the q tile and the k tile both moved up by u rows.
    """
    score = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for u in tl.static_range(W):
        q_u = _load_rows(q_base, rows - u, dims, T, HEAD_DIM)
        k_u = _load_rows(k_base, cols - u, dims, T, HEAD_DIM)
        score += tl.load(a_base + u).to(tl.float32) * tl.dot(q_u, tl.trans(k_u), input_precision=PRECISION)
    return score * scale


@triton.jit
def _forward_kernel(Q, K, V, A, Out, Lse, T, N_HEAD, scale,
                    HEAD_DIM: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (query tile, batch x head): out and lse of BLOCK_M query rows."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offset = bh.to(tl.int64) * T * HEAD_DIM
    q_base, k_base, v_base = Q + offset, K + offset, V + offset
    a_base = A + (bh % N_HEAD) * W
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    end = tl.minimum((pid_m + 1) * BLOCK_M, T)  # key tiles at or below the diagonal
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        score = _scores(q_base, k_base, a_base, rows, cols, dims, T, scale,
                        HEAD_DIM, W, PRECISION, BLOCK_M, BLOCK_N)
        causal = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T)
        score = tl.where(causal, score, float("-inf"))
        # Column 0 lies in the first tile, so every row's max is finite from the start.
        m_new = tl.maximum(m_i, tl.max(score, axis=1))
        p = tl.exp(score - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(v_base, cols, dims, T, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    mask = (rows < T)[:, None] & (dims < HEAD_DIM)[None, :]
    tl.store(Out + offset + rows[:, None] * HEAD_DIM + dims[None, :], out.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + bh.to(tl.int64) * T + rows, m_i + tl.log(l_i), mask=rows < T)


@triton.jit
def _backward_kernel(Q, K, V, A, DO, Lse, Delta, DQ, DK, DV, DA, T, N_HEAD, scale,
                     HEAD_DIM: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (key tile, batch x head): dV of its rows, atomic dQ, dK and da contributions."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    offset = bh.to(tl.int64) * T * HEAD_DIM
    q_base, k_base, v_base, do_base = Q + offset, K + offset, V + offset, DO + offset
    head = bh % N_HEAD
    a_base = A + head * W
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    lags = tl.arange(0, W_PAD)

    v = _load_rows(v_base, cols, dims, T, HEAD_DIM)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # lag 0's share of dK[cols]
    da = tl.zeros((W_PAD,), dtype=tl.float32)
    for start_m in range((pid_n * BLOCK_N) // BLOCK_M * BLOCK_M, T, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        score = _scores(q_base, k_base, a_base, rows, cols, dims, T, scale,
                        HEAD_DIM, W, PRECISION, BLOCK_M, BLOCK_N)
        lse = tl.load(Lse + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(Delta + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        causal = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T) & (rows[:, None] < T)
        p = tl.where(causal, tl.exp(score - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        do = _load_rows(do_base, rows, dims, T, HEAD_DIM)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # dS' = d loss / d score, zero off the causal triangle
        ds_in = ds.to(Q.dtype.element_ty)
        for u in tl.static_range(W):
            q_u = _load_rows(q_base, rows - u, dims, T, HEAD_DIM)
            k_u = _load_rows(k_base, cols - u, dims, T, HEAD_DIM)
            ds_k = tl.dot(ds_in, k_u, input_precision=PRECISION)  # sum_j dS'[i, j] k[j-u]
            # da_u = sum_ij dS'[i, j] S[i-u, j-u] = scale * sum_i q[i-u] . ds_k[i]: no product of its own.
            da += tl.where(lags == u, scale * tl.sum(tl.sum(q_u.to(tl.float32) * ds_k, axis=1), axis=0), 0.0)
            a_u = tl.load(a_base + u).to(tl.float32) * scale
            q_rows = rows - u
            tl.atomic_add(DQ + offset + q_rows[:, None] * HEAD_DIM + dims[None, :], a_u * ds_k,
                          mask=((q_rows >= 0) & (q_rows < T))[:, None] & (dims < HEAD_DIM)[None, :])
            dk_u = a_u * tl.dot(tl.trans(ds_in), q_u, input_precision=PRECISION)  # rows j-u
            if u == 0:
                dk += dk_u
            else:
                k_rows = cols - u
                tl.atomic_add(DK + offset + k_rows[:, None] * HEAD_DIM + dims[None, :], dk_u,
                              mask=((k_rows >= 0) & (k_rows < T))[:, None] & (dims < HEAD_DIM)[None, :])

    mask = (cols < T)[:, None] & (dims < HEAD_DIM)[None, :]
    tl.store(DV + offset + cols[:, None] * HEAD_DIM + dims[None, :], dv.to(DV.dtype.element_ty), mask=mask)
    # Key tiles to the right add their lags' shares to these rows too.
    tl.atomic_add(DK + offset + cols[:, None] * HEAD_DIM + dims[None, :], dk, mask=mask)
    tl.atomic_add(DA + head * W + lags, da, mask=lags < W)


def launch_config(head_dim: int, window: int) -> dict[str, int]:
    """Tile sizes and pipelining for one (d, w).

    tl.dot needs every side >= 16, and d pads to a power of two. Software
    pipelining keeps each stage's loaded tiles in shared memory, and a tile
    here loads w q and w k tiles besides v: with w > 1 one stage keeps a wide
    window inside H100's 227 KB.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    block = 64 if block_d <= 64 else 32
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=4, num_stages=2 if window == 1 else 1)


def _precision(q: Tensor) -> str:
    """tl.dot's input_precision: tf32x3 for fp32 (see the module docstring); 16-bit inputs ignore it."""
    return "tf32x3" if q.dtype == torch.float32 else "tf32"


def forward(q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, T, d) in q's dtype, lse (B, H, T) fp32) for contiguous inputs."""
    B, H, T, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    config = launch_config(d, lag_weight.size(1))
    _forward_kernel[(triton.cdiv(T, config["BLOCK_M"]), B * H)](
        q, k, v, lag_weight, out, lse, T, H, scale,
        HEAD_DIM=d, W=lag_weight.size(1), PRECISION=_precision(q), **config,
    )
    return out, lse


def backward(
    q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d lag_weight) for contiguous inputs, each in its input's dtype."""
    B, H, T, d = q.shape
    w = lag_weight.size(1)
    delta = (out.float() * grad_out.float()).sum(-1)  # (B, H, T): delta[i] = dO[i] . O[i]
    dq = torch.zeros(B, H, T, d, device=q.device, dtype=torch.float32)
    dk = torch.zeros_like(dq)
    dv = torch.empty_like(v)
    da = torch.zeros(H, w, device=q.device, dtype=torch.float32)
    config = launch_config(d, w)
    _backward_kernel[(triton.cdiv(T, config["BLOCK_N"]), B * H)](
        q, k, v, lag_weight, grad_out, lse, delta, dq, dk, dv, da, T, H, scale,
        HEAD_DIM=d, W=w, W_PAD=triton.next_power_of_2(w), PRECISION=_precision(q), **config,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv, da.to(lag_weight.dtype)
