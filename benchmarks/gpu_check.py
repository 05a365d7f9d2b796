"""Device check for one GPU that runs on the machine as it is: torch, Triton, numpy and pyarrow only.

    python3 benchmarks/gpu_check.py --out gpu-check            # on the GPU machine, no install step
    python3 benchmarks/gpu_check.py --cpu --out /tmp/check     # smoke test here: tiny sizes, Triton's interpreter

Nothing on its path imports Ray, pydantic, FastAPI or uvicorn: the giant spec is
read with tomllib into `leviathan.config`, and the model library imports
safetensors only to save or load model folders, which this check does not.

Writes as it goes: after every section `DIR/<section>.json` and one line in
`DIR/check.log`, so a command cut off at its time limit still leaves what it
did. `--deadline-s` (default 540) skips every section still to start once it
has passed, and the long sections stop between cases; each skipped section
says "skipped: deadline". Every section records its wall time and the Triton
compile time spent inside it (the kernels' compile calls, timed).

Each section has a status: "ok" (it checked something and that held),
"failed" (with its error; the check goes on), "skipped: <why>" or
"not checked: <why>". The collectives run on a one-rank group, where they are
identities: their status is "world size 1, no traffic". A multi-rank NCCL run
and Ray Train on GPUs need a machine with Ray and two or more GPUs; this check
does not test them.

Sections, in order (the decisive ones first, the long kernel sections last):
  versions              torch, CUDA, cuDNN, NCCL, Triton, device, its dense bf16 peak
  params                the giant spec's ensemble from `leviathan.config`, built on meta
  matmul_peak           a large bf16 matmul's TFLOP/s (the MFU's achievable reference)
  kernel_accuracy       the Triton kernel against float64, forward and backward, at the
                        model's shape (d 40, w 4, 20 heads, T 512) and a T that is not a
                        multiple of the tile, bf16 and fp16
  kernel_repeatability  two forwards bitwise equal; dK, dV bitwise equal across two backwards
  member_step_triton, member_step_lag_stacked
                        a base member (B 32, T 512, bf16 autocast, AdamW) on each path:
                        ms/step, tokens/s, MFU against the nominal peak and the matmul,
                        peak allocated/reserved memory beside the estimate, the path taken
  prefill_decode        cached prefill, masked prefill and decode against the uncached forward
  merge_step            a joint ensemble step on this device (world size 1)
  checkpoint            a member and its optimiser state through torch.save, restored, compared
  collectives           the NCCL primitives on a one-rank group
  kernel_timing         triton.testing.do_bench: the kernel, flash at w = 1 and the
                        lag-stacked path the model would otherwise take, TFLOP/s each
  kernel_resources      registers, spills and shared memory of each compiled kernel
  kernel_sweep          tile/warp/stage settings, checked and timed; the fastest accurate one

`--full` widens the kernel cases (more windows, head dims and lengths, more sweep
settings). Exit status 0 when no section failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

if "--cpu" in sys.argv[1:]:
    # Triton chooses interpreted or compiled kernels when it is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GIANT_SPEC = REPO_ROOT / "jobs" / "specs" / "giant.toml"

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by the substrings of
# torch.cuda.get_device_name(). NVIDIA's datasheets quote bf16 "with sparsity",
# twice these: H100 SXM 1,979, H100 PCIe 1,513, H100 NVL 1,671; H200 SXM 1,979,
# H200 NVL 1,671 (https://www.nvidia.com/en-us/data-center/h100/ and
# https://www.nvidia.com/en-us/data-center/h200/, "Technical Specifications").
# The H100 SXM reports itself as "NVIDIA H100 80GB HBM3". Checked in order.
PEAK_DENSE_BF16_TFLOPS: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("H100", "NVL"), "H100 NVL", 835.0),
    (("H100", "PCIe"), "H100 PCIe", 756.0),
    (("H100", "HBM3"), "H100 SXM", 989.0),
    (("H100", "SXM"), "H100 SXM", 989.0),
    (("H200", "NVL"), "H200 NVL", 835.0),
    (("H200",), "H200 SXM", 989.0),
)

# Largest relative error (to the largest reference entry) accepted against float64.
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4}
SCOPE = ("one GPU, one process: a multi-rank NCCL run and Ray Train on GPUs need a machine with Ray "
         "and two or more GPUs, and this check does not test them")
NO_TRAFFIC = "world size 1, no traffic"


def peak_for(device_name: str) -> tuple[str | None, float | None]:
    """(model, dense bf16 TFLOP/s) of the exact device model, or (None, None) when unknown."""
    for parts, model, tflops in PEAK_DENSE_BF16_TFLOPS:
        if all(p in device_name for p in parts):
            return model, tflops
    return None, None


class Sizes:
    """The check's shapes: the real ones on a GPU, tiny ones for the --cpu smoke test."""

    def __init__(self, cpu: bool, full: bool):
        self.cpu = cpu
        self.preset = "tiny" if cpu else "base"
        self.batch, self.seq_len = (2, 32) if cpu else (32, 512)
        self.steps, self.warmup = (1, 1) if cpu else (10, 3)
        self.merge_batch = 2 if cpu else 8
        self.matmul_n = 256 if cpu else 8192
        # Kernel cases: (B, H, d, w) and lengths (one a tile multiple, one not). The interpreter's
        # tl.dot is wrong for bf16 inputs, so the CPU run checks fp16 only.
        self.kernel_bhdw = (1, 2, 16, 4) if cpu else (2, 20, 40, 4)
        self.kernel_lengths = (64, 70) if cpu else (512, 500)
        self.kernel_dtypes = (torch.float16,) if cpu else (torch.bfloat16, torch.float16)
        if cpu:
            self.timing_shapes = [(1, 2, 64, 16, 4)]
        elif full:
            self.timing_shapes = [(B, 20, T, d, w) for d in (40, 64) for w in (2, 4, 8)
                                  for B, T in ((8, 512), (2, 2048), (1, 4096))]
        else:
            self.timing_shapes = [(8, 20, 512, 40, 4), (2, 20, 2048, 40, 4), (8, 20, 512, 40, 8)]
        # At the length that is not a tile multiple: one compile per setting serves its check and its timing.
        self.sweep_shape = (1, 2, 70, 16, 4) if cpu else (8, 20, 500, 40, 4)
        self.prefill, self.masked, self.decode_len = (8, 4, 1) if cpu else (256, 128, 1)


