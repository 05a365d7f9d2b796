"""Shifted-diagonal correlation as a flash-style Triton kernel (forward and backward).

Per head h, with lag weights a[h, u] (u < w) and S = (q k^T) * scale, where
q, k = 0 before position 0:

    score[i, j] = sum_{u<w} a[h,u] * S[i-u, j-u]                  (causal: j <= i)
    out[i]      = sum_{j<=i} softmax_j(score[i, :]) v[j]

The causal mask never cuts a shift: j <= i implies j-u <= i-u. So a score tile
(rows i, columns j) is w diagonal shifts of one S tile with a (w-1)-row and
-column halo above and to the left of it. The kernel computes that S tile
once, with q and k at width d, and sums its shifts: d + w multiply-adds per
query-key pair, where lag stacking pays d*w.

The halo is HALO = 16 rows and columns (>= w - 1 for w <= 8, and tl.dot's
smallest side). Triton cannot shift a register tile along its diagonal, so
each program writes its S tile into a private fp32 scratch tile (a few tens
of KB, read back at once, so it stays in L1/L2) and reads the w shifted views
back from it; a barrier orders the writes before the reads. The scratch is a
ring over the walked axis: a tile's left halo (forward) or upper halo
(backward) is the previous tile's edge, already in the ring, so only the
other halo costs a product of its own.

Forward, one program per query tile (BLOCK_M rows), walking key tiles left to
right: per key tile it multiplies q rows [i0-HALO, i0+BLOCK_M) by one k tile
(the HALO extra rows are the halo's cost, HALO/BLOCK_M of the score work),
sums the shifts, and runs the online softmax with v at width d. It saves
lse[i] = logsumexp_j score[i, j].

Backward, FlashAttention-2 style, one program per key tile C (BLOCK_N columns),
walking query tiles down from the diagonal. With P = exp(score - lse),
dP = dO V^T and dS' = P (dP - delta), delta[i] = dO[i] . O[i]:

    dS[i, j]  = sum_u a_u dS'[i+u, j+u]              (the adjoint shift, a halo below and right)
    dQ = dS K scale,   dK = dS^T Q scale,   dV = P^T dO,   da_u = sum_ij dS'[i, j] S[i-u, j-u]

Per query tile the program extends two rings by BLOCK_M rows: S (columns
C +- HALO) and dS' (columns C and HALO to the right). The rows lead the tile
by HALO, so the rings already hold the lower halo that dS needs. dK and dV
rows belong to the program; dQ rows are shared by key tiles and accumulate
with fp32 atomic adds. Score-sized products per tile: forward 1 + HALO/BLOCK_M
and the value product (FlashAttention: 1 and 1); backward S over BLOCK_N + 2 HALO
columns, dP over BLOCK_N + HALO, then dV, dK and dQ (FlashAttention: 5 of BLOCK_N);
plus w scratch reads per pair for each shift sum. At w = 1 no scratch is used.

Each program owns its scratch, allocated per launch: forward (64+16) x (64+16)
fp32 per query tile, backward (64+32)^2 + (64+16)^2 per key tile, about 1 KB
per row and head (8x the bytes of a bf16 q row at d = 64), freed after the call.
The shift sums read 4 bytes per pair per lag from L1/L2, so on a GPU the kernel
may be bound by that traffic rather than by the products; only a GPU run says.

Inputs may be fp32, fp16 or bf16; every product accumulates in fp32. fp32
products run on tensor cores as three TF32 products (tf32x3, near fp32 accuracy):
plain TF32 would cost fp32 its accuracy, and IEEE products unroll into scalar
FMAs that take ptxas minutes to compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_WINDOW = 8
MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALO = 16  # >= MAX_WINDOW - 1, and tl.dot's smallest side


@triton.jit
def _load_rows(base, rows, dims, T, HEAD_DIM: tl.constexpr):
    """x[rows, :HEAD_DIM] of a row-major (T, HEAD_DIM) matrix, zero outside 0 <= row < T."""
    mask = ((rows >= 0) & (rows < T))[:, None] & (dims < HEAD_DIM)[None, :]
    return tl.load(base + rows[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _forward_kernel(Q, K, V, A, Out, Lse, Scratch, T, N_HEAD, scale,
                    HEAD_DIM: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HALO: tl.constexpr):
    """One program per (query tile, batch x head): out and lse of BLOCK_M query rows."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offset = bh.to(tl.int64) * T * HEAD_DIM
    q_base, k_base, v_base = Q + offset, K + offset, V + offset
    a_base = A + (bh % N_HEAD) * W
    tile = tl.arange(0, BLOCK_M)
    rows = pid_m * BLOCK_M + tile
    dims = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, rows, dims, T, HEAD_DIM)
    a_0 = tl.load(a_base).to(tl.float32)

    # Scratch: rows [i0-HALO, i0+BLOCK_M) of S; columns on a ring of BLOCK_N + HALO slots,
    # so the previous key tile's last HALO columns (this tile's left halo) are still there.
    RING: tl.constexpr = BLOCK_N + HALO
    halo = tl.arange(0, HALO)
    q_top = _load_rows(q_base, pid_m * BLOCK_M - HALO + halo, dims, T, HEAD_DIM)
    ring = Scratch + (pid_m + tl.num_programs(0) * bh).to(tl.int64) * (HALO + BLOCK_M) * RING

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    end = tl.minimum((pid_m + 1) * BLOCK_M, T)  # key tiles at or below the diagonal
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, cols, dims, T, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # S[rows, cols]
        score = a_0 * s
        if W > 1:
            s_top = tl.dot(q_top, tl.trans(k), input_precision=PRECISION) * scale  # S[i0-HALO:i0, cols]
            slots = (cols % RING)[None, :]
            tl.debug_barrier()  # the previous key tile's reads of these slots are done
            tl.store(ring + halo[:, None] * RING + slots, s_top)
            tl.store(ring + (HALO + tile)[:, None] * RING + slots, s)
            tl.debug_barrier()
            for u in tl.static_range(1, W):
                src = cols - u  # >= -HALO; columns before 0 are zero
                shifted = tl.load(ring + (HALO + tile - u)[:, None] * RING + ((src + RING) % RING)[None, :],
                                  mask=(src >= 0)[None, :], other=0.0)
                score += tl.load(a_base + u).to(tl.float32) * shifted
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
def _store_scores(s_ring, q_base, rows, dims, k_left, k, k_right, T, scale,
                  HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, RING_S: tl.constexpr,
                  BLOCK_N: tl.constexpr, HALO: tl.constexpr):
    """S[rows, c0-HALO : c0+BLOCK_N+HALO] into the S ring (row slot = row mod RING_S)."""
    q = _load_rows(q_base, rows, dims, T, HEAD_DIM)
    width: tl.constexpr = BLOCK_N + 2 * HALO
    base = s_ring + ((rows + RING_S) % RING_S)[:, None] * width
    halo = tl.arange(0, HALO)[None, :]
    main = tl.arange(0, BLOCK_N)[None, :]
    tl.store(base + halo, tl.dot(q, tl.trans(k_left), input_precision=PRECISION) * scale)
    tl.store(base + HALO + main, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale)
    tl.store(base + HALO + BLOCK_N + halo, tl.dot(q, tl.trans(k_right), input_precision=PRECISION) * scale)


