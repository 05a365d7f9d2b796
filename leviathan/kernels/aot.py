"""Ahead-of-time compilation of the shifted-diagonal kernels for a GPU architecture, on any machine.

Triton's interpreter checks the kernels' arithmetic on CPU but never lowers
them, so shapes or constructs that only the GPU compiler rejects would first
fail on a GPU. Triton ships ptxas, so the full pipeline (Triton IR, LLVM,
PTX, cubin) runs here without a device: `compile_kernels` does that for a
target such as sm_90 (H100/H200). With TRITON_DUMP_PTXAS_LOG=1 and
PTXAS_OPTIONS=-v, ptxas prints each kernel's registers and spills:

    TRITON_DUMP_PTXAS_LOG=1 PTXAS_OPTIONS=-v python -m leviathan.kernels.aot [128x64/8w/2s ...]
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import shifted_diagonal as kernel

# Triton's names for the kernel input dtypes.
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
INT_ARGS = {"T": "i32", "N_HEAD": "i32", "scale": "fp32"}


def _signature(pointers: dict[str, str], constants: dict[str, object]) -> dict[str, str]:
    return {**{name: f"*{t}" for name, t in pointers.items()}, **INT_ARGS, **{name: "constexpr" for name in constants}}


def _sources(dtype: str, head_dim: int, window: int, tiles: kernel.Tiles) -> dict[str, ASTSource]:
    """The forward and backward kernels with the constants `forward`/`backward` launch them with."""
    t = DTYPE_NAMES[dtype]
    forward = {"Q": t, "K": t, "V": t, "A": "fp32", "Out": t, "Lse": "fp32", "Scratch": "fp32"}
    backward = {"Q": t, "K": t, "V": t, "A": "fp32", "DO": t, "Lse": "fp32", "Delta": "fp32", "DQ": "fp32",
                "DK": t, "DV": t, "DA": "fp32", "Scratch": "fp32"}
    sources = {}
    for name, fn, pointers in (("forward", kernel._forward_kernel, forward),
                               ("backward", kernel._backward_kernel, backward)):
        constants = kernel.kernel_constants(getattr(torch, dtype), head_dim, window, name == "backward", tiles)
        sources[name] = ASTSource(fn, _signature(pointers, constants), constexprs=constants)
    return sources


def compile_kernels(cases: Sequence[tuple[str, int, int]], arch: int = 90,
                    tiles: kernel.Tiles = kernel.DEFAULT_TILES) -> list[dict[str, object]]:
    """Compile forward and backward for each (dtype, head dim, window) to a cubin for sm_`arch`,
    with the launch setting `tiles`.

    Returns one row per kernel: its case, shared memory in bytes and compile seconds.
    Raises whatever the compiler raises for a kernel that does not lower.
    """
    rows = []
    for dtype, head_dim, window in cases:
        for name, source in _sources(dtype, head_dim, window, tiles).items():
            start = time.perf_counter()
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=kernel.launch_options(tiles))
            rows.append({"kernel": name, "dtype": dtype, "d": head_dim, "w": window, "arch": f"sm_{arch}",
                         "tiles": tiles.name(),
                         "shared_bytes": compiled.metadata.shared, "has_cubin": bool(compiled.asm.get("cubin")),
                         "compile_s": round(time.perf_counter() - start, 2)})
    return rows


CASES = (("bfloat16", 64, 1), ("bfloat16", 64, 4), ("bfloat16", 64, 8), ("bfloat16", 128, 8), ("float32", 64, 4))

if __name__ == "__main__":
    # python -m leviathan.kernels.aot [TILES ...], e.g. 128x64/8w/2s: the default setting when none is named.
    settings = [kernel.Tiles.parse(t) for t in sys.argv[1:]] or [kernel.DEFAULT_TILES]
    print(json.dumps([row for tiles in settings for row in compile_kernels(CASES, tiles=tiles)], indent=1))