# --------------------------------------------------------------------------- running sections


class CompileClock:
    """Seconds spent in Triton's compiler: `triton.compiler.compile`, which a JIT function looks
    up when it first launches (and `triton.runtime.jit`'s own name for it, where a release binds
    one), wrapped with a timer. `hooked` names what was wrapped; empty without Triton."""

    def __init__(self) -> None:
        self.seconds, self.count, self.hooked = 0.0, 0, []
        try:
            import triton.compiler
            import triton.runtime.jit
        except ImportError:
            return
        for module in (triton.compiler, triton.runtime.jit):
            inner = getattr(module, "compile", None)
            if inner is None:
                continue

            def timed(*args, _inner=inner, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _inner(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.count += 1

            module.compile = timed
            self.hooked.append(f"{module.__name__}.compile")


class Check:
    """Runs sections in order, writing each one's JSON and log line as soon as it ends."""

    def __init__(self, out_dir: Path | None, deadline_s: float):
        self.out_dir, self.deadline_s = out_dir, deadline_s
        self.started = time.perf_counter()
        self.sections: dict[str, dict[str, Any]] = {}
        self.clock = CompileClock()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def past_deadline(self) -> bool:
        return self.elapsed() > self.deadline_s

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0, c0, n0 = time.perf_counter(), self.clock.seconds, self.clock.count
        if self.past_deadline():
            section: dict[str, Any] = {"status": "skipped: deadline",
                                       "why": f"{self.elapsed():.0f} s elapsed of --deadline-s {self.deadline_s:g}"}
        else:
            try:
                section = fn()
            except Exception as e:  # noqa: BLE001 - one broken path must not hide the others
                section = {"status": "failed", "error": one_line(e)}
        section["ok"] = section["status"] == "ok"
        section["wall_s"] = round(time.perf_counter() - t0, 2)
        section["triton_compile_s"] = round(self.clock.seconds - c0, 2) if self.clock.hooked else None
        section["triton_compiles"] = self.clock.count - n0 if self.clock.hooked else None
        self.sections[name] = section
        line = f"{time.strftime('%H:%M:%S')} +{self.elapsed():.0f}s {name}: {section['status']} ({section['wall_s']} s"
        line += f", compile {section['triton_compile_s']} s)" if self.clock.hooked else ")"
        if "error" in section:
            line += f" error: {section['error']}"
        print("gpu_check: " + line, file=sys.stderr, flush=True)
        if self.out_dir is not None:
            (self.out_dir / f"{name}.json").write_text(json.dumps(section, indent=1, default=str) + "\n")
            with open(self.out_dir / "check.log", "a") as log:
                log.write(line + "\n")
        return section


def one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:400]


# --------------------------------------------------------------------------- timing and memory


def bench_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds of fn: triton.testing.do_bench on CUDA (L2 flushed between runs);
    on CPU the faster of two wall times (a smoke test of the path, not a measurement)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}