@triton.jit
def _shift_sum(s_ring, a_base, rows, ext_cols, RING_S: tl.constexpr, WIDTH: tl.constexpr, W: tl.constexpr):
    """score[rows, cols] = sum_u a_u S[rows-u, cols-u], with ext_cols = cols - (c0 - HALO)."""
    score = tl.zeros((rows.shape[0], ext_cols.shape[0]), dtype=tl.float32)
    for u in tl.static_range(W):
        slots = ((rows - u + RING_S) % RING_S)[:, None] * WIDTH
        score += tl.load(a_base + u).to(tl.float32) * tl.load(s_ring + slots + (ext_cols - u)[None, :])
    return score


@triton.jit
def _score_grads(s_ring, d_ring, a_base, do_base, lse_base, delta_base, rows, c0, dims, v, v_right, T,
                 HEAD_DIM: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, PRECISION: tl.constexpr,
                 RING_S: tl.constexpr, RING_D: tl.constexpr, BLOCK_N: tl.constexpr, HALO: tl.constexpr):
    """dS' = P (dP - delta) on rows x [c0, c0+BLOCK_N+HALO) into the dS' ring.

    Returns these rows' shares of dV[c0 : c0+BLOCK_N] (P^T dO) and of da
    (sum over the key tile's own columns of dS'[i, j] S[i-u, j-u]); the HALO
    columns to the right belong to the next key tile's shares.
    """
    S_WIDTH: tl.constexpr = BLOCK_N + 2 * HALO
    D_WIDTH: tl.constexpr = BLOCK_N + HALO
    main = tl.arange(0, BLOCK_N)
    right = tl.arange(0, HALO)
    lse = tl.load(lse_base + rows, mask=rows < T, other=0.0)
    delta = tl.load(delta_base + rows, mask=rows < T, other=0.0)
    do = _load_rows(do_base, rows, dims, T, HEAD_DIM)
    d_slots = ((rows + RING_D) % RING_D)[:, None] * D_WIDTH

    # The key tile's own columns.
    cols = c0 + main
    score = _shift_sum(s_ring, a_base, rows, HALO + main, RING_S, S_WIDTH, W)
    live = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T) & (rows[:, None] < T)
    p = tl.where(live, tl.exp(score - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
    tl.store(d_ring + d_slots + main[None, :], ds)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    lags = tl.arange(0, W_PAD)
    da = tl.zeros((W_PAD,), dtype=tl.float32)
    for u in tl.static_range(W):
        s_slots = ((rows - u + RING_S) % RING_S)[:, None] * S_WIDTH
        s_shifted = tl.load(s_ring + s_slots + (HALO + main - u)[None, :])  # S[i-u, j-u]
        da += tl.where(lags == u, tl.sum(tl.sum(ds * s_shifted, axis=1), axis=0), 0.0)

    # The HALO columns to the right, for the adjoint shift of the own columns.
    cols = c0 + BLOCK_N + right
    score = _shift_sum(s_ring, a_base, rows, HALO + BLOCK_N + right, RING_S, S_WIDTH, W)
    live = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T) & (rows[:, None] < T)
    p = tl.where(live, tl.exp(score - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v_right), input_precision=PRECISION) - delta[:, None])
    tl.store(d_ring + d_slots + (BLOCK_N + right)[None, :], ds)
    return dv, da


