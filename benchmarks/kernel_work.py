"""The work the Triton shifted-diagonal kernel does, counted (not timed) on CPU.

    python benchmarks/kernel_work.py [--seq 1024] [--head-dim 64] [--windows 1,2,4,8] [--out result.json]

The kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set here) with
its `tl.dot`, loads and stores counted: multiply-adds of every tile product, and
bytes read and written (masked-off elements excluded), split into the
inputs (q, k, v, dO) and the rest (the scratch rings, outputs, lse, delta).
The forward at w = 1 is FlashAttention's (the same causal tile pairs, two
products each, no scratch), and FlashAttention-2's backward does five products
over the same pairs, so `*_macs_over_flash` is the product work against
attention's. (The backward keeps its halo rings at w = 1 too; the model runs
w = 1 through SDPA.) A lag-stacked flash kernel's ratios, (w + 1) / 2 forward
and (3w + 2) / 5 backward (its score, dK and dQ products run at width d*w), are
printed beside them.
Counts, not times: they hold on any machine, and a GPU run
(`benchmarks/gpu_check.py`) says what they cost there.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import emit_report, machine_info  # noqa: E402
from leviathan.kernels.ops import shifted_diagonal_backward, shifted_diagonal_forward  # noqa: E402

COUNTS: Counter = Counter()
INPUT_RANGES: list[tuple[int, int]] = []  # [start, end) byte addresses of q, k, v, dO


def _is_input(addresses: np.ndarray) -> np.ndarray:
    hit = np.zeros(addresses.shape, dtype=bool)
    for start, end in INPUT_RANGES:
        hit |= (addresses >= start) & (addresses < end)
    return hit


def _count_memory(kind: str, ptrs, mask) -> None:
    live = np.broadcast_to(mask.data, ptrs.data.shape)
    itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
    from_inputs = _is_input(ptrs.data)
    COUNTS[f"{kind}_input_bytes"] += int((live & from_inputs).sum()) * itemsize
    COUNTS[f"{kind}_other_bytes"] += int((live & ~from_inputs).sum()) * itemsize


def _instrument() -> None:
    """Wrap the interpreter's dot, load and store with counters."""
    builder = interpreter.InterpreterBuilder
    dot, load, store = builder.create_dot, builder.create_masked_load, builder.create_masked_store

    def counted_dot(self, a, b, d, *args):
        (m, k), n = a.data.shape[-2:], b.data.shape[-1]
        COUNTS["macs"] += m * n * k
        return dot(self, a, b, d, *args)

    def counted_load(self, ptrs, mask, other, *args):
        _count_memory("read", ptrs, mask)
        return load(self, ptrs, mask, other, *args)

    def counted_store(self, ptrs, value, mask, *args):
        _count_memory("written", ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    builder.create_dot, builder.create_masked_load, builder.create_masked_store = counted_dot, counted_load, counted_store


def count(T: int, d: int, w: int, heads: int) -> dict[str, int]:
    """Forward and backward counts of one (1, heads, T, d) fp32 call."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, heads, T, d, generator=gen) for _ in range(4))
    lag_weight = torch.randn(heads, w, generator=gen)
    INPUT_RANGES[:] = [(x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()) for x in (q, k, v, grad_out)]
    out = {}
    COUNTS.clear()
    o, lse = shifted_diagonal_forward(q, k, v, lag_weight, d**-0.5)
    out.update({f"forward_{name}": n for name, n in COUNTS.items()})
    COUNTS.clear()
    shifted_diagonal_backward(q, k, v, lag_weight, o, lse, grad_out, d**-0.5)
    out.update({f"backward_{name}": n for name, n in COUNTS.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--windows", default="1,2,4,8")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    windows = sorted({1, *(int(w) for w in args.windows.split(","))})
    _instrument()
    rows = {w: count(args.seq, args.head_dim, w, args.heads) for w in windows}
    flash_forward = rows[1]["forward_macs"]
    flash_backward = flash_forward * 5 // 2
    for w, row in rows.items():
        row["forward_macs_over_flash"] = round(row["forward_macs"] / flash_forward, 3)
        row["backward_macs_over_flash"] = round(row["backward_macs"] / flash_backward, 3)
        row["lag_stacked_forward_macs_over_flash"] = (w + 1) / 2
        row["lag_stacked_backward_macs_over_flash"] = (3 * w + 2) / 5
    report = {
        "benchmark": "kernel_work",
        "machine": machine_info(torch=torch.__version__),
        "setup": {"T": args.seq, "d": args.head_dim, "heads": args.heads, "dtype": "float32 (interpreter)",
                  "flash_forward_macs": flash_forward, "flash_backward_macs": flash_backward},
        "windows": {f"w{w}": row for w, row in rows.items()},
    }
    return emit_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