def attention_flops(B: int, H: int, T: int, qk_width: int, v_width: int, backward: bool) -> float:
    """Matmul FLOPs of causal attention (half the T x T pairs): forward QK^T and PV;
    forward + backward adds dV, dP, dQ, dK (2.5x the forward, FlashAttention's count)."""
    forward = 2 * B * H * T * (T + 1) / 2 * (qk_width + v_width)
    return forward * 3.5 if backward else forward


# --------------------------------------------------------------------------- sections


def versions(device: torch.device, peak_override: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "ok", "torch": torch.__version__, "python": sys.version.split()[0],
                           "scope": SCOPE}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["triton_interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda":
        return {**out, "device": "cpu"}
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    model, peak = peak_for(name)
    if peak_override is not None:
        model, peak = f"--peak-tflops {peak_override:g}", peak_override
    out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               nccl=version_text(torch.cuda.nccl.version()), device=name,
               compute_capability=f"{major}.{minor}", device_count=torch.cuda.device_count(),
               peak_model=model, peak_dense_bf16_tflops=peak)
    if peak is None:
        out["note"] = f"no dense bf16 peak known for {name!r}: pass --peak-tflops for MFU against the nominal peak"
    return out


def version_text(version: Any) -> str:
    """NCCL's version as text: torch gives a (major, minor, patch) tuple (an int in old releases)."""
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def giant_config(vocab_size: int):
    """The giant spec's EnsembleConfig through `leviathan.config` alone (the spec's defaults
    for fields it leaves out: merge "mixture", merge_window = window, evidence on)."""
    from leviathan.config import ComponentConfig, EnsembleConfig

    raw = tomllib.loads(GIANT_SPEC.read_text())
    ens, T = raw["ensemble"], raw["training"]["seq_len"]
    mixer, window = ens.get("mixer", "correlation"), ens.get("window", 4)
    members = [ComponentConfig.preset(m.get("preset", "base"), flavour=m["flavour"], mixer=mixer, window=window,
                                      vocab_size=vocab_size, block_size=max(256, T)) for m in ens["members"]]
    return EnsembleConfig(members=members, modules=ens["modules"], members_per_module=ens["members_per_module"],
                          merge=ens.get("merge", "mixture"), merge_width=ens["merge_width"],
                          merge_heads=ens["merge_heads"], merge_window=ens.get("merge_window") or window,
                          mixer=mixer, evidence=ens.get("evidence", True))


def params(vocab_size: int) -> dict[str, Any]:
    """Parameters of the giant ensemble, built on the meta device (no memory), against the
    config's own torch-free count of each member."""
    from leviathan.model.ensemble import LeviathanEnsemble

    config = giant_config(vocab_size)
    with torch.device("meta"):
        ensemble = LeviathanEnsemble(config)
    built = [m.num_params() for m in ensemble.members]
    counted = [c.num_params for c in config.members]
    return {"status": "ok" if built == counted else "failed", "spec": str(GIANT_SPEC.relative_to(REPO_ROOT)),
            "vocab_size": vocab_size, "ensemble": ensemble.num_params(), "per_member": built,
            "per_member_from_config": counted, "merger_and_projections": ensemble.num_params() - sum(built)}


def matmul_peak(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    n = sizes.matmul_n
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = bench_ms(lambda: a @ b, device)
    return {"status": "ok", "n": n, "dtype": "bfloat16", "ms": ms, "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


def kernel_inputs(B: int, H: int, T: int, d: int, w: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Float32 q, k, v (B, H, T, d) and lag weights (H, w) with a[:, 0] = 1."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))
    lag = 0.5 * torch.randn(H, w, generator=gen)
    lag[:, 0] = 1.0
    return [x.to(device) for x in (q, k, v, lag)]


def kernel_errors(run: Callable[..., list[torch.Tensor]], inputs: list[torch.Tensor], dtype: torch.dtype) -> dict[str, float]:
    """Relative errors of run(q, k, v, lag, grad_out) -> [out, dq, dk, dv, dlag] in `dtype`
    against the lag-stacked formula on the float32 inputs in float64."""
    from leviathan.kernels.check import lag_stacked_reference

    d = inputs[0].shape[-1]
    exact = [x.double().requires_grad_() for x in inputs]
    ref = lag_stacked_reference(*exact, d**-0.5)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref.device)
    ref_all = [ref, *torch.autograd.grad(ref, exact, grad_out.double())]
    low = [x.to(dtype) for x in inputs[:3]] + [inputs[3]]
    got = run(*low, grad_out.to(dtype))
    names = ("out", "dq", "dk", "dv", "dlag")
    return {n: ((g.double() - r).abs().max() / r.abs().max()).item() for n, g, r in zip(names, got, ref_all)}


def kernel_autograd(q, k, v, lag, grad_out) -> list[torch.Tensor]:
    """The kernel through its autograd op (what the model calls): [out, dq, dk, dv, dlag]."""
    from leviathan.kernels import shifted_diagonal_attention

    q, k, v, lag = (x.detach().requires_grad_() for x in (q, k, v, lag))
    out = shifted_diagonal_attention(q, k, v, lag, q.shape[-1] ** -0.5)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v, lag), grad_out)]