@triton.jit
def _backward_kernel(Q, K, V, A, DO, Lse, Delta, DQ, DK, DV, DA, Scratch, T, N_HEAD, scale,
                     HEAD_DIM: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HALO: tl.constexpr):
    """One program per (key tile, batch x head): dK, dV of its rows, its share of da, atomic dQ."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    offset = bh.to(tl.int64) * T * HEAD_DIM
    q_base, k_base, v_base, do_base = Q + offset, K + offset, V + offset, DO + offset
    lse_base, delta_base = Lse + bh.to(tl.int64) * T, Delta + bh.to(tl.int64) * T
    head = bh % N_HEAD
    a_base = A + head * W
    c0 = pid_n * BLOCK_N
    main = tl.arange(0, BLOCK_N)
    halo = tl.arange(0, HALO)
    cols = c0 + main
    dims = tl.arange(0, BLOCK_D)
    k = _load_rows(k_base, cols, dims, T, HEAD_DIM)
    k_left = _load_rows(k_base, c0 - HALO + halo, dims, T, HEAD_DIM)
    k_right = _load_rows(k_base, c0 + BLOCK_N + halo, dims, T, HEAD_DIM)
    v = _load_rows(v_base, cols, dims, T, HEAD_DIM)
    v_right = _load_rows(v_base, c0 + BLOCK_N + halo, dims, T, HEAD_DIM)

    # Rings of rows: S over columns [c0-HALO, c0+BLOCK_N+HALO), dS' over [c0, c0+BLOCK_N+HALO).
    RING_S: tl.constexpr = BLOCK_M + 2 * HALO
    RING_D: tl.constexpr = BLOCK_M + HALO
    D_WIDTH: tl.constexpr = BLOCK_N + HALO
    s_ring = Scratch + (pid_n + tl.num_programs(0) * bh).to(tl.int64) * (RING_S * (BLOCK_N + 2 * HALO) + RING_D * D_WIDTH)
    d_ring = s_ring + RING_S * (BLOCK_N + 2 * HALO)

    # Query rows below the first tile at the diagonal see none of these keys (i < c0 <= j).
    r0 = c0 // BLOCK_M * BLOCK_M
    # Prime the rings: S rows [r0-HALO, r0+HALO), then dS' rows [r0, r0+HALO).
    _store_scores(s_ring, q_base, r0 - HALO + tl.arange(0, 2 * HALO), dims, k_left, k, k_right, T, scale,
                  HEAD_DIM, PRECISION, RING_S, BLOCK_N, HALO)
    tl.debug_barrier()
    dv, da = _score_grads(s_ring, d_ring, a_base, do_base, lse_base, delta_base, r0 + halo, c0, dims, v, v_right, T,
                          HEAD_DIM, W, W_PAD, PRECISION, RING_S, RING_D, BLOCK_N, HALO)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    tile = tl.arange(0, BLOCK_M)
    for start_m in range(r0, T, BLOCK_M):
        # Extend both rings by the BLOCK_M rows that lead this tile by HALO.
        lead = start_m + HALO + tile
        tl.debug_barrier()  # the previous tile's reads of the slots about to be reused are done
        _store_scores(s_ring, q_base, lead, dims, k_left, k, k_right, T, scale,
                      HEAD_DIM, PRECISION, RING_S, BLOCK_N, HALO)
        tl.debug_barrier()
        dv_lead, da_lead = _score_grads(s_ring, d_ring, a_base, do_base, lse_base, delta_base, lead, c0, dims, v,
                                        v_right, T, HEAD_DIM, W, W_PAD, PRECISION, RING_S, RING_D, BLOCK_N, HALO)
        dv += dv_lead
        da += da_lead
        tl.debug_barrier()

        # dS[rows, cols] = sum_u a_u dS'[rows+u, cols+u]: the ring holds rows [start_m, start_m+BLOCK_M+HALO).
        rows = start_m + tile
        ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for u in tl.static_range(W):
            slots = ((rows + u) % RING_D)[:, None] * D_WIDTH
            ds += tl.load(a_base + u).to(tl.float32) * tl.load(d_ring + slots + (main + u)[None, :])
        ds_in = (ds * scale).to(Q.dtype.element_ty)
        q = _load_rows(q_base, rows, dims, T, HEAD_DIM)
        dk += tl.dot(tl.trans(ds_in), q, input_precision=PRECISION)
        dq = tl.dot(ds_in, k, input_precision=PRECISION)
        # Relaxed: dQ is only read after the kernel ends, so the adds need atomicity, not ordering.
        tl.atomic_add(DQ + offset + rows[:, None] * HEAD_DIM + dims[None, :], dq,
                      mask=(rows < T)[:, None] & (dims < HEAD_DIM)[None, :], sem="relaxed")

    mask = (cols < T)[:, None] & (dims < HEAD_DIM)[None, :]
    tl.store(DV + offset + cols[:, None] * HEAD_DIM + dims[None, :], dv.to(DV.dtype.element_ty), mask=mask)
    tl.store(DK + offset + cols[:, None] * HEAD_DIM + dims[None, :], dk.to(DK.dtype.element_ty), mask=mask)
    lags = tl.arange(0, W_PAD)
    tl.atomic_add(DA + head * W + lags, da, mask=lags < W, sem="relaxed")


@dataclass(frozen=True)
class Tiles:
    """One launch setting: query and key tile rows, warps and software-pipelining stages."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 1

    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}/{self.num_warps}w/{self.num_stages}s"

    @classmethod
    def parse(cls, text: str) -> "Tiles":
        """The inverse of `name`: "128x64/8w/2s" -> Tiles(128, 64, 8, 2)."""
        try:
            tiles, warps, stages = text.split("/")
            m, n = tiles.split("x")
            return cls(int(m), int(n), int(warps.removesuffix("w")), int(stages.removesuffix("s")))
        except ValueError:
            raise ValueError(f"tiles: expected MxN/Ww/Ss such as 64x64/8w/1s, got {text!r}") from None