def kernel_accuracy(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    B, H, d, w = sizes.kernel_bhdw
    rows = []
    for dtype in sizes.kernel_dtypes:
        for T in sizes.kernel_lengths:
            errors = kernel_errors(kernel_autograd, kernel_inputs(B, H, T, d, w, device), dtype)
            worst = max(errors.values())
            rows.append({"dtype": str(dtype).removeprefix("torch."), "B": B, "H": H, "T": T, "d": d, "w": w,
                         **errors, "tolerance": TOLERANCE[dtype], "within": worst <= TOLERANCE[dtype]})
    out: dict[str, Any] = {"status": "ok" if all(r["within"] for r in rows) else "failed", "rows": rows}
    if sizes.cpu:
        out["note"] = "Triton's interpreter: fp16 only (its tl.dot is wrong for bf16 inputs)"
    return out


def kernel_repeatability(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """A race probe: two identical forwards must be bitwise equal, and so must dK and dV
    across two backwards (their rows belong to one program each). dQ and the lag gradient
    add across programs with atomics, so their run-to-run difference is reported, not required."""
    B, H, d, w = sizes.kernel_bhdw
    T = sizes.kernel_lengths[-1]
    dtype = sizes.kernel_dtypes[0]
    q, k, v, lag = kernel_inputs(B, H, T, d, w, device)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    grad_out = torch.randn_like(q)
    first, second = kernel_autograd(q, k, v, lag, grad_out), kernel_autograd(q, k, v, lag, grad_out)
    same = {n: torch.equal(a, b) for n, a, b in zip(("out", "dq", "dk", "dv", "dlag"), first, second)}
    spread = {f"{n}_max_abs_diff": (a.float() - b.float()).abs().max().item()
              for n, a, b in zip(("dq", "dlag"), first[1::3], second[1::3])}
    required = same["out"] and same["dk"] and same["dv"]
    return {"status": "ok" if required else "failed", "dtype": str(dtype).removeprefix("torch."),
            "B": B, "H": H, "T": T, "d": d, "w": w, "bitwise_equal": same, **spread}


def _lag_stacked_path(q, k, v, lag):
    """The model's lag-stacked path: stacked queries and keys d*w wide through its SDPA choice."""
    from leviathan.model.correlation import lag_stack, sdpa

    B, H, T, d = q.shape
    w = lag.shape[1]
    qs = (lag_stack(q, w).view(B, H, T, w, d) * lag.view(1, H, 1, w, 1).to(q.dtype)).view(B, H, T, w * d)
    return sdpa(qs, lag_stack(k, w), v, is_causal=True, scale=d**-0.5)


def _flash(q, k, v, lag):
    """Plain causal attention at w = 1 on the flash backend (SDPA's default on CPU)."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _kernel(q, k, v, lag):
    from leviathan.kernels import shifted_diagonal_attention

    return shifted_diagonal_attention(q, k, v, lag, q.shape[-1] ** -0.5)


def kernel_timing(device: torch.device, sizes: Sizes, check: Check) -> dict[str, Any]:
    """Forward and forward + backward of the kernel, flash at w = 1 and the lag-stacked path."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    paths = {"triton": (_kernel, lambda d, w: (d, d)), "flash_w1": (_flash, lambda d, w: (d, d)),
             "lag_stacked": (_lag_stacked_path, lambda d, w: (d * w, d))}
    rows, cut = [], False
    for B, H, T, d, w in sizes.timing_shapes:
        if check.past_deadline():
            cut = True
            break
        q, k, v, lag = kernel_inputs(B, H, T, d, w, device)
        q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
        lag.requires_grad_()
        grad = torch.randn_like(q)
        row: dict[str, Any] = {"B": B, "H": H, "T": T, "d": d, "w": w, "dtype": str(dtype).removeprefix("torch.")}
        for name, (fn, widths) in paths.items():
            try:
                fwd = bench_ms(lambda: fn(q, k, v, lag), device)
                both = bench_ms(lambda: torch.autograd.backward(fn(q, k, v, lag), grad), device)
                qk, vw = widths(d, w)
                row[name] = {"fwd_ms": fwd, "fwd_bwd_ms": both,
                             "fwd_tflops": attention_flops(B, H, T, qk, vw, False) / (fwd * 1e-3) / 1e12,
                             "fwd_bwd_tflops": attention_flops(B, H, T, qk, vw, True) / (both * 1e-3) / 1e12}
            except Exception as e:  # noqa: BLE001 - a path that cannot run this shape is a finding
                row[name] = {"error": one_line(e)}
        for base in ("flash_w1", "lag_stacked"):
            if "fwd_ms" in row["triton"] and "fwd_ms" in row[base]:
                row[f"triton_over_{base}"] = {"fwd": row["triton"]["fwd_ms"] / row[base]["fwd_ms"],
                                              "fwd_bwd": row["triton"]["fwd_bwd_ms"] / row[base]["fwd_bwd_ms"]}
        rows.append(row)
    timed = bool(rows) and all("fwd_ms" in r["triton"] for r in rows)
    out: dict[str, Any] = {"status": "ok" if timed else "failed", "rows": rows,
                           "flops": "each path's own matmul work: triton QK^T at d and PV at d (its w shift "
                                    "sums are additions, not counted), flash the same at w = 1, lag-stacked "
                                    "QK^T at d*w; backward 2.5x the forward"}
    if cut:
        out["cut_short"] = f"deadline: {len(rows)} of {len(sizes.timing_shapes)} shapes"
    if device.type != "cuda":
        out["note"] = "CPU: wall times of the interpreter, not kernel timings"
    return out


def kernel_resources(device: torch.device, sizes: Sizes, tiles=None) -> dict[str, Any]:
    """Registers, spills and shared memory of the compiled forward and backward at the model's shape."""
    if device.type != "cuda":
        return {"status": "not checked: Triton's interpreter compiles nothing (no registers, spills or shared memory)"}
    from leviathan.kernels import shifted_diagonal as kernel

    rows = []
    B, H, d, w = sizes.kernel_bhdw
    for dtype in sizes.kernel_dtypes:
        compiled = launch_once(kernel, (B, H, sizes.kernel_lengths[0], d, w), dtype, device, tiles)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "d": d, "w": w,
                     **{name: resources_of(c) for name, c in compiled.items()}})
    tiles = tiles or kernel.tiles_for(device)
    return {"status": "ok" if rows else "failed", "tiles": tiles.name(), "rows": rows}