# The launch setting per compute capability (major * 10 + minor); others take DEFAULT_TILES.
# sm_90 (H100/H200) keeps 64x64 tiles, eight warps, one stage until a GPU times the others:
# compiled for sm_90 here (`python -m leviathan.kernels.aot SETTING`, ptxas -v; bf16, d = 40,
# w = 4), every setting uses 255 registers per thread and it spills least. Spill stores,
# forward / backward: 64x64/8w/1s 24 B / 160 B; 128x64/8w/2s and /3s 276 B / 2,196 B (71,680 B
# shared in the backward, against 47,104); 64x64/4w/2s and /3s 588 B / 3,324 B. Two and three
# stages compile alike: the barriers around the scratch rings leave the loop nothing to pipeline.
# `benchmarks/gpu_check.py`'s kernel_sweep times them on the device and names the fastest
# accurate one to put here.
DEFAULT_TILES = Tiles()
TILES_BY_ARCH: dict[int, Tiles] = {90: DEFAULT_TILES}


def tiles_for(device: torch.device) -> Tiles:
    """The launch setting for the device's architecture (the interpreter's CPU takes the default)."""
    if device.type != "cuda":
        return DEFAULT_TILES
    major, minor = torch.cuda.get_device_capability(device)
    return TILES_BY_ARCH.get(major * 10 + minor, DEFAULT_TILES)