def resources_of(compiled: Any) -> dict[str, Any]:
    metadata = getattr(compiled, "metadata", None)
    return {"n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None),
            "shared_bytes": getattr(metadata, "shared", None), "num_warps": getattr(metadata, "num_warps", None),
            "num_stages": getattr(metadata, "num_stages", None)}


def launch_once(kernel, shape, dtype, device, tiles) -> dict[str, Any]:
    """One forward and backward through the kernel's launchers: {"forward": compiled, "backward": compiled}."""
    compiled: dict[str, Any] = {}
    B, H, T, d, w = shape
    q, k, v, lag = kernel_inputs(B, H, T, d, w, device)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    out, lse = kernel.forward(q, k, v, lag, d**-0.5, tiles=tiles, compiled=compiled)
    kernel.backward(q, k, v, lag, out, lse, torch.randn_like(out), d**-0.5, tiles=tiles, compiled=compiled)
    return compiled


def sweep_candidates(full: bool):
    from leviathan.kernels.shifted_diagonal import DEFAULT_TILES, Tiles

    candidates = [DEFAULT_TILES] + [Tiles(128, 64, 8, s) for s in (2, 3)] + [Tiles(64, 64, 4, s) for s in (2, 3)]
    if full:
        candidates += [Tiles(128, 64, 8, 1), Tiles(64, 64, 4, 1), Tiles(64, 64, 8, 2), Tiles(64, 64, 8, 3)]
    return candidates