def launch_config(head_dim: int, tiles: Tiles = DEFAULT_TILES) -> dict[str, int]:
    """Tile sizes for one head dim.

    tl.dot needs every side >= 16, and d pads to a power of two. 64-row tiles
    keep the halo at a quarter of the forward's score rows; at d = 128 the key
    tile halves so the backward's k, v and halo tiles fit in registers and
    shared memory.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = tiles.block_n if block_d <= 64 else min(tiles.block_n, 32)
    return dict(BLOCK_M=tiles.block_m, BLOCK_N=block_n, BLOCK_D=block_d)


def launch_options(tiles: Tiles = DEFAULT_TILES) -> dict[str, int]:
    return dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


LAUNCH_OPTIONS = launch_options(DEFAULT_TILES)


def kernel_constants(dtype: torch.dtype, head_dim: int, window: int, backward: bool,
                     tiles: Tiles = DEFAULT_TILES) -> dict[str, object]:
    """The constexpr arguments `forward` or `backward` launches its kernel with.

    tl.dot's input_precision is tf32x3 for fp32 (see the module docstring); 16-bit inputs ignore it.
    """
    constants = dict(HEAD_DIM=head_dim, W=window, PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
                     HALO=HALO, **launch_config(head_dim, tiles))
    if backward:
        constants["W_PAD"] = triton.next_power_of_2(window)
    return constants


def forward(q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, scale: float, tiles: Tiles | None = None,
            compiled: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
    """(out (B, H, T, d) in q's dtype, lse (B, H, T) fp32) for contiguous inputs.

    tiles: the launch setting (default: `tiles_for(q.device)`); compiled: when given, receives
    the launched kernel (registers, spills, shared memory) under "forward".
    """
    B, H, T, d = q.shape
    w = lag_weight.size(1)
    tiles = tiles or tiles_for(q.device)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    config = launch_config(d, tiles)
    grid = (triton.cdiv(T, config["BLOCK_M"]), B * H)
    ring = (HALO + config["BLOCK_M"]) * (config["BLOCK_N"] + HALO) if w > 1 else 1
    scratch = torch.empty(grid[0] * grid[1] * ring, device=q.device, dtype=torch.float32)
    handle = _forward_kernel[grid](
        q, k, v, lag_weight, out, lse, scratch, T, H, scale, **kernel_constants(q.dtype, d, w, False, tiles),
        **launch_options(tiles),
    )
    if compiled is not None:
        compiled["forward"] = handle
    return out, lse


def backward(
    q: Tensor, k: Tensor, v: Tensor, lag_weight: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, scale: float,
    tiles: Tiles | None = None, compiled: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d lag_weight) for contiguous inputs, each in its input's dtype (tiles, compiled: as `forward`)."""
    B, H, T, d = q.shape
    w = lag_weight.size(1)
    tiles = tiles or tiles_for(q.device)
    delta = (out.float() * grad_out.float()).sum(-1)  # (B, H, T): delta[i] = dO[i] . O[i]
    dq = torch.zeros(B, H, T, d, device=q.device, dtype=torch.float32)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    da = torch.zeros(H, w, device=q.device, dtype=torch.float32)
    config = launch_config(d, tiles)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    grid = (triton.cdiv(T, block_n), B * H)
    rings = (block_m + 2 * HALO) * (block_n + 2 * HALO) + (block_m + HALO) * (block_n + HALO)
    scratch = torch.empty(grid[0] * grid[1] * rings, device=q.device, dtype=torch.float32)
    handle = _backward_kernel[grid](
        q, k, v, lag_weight, grad_out, lse, delta, dq, dk, dv, da, scratch, T, H, scale,
        **kernel_constants(q.dtype, d, w, True, tiles), **launch_options(tiles),
    )
    if compiled is not None:
        compiled["backward"] = handle
    return dq.to(q.dtype), dk, dv, da.to(lag_weight.dtype)