def kernel_sweep(device: torch.device, sizes: Sizes, full: bool, check: Check) -> dict[str, Any]:
    """Each tile setting: accuracy against float64 (a setting that changes the result is out),
    forward + backward time and compiled resources; the fastest accurate one for this architecture."""
    from leviathan.kernels import shifted_diagonal as kernel

    B, H, T, d, w = sizes.sweep_shape
    dtype = sizes.kernel_dtypes[0]
    rows, cut = [], False
    for tiles in sweep_candidates(full):
        if check.past_deadline():
            cut = True
            break
        row: dict[str, Any] = {"tiles": tiles.name()}
        try:
            def run(q, k, v, lag, grad_out, tiles=tiles):
                out, lse = kernel.forward(q, k, v, lag, d**-0.5, tiles=tiles)
                return [out, *kernel.backward(q, k, v, lag, out, lse, grad_out, d**-0.5, tiles=tiles)]

            errors = kernel_errors(run, kernel_inputs(1, H, T, d, w, device), dtype)
            row["worst_rel_error"] = max(errors.values())
            row["accurate"] = row["worst_rel_error"] <= TOLERANCE[dtype]
            q, k, v, lag = kernel_inputs(B, H, T, d, w, device)
            q, k, v = (x.to(dtype) for x in (q, k, v))
            grad = torch.randn_like(q)
            if device.type == "cuda":  # the interpreter's times say nothing about a setting
                row["fwd_bwd_ms"] = bench_ms(lambda: run(q, k, v, lag, grad), device)
                compiled = launch_once(kernel, (B, H, T, d, w), dtype, device, tiles)
                row.update({name: resources_of(c) for name, c in compiled.items()})
        except Exception as e:  # noqa: BLE001 - a setting that does not compile or run is a finding
            row["error"] = one_line(e)
        rows.append(row)
    good = [r for r in rows if r.get("accurate")]
    default = kernel.DEFAULT_TILES.name()
    out: dict[str, Any] = {"shape": {"B": B, "H": H, "T": T, "d": d, "w": w}, "dtype": str(dtype).removeprefix("torch."),
                           "current_default": default, "rows": rows}
    if cut:
        out["cut_short"] = f"deadline: {len(rows)} settings tried"
    if device.type != "cuda":
        out["fastest"] = None
        out["decision"] = (f"keep {default}: the interpreter checks each setting's arithmetic, but its times are not "
                           "kernel times and it compiles nothing to read registers or spills from (compiled for "
                           "sm_90 ahead of time, the default spills least: see TILES_BY_ARCH)")
    elif any("fwd_bwd_ms" in r for r in good):
        best = min((r for r in good if "fwd_bwd_ms" in r), key=lambda r: r["fwd_bwd_ms"])
        major, minor = torch.cuda.get_device_capability(device)
        out["fastest"] = best["tiles"]
        out["decision"] = (f"TILES_BY_ARCH[{major * 10 + minor}] = {best['tiles']}"
                           + (" (the current default)" if best["tiles"] == default else f" (faster than {default})"))
    default_ok = any(r["tiles"] == default and r.get("accurate") for r in rows)
    out["status"] = "ok" if default_ok else "failed"
    return out


def member_config(sizes: Sizes, flavour: str, vocab_size: int):
    from leviathan.config import ComponentConfig

    return ComponentConfig.preset(sizes.preset, flavour=flavour, vocab_size=vocab_size,
                                  block_size=max(256, sizes.seq_len), window=4)


def tokens(B: int, T: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(1)
    return torch.randint(0, vocab_size, (B, T + 1), generator=gen).to(device)


def force_path(model: torch.nn.Module, path: str) -> list:
    from leviathan.model.correlation import MultiHeadedCorrelation

    mixers = [m for m in model.modules() if isinstance(m, MultiHeadedCorrelation)]
    for m in mixers:
        m.force_path = path
    return mixers


def member_step(device, sizes: Sizes, path: str, vocab_size: int, peak: float | None,
                matmul_tflops: float | None) -> dict[str, Any]:
    """AdamW steps of a base gelu4 member with its mixer forced onto `path`."""
    from leviathan.model.component import build_component, configure_adamw
    from leviathan.model.flops import flops

    config = member_config(sizes, "gelu4", vocab_size)
    torch.manual_seed(0)
    model = build_component(config).to(device).train()
    mixers = force_path(model, path)
    opt = configure_adamw(model, 6e-4, 0.1)
    batch = tokens(sizes.batch, sizes.seq_len, vocab_size, device)
    x, y = batch[:, :-1], batch[:, 1:]
    reset_peak(device)
    times, loss = [], None
    for i in range(sizes.warmup + sizes.steps):
        t0 = sync_time(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= sizes.warmup:
            times.append(sync_time(device) - t0)
    step_s = statistics.median(times)
    step_flops = flops(config, sizes.seq_len, sizes.batch, device=device.type, path=path)
    achieved = step_flops / step_s / 1e12
    taken = sorted({m.last_path for m in mixers})
    out: dict[str, Any] = {
        "path_forced": path, "path_taken": taken, "preset": sizes.preset, "flavour": "gelu4",
        "B": sizes.batch, "T": sizes.seq_len, "dtype": "bfloat16 autocast", "params": model.num_params(),
        "ms_per_step": step_s * 1e3, "tokens_per_s": sizes.batch * sizes.seq_len / step_s,
        "flops_per_step": step_flops, "model_tflops": achieved,
        "mfu_vs_nominal_peak": achieved / peak if peak else None,
        "mfu_vs_measured_matmul": achieved / matmul_tflops if matmul_tflops else None,
        **peak_memory(device), "loss": loss.item(),
    }
    out.update(memory_beside_estimate(out, config, sizes, path))
    good = math.isfinite(loss.item()) and all(t.startswith(path) for t in taken) and bool(taken)
    out["status"] = "ok" if good else "failed"
    if not good and math.isfinite(loss.item()):
        out["error"] = f"path taken {taken}, not {path}"
    return out


def memory_beside_estimate(measured: dict[str, Any], config, sizes: Sizes, path: str) -> dict[str, Any]:
    """`benchmarks/memory_estimate.py`'s figure for this member and path, beside the measured peak."""
    if sizes.cpu:
        return {"estimate": "not computed on CPU (the estimate measures a base member)"}
    from benchmarks.memory_estimate import member_step_estimate

    gib = member_step_estimate(config, sizes.batch, sizes.seq_len, path)
    return {"estimated_gib": gib,
            "measured_over_estimate": (measured["peak_allocated_gib"] / gib["total"]
                                       if measured.get("peak_allocated_gib") else None)}


def prefill_decode(device, sizes: Sizes, vocab_size: int) -> dict[str, Any]:
    """A base member's cached forwards under bf16 autocast against its uncached float32 forward."""
    from leviathan.model.component import build_component

    torch.manual_seed(0)
    model = build_component(member_config(sizes, "gelu4", vocab_size)).to(device).eval()
    P, K, D = sizes.prefill, sizes.masked, sizes.decode_len
    x = tokens(1, P + K + D, vocab_size, device)[:, : P + K + D]
    with torch.no_grad():
        full = model(x)[0].float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            cache = model.new_cache()
            parts = {"prefill": (model(x[:, :P], cache=cache)[0], slice(0, P)),
                     "masked_prefill": (model(x[:, P: P + K], cache=cache)[0], slice(P, P + K)),
                     "decode": (model(x[:, P + K:], cache=cache)[0], slice(P + K, P + K + D))}
    scale = full.abs().max().item()
    errors = {f"{n}_rel_error": (logits.float() - full[:, where]).abs().max().item() / scale
              for n, (logits, where) in parts.items()}
    return {"status": "ok" if max(errors.values()) <= TOLERANCE[torch.bfloat16] else "failed", **errors,
            "shapes": {"prefill": P, "masked_prefill": [P, K], "decode": D}}


def small_ensemble(sizes: Sizes, vocab_size: int):
    from leviathan.config import EnsembleConfig

    members = [member_config(sizes, f, vocab_size) for f in ("gelu4", "relu3")]
    return EnsembleConfig(members=members, modules=1, members_per_module=2, merge="fusion",
                          merge_width=members[0].n_embd, merge_heads=members[0].n_head)


def merge_step(device, sizes: Sizes, vocab_size: int) -> dict[str, Any]:
    """One joint step of a two-member ensemble (members, projections, merger) on this device.
    Phase 2 across ranks exchanges states between GPUs; here every member is local."""
    from leviathan.model.ensemble import LeviathanEnsemble

    torch.manual_seed(0)
    ensemble = LeviathanEnsemble(small_ensemble(sizes, vocab_size)).to(device).train()
    opt = torch.optim.AdamW(ensemble.parameters(), lr=3e-4)
    batch = tokens(sizes.merge_batch, sizes.seq_len, vocab_size, device)
    reset_peak(device)
    t0 = sync_time(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        _, loss = ensemble(batch[:, :-1], batch[:, 1:])
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ensemble.parameters(), 1.0).item()
    opt.step()
    seconds = sync_time(device) - t0
    good = math.isfinite(loss.item()) and math.isfinite(norm) and norm > 0
    return {"status": "ok" if good else "failed", "world_size": 1,
            "scope": "every member on this device: the cross-rank exchange of states is not exercised",
            "B": sizes.merge_batch, "T": sizes.seq_len, "loss": loss.item(), "grad_norm": norm, "step_s": seconds,
            **peak_memory(device)}


def checkpoint_round_trip(device, sizes: Sizes, vocab_size: int) -> dict[str, Any]:
    """A member after one AdamW step, its optimiser state and the RNG through torch.save and back."""
    from leviathan.model.component import build_component, configure_adamw

    config = member_config(sizes, "relu3", vocab_size)
    torch.manual_seed(0)
    model = build_component(config).to(device)
    opt = configure_adamw(model, 6e-4, 0.1)
    batch = tokens(2, sizes.seq_len, vocab_size, device)
    model(batch[:, :-1], batch[:, 1:])[1].backward()
    opt.step()
    rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    with tempfile.TemporaryDirectory(prefix="leviathan-gpu-check-") as tmp:
        path = Path(tmp) / "state.pt"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng}, path)
        state = torch.load(path, map_location=device, weights_only=True)
    fresh = build_component(config).to(device)
    fresh_opt = configure_adamw(fresh, 6e-4, 0.1)
    fresh.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["opt"])
    pairs = list(zip(model.parameters(), fresh.parameters()))
    states = [(opt.state[a], fresh_opt.state[b]) for a, b in pairs if a in opt.state]
    weights = bool(pairs) and all(torch.equal(a, b) for a, b in pairs)
    moments = bool(states) and all(torch.equal(sa[k], sb[k]) for sa, sb in states for k in ("exp_avg", "exp_avg_sq"))
    rng_ok = torch.equal(state["rng"].cpu(), rng.cpu())
    return {"status": "ok" if weights and moments and rng_ok else "failed", "tensors_compared": len(pairs),
            "optimizer_states_compared": len(states), "weights": weights, "optimizer_state": moments, "rng": rng_ok}


def collectives(device: torch.device) -> dict[str, Any]:
    """The primitives phase 2 and validation call, on a one-rank NCCL (gloo on CPU) group: they
    initialise and return their input, which at world size 1 is all they can show."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)
    results: dict[str, bool] = {}
    try:
        x = torch.arange(6.0, device=device).reshape(2, 3)
        parts = [torch.empty_like(x)]
        dist.all_gather(parts, x)
        results["all_gather"] = torch.equal(parts[0], x)
        leaf = x.clone().requires_grad_()
        torch.cat(dist_nn.all_gather(leaf)).sum().backward()
        results["differentiable_all_gather_backward"] = torch.equal(leaf.grad, torch.ones_like(x))
        out = torch.empty(2, 3, device=device)
        dist.reduce_scatter_tensor(out, x)
        results["reduce_scatter"] = torch.equal(out, x)
        y = x.clone()
        dist.all_reduce(y)
        results["all_reduce"] = torch.equal(y, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        dist.destroy_process_group()
    return {"status": NO_TRAFFIC if all(results.values()) else "failed", "backend": backend, "world_size": 1,
            **results, "not_tested": SCOPE}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="smoke test on CPU: tiny sizes, Triton's interpreter")
    p.add_argument("--out", default=None, help="folder for <section>.json, check.log and summary.json")
    p.add_argument("--deadline-s", type=float, default=540.0, help="skip what is left after this many seconds")
    p.add_argument("--full", action="store_true", help="wider kernel cases (timing shapes, sweep settings)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the members (BPE default 4096)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of a device not in the table")
    args = p.parse_args(argv)
    if args.deadline_s <= 0:
        p.error(f"--deadline-s: must be > 0, got {args.deadline_s:g}")

    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"status": "failed", "error": "no CUDA device visible to torch (--cpu for the smoke test)"}))
        return 1
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    sizes = Sizes(args.cpu, args.full)
    vocab = 256 if args.cpu else args.vocab_size
    check = Check(Path(args.out) if args.out else None, args.deadline_s)

    def versions_and_timer() -> dict[str, Any]:
        timed = check.clock.hooked or "none: Triton is not importable"
        note = "Triton's interpreter compiles nothing: 0 s" if os.environ.get("TRITON_INTERPRET") == "1" else None
        return {**versions(device, args.peak_tflops), "compile_time_of": timed, "compile_time_note": note}

    peak = check.run("versions", versions_and_timer).get("peak_dense_bf16_tflops")
    check.run("params", lambda: params(args.vocab_size))
    matmul = check.run("matmul_peak", lambda: matmul_peak(device, sizes)).get("tflops")
    check.run("kernel_accuracy", lambda: kernel_accuracy(device, sizes))
    check.run("kernel_repeatability", lambda: kernel_repeatability(device, sizes))
    for path in ("triton", "lag_stacked"):
        check.run(f"member_step_{path}", lambda: member_step(device, sizes, path, vocab, peak, matmul))
    check.run("prefill_decode", lambda: prefill_decode(device, sizes, vocab))
    check.run("merge_step", lambda: merge_step(device, sizes, vocab))
    check.run("checkpoint", lambda: checkpoint_round_trip(device, sizes, vocab))
    check.run("collectives", lambda: collectives(device))
    # The long kernel sections last: each stops between cases at the deadline.
    check.run("kernel_timing", lambda: kernel_timing(device, sizes, check))
    check.run("kernel_resources", lambda: kernel_resources(device, sizes))
    check.run("kernel_sweep", lambda: kernel_sweep(device, sizes, args.full, check))

    failed = [n for n, s in check.sections.items() if s["status"] == "failed"]
    summary = {"benchmark": "gpu_check", "mode": "cpu smoke test" if args.cpu else "gpu", "scope": SCOPE,
               "statuses": {n: s["status"] for n, s in check.sections.items()}, "failed": failed,
               "wall_s": round(check.elapsed(), 1), "sections": check.sections}
    text = json.dumps(summary, indent=1, default=str)
    if check.out_dir is not None:
        (check.out_dir / "summary.json").write_text(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
