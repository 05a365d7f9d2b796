"""Correlation vs attention: forward+backward time and peak memory, side by side.

    python benchmarks/mixer.py [--device cpu|cuda] [--threads 1] [--rounds 3] [--out result.json]

Every variant of a section runs interleaved round by round in one process (so
machine load hits all of them alike); medians and ratios against attention.
Variants are named `w{window}_{path}`: each correlation window pinned to each
CPU path (`MultiHeadedCorrelation.force_path`), "shifted_diagonal" (the
materialised scores) and "lag_stacked" (SDPA on lag-stacked queries and keys);
`auto_paths` says which one the mixer picks by itself at that length.

- mixer: one `MultiHeadedCorrelation` at the `small` preset's width, at every
  T in --seqs with the same tokens per step (--mixer-tokens); the largest
  difference between the two paths' outputs is reported too;
- model: the `small` preset at every T in --seqs (--model-tokens per step),
  and the issue's 4-block / 4-head / width-128 model at T = 64, batch 12;
- goal: at w = 4 on the path chosen automatically, the model-level CPU-time
  ratios against attention of the small preset at T = 256 (target <= 1.10)
  and of the 4x128 model at T = 64 (target <= 1.15), in GOAL_TARGETS;
- formulations: exact ways to compute the same correlation at w = 4,
  including lag-stacked SDPA with narrow values (which drops to the math kernel);
- kernel (--device cuda only): the Triton shifted-diagonal kernel and the
  lag-stacked SDPA against flash attention, bf16, T in --kernel-seqs.

On a shared CPU, pass --threads 1: idle OpenMP threads spin while they wait
for a core and bill that as CPU time.

Peak memory is the extra memory one forward+backward step needs, parameter
gradients included (each step frees its gradients at the end). On CUDA:
torch.cuda.max_memory_allocated above what was allocated before the step. On
CPU: the peak resident set (VmHWM, reset through /proc/self/clear_refs)
above the resident set before the step, measured in a second process of this
script whose glibc mmap threshold is pinned at 64 KiB, so freed tensors go back
to the OS and every step's buffers are really counted. Timings come from the
first process, whose allocator is left alone (a pinned threshold turns every
large allocation into page faults and would tax the memory-hungry variants).

JSON goes to stdout (and --out); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch import Tensor  # noqa: E402

from leviathan.config import PRESETS, ComponentConfig  # noqa: E402
from leviathan.model.correlation import MultiHeadedCorrelation, lag_stack, mixer_path, sdpa, triton_kernels  # noqa: E402
from leviathan.model.flops import flops  # noqa: E402
from leviathan.model.component import LeviathanComponent  # noqa: E402
from benchmarks.common import emit_report, machine_info  # noqa: E402

CPU_PATHS = ("shifted_diagonal", "lag_stacked")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Extra memory at the peak of one call of `step` (see the module docstring)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _proc_status("VmRSS:")
    step()
    return _proc_status("VmHWM:") - before


def measure(
    steps: dict[str, Callable[[], None]], rounds: int, reps: int, device: torch.device, memory_only: bool
) -> dict[str, dict]:
    """Per variant: median seconds per step over rotating rounds, and/or peak extra bytes.

    On CPU, timing and memory come from two processes (see the module
    docstring): memory_only measures memory and skips timing.
    """
    names = list(steps)
    for n in names:  # warm-up (kernels, allocator), one variant at a time
        steps[n]()
        sync(device)
    if memory_only:
        return {n: {"peak_bytes": peak_step_bytes(steps[n], device)} for n in names}
    mem = {n: peak_step_bytes(steps[n], device) if device.type == "cuda" else None for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            for _ in range(reps):
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                steps[n]()
                sync(device)
                times[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {statistics.median(times[n]) * 1e3:.1f} ms" for n in names))
    return {
        n: {
            "median_s": statistics.median(times[n]),
            "median_cpu_s": statistics.median(cpu[n]) if device.type == "cpu" else None,
            "peak_bytes": mem[n],
            "samples": len(times[n]),
        }
        for n in names
    }


def with_ratios(results: dict[str, dict], tokens: int, baseline: str = "attention") -> dict[str, dict]:
    base = results[baseline]
    out = {}
    for n, r in results.items():
        peak, base_peak = r.get("peak_bytes"), base.get("peak_bytes")
        cpu, base_cpu = r.get("median_cpu_s"), base.get("median_cpu_s")
        out[n] = {
            "median_ms": round(r["median_s"] * 1e3, 3),
            "tokens_per_s": round(tokens / r["median_s"], 1),
            "peak_mib": None if peak is None else round(peak / 2**20, 2),
            "time_ratio_vs_" + baseline: round(r["median_s"] / base["median_s"], 3),
            "cpu_time_ratio_vs_" + baseline: round(cpu / base_cpu, 3) if cpu and base_cpu else None,
            "memory_ratio_vs_" + baseline: round(peak / base_peak, 3) if peak is not None and base_peak else None,
            "samples": r["samples"],
        }
    return out


def random_lags(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial lag weights: timings do not depend on them, the formulation check does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("lag_weight"):
                p.copy_(torch.randn(p.shape, generator=g).to(p.device))


def correlation_variants(windows: list[int]) -> list[tuple[str, int, str]]:
    """(name, window, path) of every correlation variant: each window on each CPU path."""
    return [(f"w{w}_{path}", w, path) for w in windows for path in CPU_PATHS]


def pin_path(module: torch.nn.Module, path: str | None) -> None:
    for m in module.modules():
        if isinstance(m, MultiHeadedCorrelation):
            m.force_path = path


def bench_mixer(args: argparse.Namespace, device: torch.device) -> dict:
    C, H = args.embd, args.heads
    out = {}
    for T in args.seqs:
        B = max(1, args.mixer_tokens // T)
        x = torch.randn(B, T, C, device=device)
        variants = {"attention": MultiHeadedCorrelation(C, H, 1, mixer="attention")}
        for name, w, path in correlation_variants(args.windows):
            torch.manual_seed(w)  # both paths of a window share their weights
            variants[name] = MultiHeadedCorrelation(C, H, w)
            pin_path(variants[name], path)
        steps = {}
        for name, m in variants.items():
            m.to(device)
            random_lags(m)

            def step(m: MultiHeadedCorrelation = m) -> None:
                m(x).sum().backward()
                m.zero_grad(set_to_none=True)

            steps[name] = step
        with torch.no_grad():
            diffs = {
                f"w{w}": float((variants[f"w{w}_shifted_diagonal"](x) - variants[f"w{w}_lag_stacked"](x)).abs().max())
                for w in args.windows
            }
        log(f"mixer: B={B} T={T} C={C} H={H}")
        res = measure(steps, args.rounds, args.reps, device, args.memory_only)
        out[f"seq{T}"] = {
            "shape": {"batch": B, "seq": T, "embd": C, "heads": H},
            "auto_paths": {f"w{w}": mixer_path(device.type, T, w) for w in args.windows},
            "max_abs_diff_between_paths": diffs,
            "tokens": B * T,
            "results": res,
        }
    return out


def diagonal_scores(q, k, v, a, scale):
    """score = sum_u a[h,u] * S0[i-u, j-u] with S0 = q k^T: the L x L matrix, materialised."""
    T = q.size(-2)
    s0 = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    score = sum(a[:, u].view(1, -1, 1, 1) * F.pad(s0, (u, 0, u, 0))[..., :T, :T] for u in range(a.size(1)))
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(score.masked_fill(~mask, float("-inf")), dim=-1) @ v


def weighted_lag_stack(q: Tensor, a: Tensor) -> Tensor:
    """(B, H, T, w*d) queries: q's w lags side by side, lag j scaled by a[h, j], so one SDPA sums the w diagonals."""
    B, H, T, d = q.shape
    w = a.size(1)
    return (lag_stack(q, w).view(B, H, T, w, d) * a.view(1, H, 1, w, 1)).view(B, H, T, w * d)


def backward_steps(fns: dict[str, Callable[[], Tensor]], leaves: tuple[Tensor, ...]) -> dict[str, Callable[[], None]]:
    """name -> one forward+backward step of fns[name]; clearing the leaves' grads keeps every step the same work."""

    def step_of(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def step() -> None:
            fn().sum().backward()
            for t in leaves:
                t.grad = None

        return step

    return {name: step_of(fn) for name, fn in fns.items()}


def stacked(q, k, v, a, scale, pad_values: bool):
    """Lag-stacked SDPA; pad_values zero-pads v to the query width (what `leviathan.model.correlation.sdpa` does on CPU)."""
    d, w = q.size(-1), a.size(1)
    qs = weighted_lag_stack(q, a)
    ks = lag_stack(k, w)
    if pad_values:
        return F.scaled_dot_product_attention(qs, ks, F.pad(v, (0, w * d - d)), is_causal=True, scale=scale)[..., :d]
    return F.scaled_dot_product_attention(qs, ks, v, is_causal=True, scale=scale)


def bench_formulations(args: argparse.Namespace, device: torch.device) -> dict:
    H, d, w = args.heads, args.embd // args.heads, 4
    tokens = args.batch * args.seq
    out = {}
    for T in args.formulation_seqs:
        B = max(1, tokens // T)
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(B, H, T, d, generator=g).to(device).requires_grad_() for _ in range(3))
        a = torch.randn(H, w, generator=g).to(device).requires_grad_()
        scale = 1.0 / math.sqrt(d)
        kernels = {
            "attention": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "stacked_padded_v": lambda: stacked(q, k, v, a, scale, pad_values=True),
            "stacked_narrow_v": lambda: stacked(q, k, v, a, scale, pad_values=False),
            "diagonal_scores": lambda: diagonal_scores(q, k, v, a, scale),
        }
        with torch.no_grad():
            ref = kernels["diagonal_scores"]()
            diffs = {n: float((kernels[n]() - ref).abs().max()) for n in kernels if n != "attention"}
        steps = backward_steps(kernels, (q, k, v, a))
        log(f"formulations (w={w}): B={B} T={T} H={H} d={d}")
        res = measure(steps, args.rounds, args.formulation_reps, device, args.memory_only)
        out[f"seq{T}"] = {
            "shape": {"batch": B, "seq": T, "heads": H, "head_dim": d, "window": w},
            "max_abs_diff_vs_diagonal": diffs,
            "tokens": B * T,
            "results": res,
        }
    return out


GOAL_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128}
"""The issue's nanoGPT-style CPU configuration (context 64, batch 12)."""


def model_shapes(args: argparse.Namespace) -> dict[str, tuple[dict, int, int]]:
    """name -> (model sizes, batch, seq) of the model section."""
    shapes = {f"small_seq{T}": (PRESETS["small"], max(1, args.model_tokens // T), T) for T in args.seqs}
    shapes["4x128_seq64"] = (GOAL_MODEL, 12, 64)
    return shapes


def bench_model(args: argparse.Namespace, device: torch.device) -> dict:
    out = {}
    for label, (sizes, B, T) in model_shapes(args).items():
        torch.manual_seed(0)
        idx = torch.randint(0, 260, (B, T + 1), device=device)
        x, y = idx[:, :-1], idx[:, 1:]
        configs = {"attention": (ComponentConfig(**sizes, block_size=T, mixer="attention"), None)}
        for name, w, path in correlation_variants(args.windows):
            configs[name] = (ComponentConfig(**sizes, block_size=T, window=w), path)
        steps, params = {}, {}
        for name, (cfg, path) in configs.items():
            torch.manual_seed(0)
            m = LeviathanComponent(cfg).to(device)
            pin_path(m, path)
            random_lags(m)
            params[name] = m.num_params()

            def step(m: LeviathanComponent = m) -> None:
                m(x, y)[1].backward()
                m.zero_grad(set_to_none=True)

            steps[name] = step
        log(f"model {label}: B={B} T={T} {sizes}")
        res = measure(steps, args.rounds, 1, device, args.memory_only)
        out[label] = {
            "shape": {"batch": B, "seq": T, **sizes},
            "auto_paths": {f"w{w}": mixer_path(device.type, T, w) for w in args.windows},
            "flops_per_token": {
                name: flops(cfg, T, device=device.type, path=path) // T
                for name, (cfg, path) in configs.items()
            },
            "params": params,
            "tokens": B * T,
            "results": res,
        }
    return out


GOAL_TARGETS = {"small_seq256": 1.10, "4x128_seq64": 1.15}
"""Model-level CPU-time ratio, correlation w = 4 against attention, that each goal shape must stay under."""


def goal(report: dict, window: int = 4) -> dict:
    """The goal figures: model-level CPU-time ratio at w = 4 on the automatic path, against GOAL_TARGETS."""
    out: dict = {"window": window}
    for label, target in GOAL_TARGETS.items():
        block = report.get("model", {}).get(label)
        if block is None or f"w{window}" not in block["auto_paths"]:
            continue
        name = f"w{window}_{block['auto_paths'][f'w{window}']}"
        ratio = block["results"][name]["cpu_time_ratio_vs_attention"]
        out[label] = {
            "variant": name, "cpu_time_ratio": ratio, "target": target, "met": ratio is not None and ratio <= target,
        }
    return out


def bench_kernel(args: argparse.Namespace, device: torch.device) -> dict:
    """CUDA: the Triton kernel and lag-stacked SDPA against flash attention, bf16, forward+backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = triton_kernels()
    B, H, d, w = args.kernel_batch, args.kernel_heads, args.kernel_head_dim, 4
    out = {}
    for T in args.kernel_seqs:
        g = torch.Generator(device=device).manual_seed(T)
        q, k, v = (torch.randn(B, H, T, d, device=device, dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
        a = torch.randn(H, w, device=device, generator=g).to(torch.bfloat16).requires_grad_()
        scale = 1.0 / math.sqrt(d)

        def flash() -> Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

        def lag_stacked() -> Tensor:
            return sdpa(weighted_lag_stack(q, a), lag_stack(k, w), v, is_causal=True, scale=scale)

        fns: dict[str, Callable[[], Tensor]] = {"attention": flash, "lag_stacked": lag_stacked}
        if kernels is not None:
            fns["triton"] = lambda: kernels.shifted_diagonal_attention(q, k, v, a, scale)
        diffs = {}
        if "triton" in fns:
            with torch.no_grad():
                diffs["triton_vs_lag_stacked"] = float((fns["triton"]() - lag_stacked()).float().abs().max())
        steps = backward_steps(fns, (q, k, v, a))
        log(f"kernel: B={B} H={H} T={T} d={d} w={w} bf16")
        res = measure(steps, args.rounds, args.reps, device, args.memory_only)
        out[f"seq{T}"] = {
            "shape": {"batch": B, "heads": H, "seq": T, "head_dim": d, "window": w, "dtype": "bfloat16"},
            "triton": "ran" if kernels is not None else "leviathan.kernels or Triton not available",
            "max_abs_diff": diffs,
            "tokens": B * T,
            "results": res,
        }
    return out


def machine(device: torch.device) -> dict:
    info = machine_info(torch=torch.__version__, device=str(device), torch_threads=torch.get_num_threads())
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


SECTIONS = ("mixer", "model", "formulations", "kernel")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--reps", type=int, default=1, help="steps per variant per round, mixer, formulations and kernel (default 1)")
    p.add_argument("--windows", type=ints, default=[1, 2, 4, 8], help="correlation windows (default 1,2,4,8)")
    p.add_argument("--seqs", type=ints, default=[64, 256, 1024], help="sequence lengths of the mixer and model sections")
    p.add_argument("--mixer-tokens", type=int, default=2048, help="tokens per mixer step (batch = tokens / T)")
    p.add_argument("--model-tokens", type=int, default=1024, help="tokens per small-preset step (batch = tokens / T)")
    p.add_argument("--embd", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="formulations: batch at T = --seq")
    p.add_argument("--seq", type=int, default=256, help="formulations: tokens per step = batch * seq")
    p.add_argument("--formulation-seqs", type=ints, default=[256, 1024], help="sequence lengths for the formulation comparison (same tokens each)")
    p.add_argument("--formulation-reps", type=int, default=1, help="steps per variant per round in the formulation comparison (default 1)")
    p.add_argument("--kernel-seqs", type=ints, default=[1024, 2048, 4096], help="kernel section (cuda): sequence lengths")
    p.add_argument("--kernel-batch", type=int, default=4)
    p.add_argument("--kernel-heads", type=int, default=16)
    p.add_argument("--kernel-head-dim", type=int, default=64)
    p.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but kernel on cpu, mixer,kernel on cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.reps < 1 or args.formulation_reps < 1 or not args.windows or min(args.windows) < 1:
        p.error("--rounds, --reps and every window must be >= 1")
    if not args.seqs or min(args.seqs) < 1 or min(args.kernel_seqs, default=1) < 1:
        p.error("--seqs and --kernel-seqs must be >= 1")
    if args.sections is None:
        args.sections = "mixer,kernel" if args.device.startswith("cuda") else "mixer,model,formulations"
    return args


def run_sections(args: argparse.Namespace, device: torch.device, sections: list[str]) -> dict:
    benches = {"mixer": bench_mixer, "model": bench_model, "formulations": bench_formulations, "kernel": bench_kernel}
    return {name: benches[name](args, device) for name in SECTIONS if name in sections}


def cpu_memory(argv: list[str]) -> dict:
    """Run the same sections in a child with glibc's mmap threshold pinned; its peak bytes."""
    log("memory pass (child process)")
    env = {**os.environ, MMAP_ENV: "65536"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-only"],
        env=env, stdout=subprocess.PIPE, text=True, check=True,
    )
    return json.loads(proc.stdout)


def section_results(report: dict) -> list[dict]:
    """Every {"results": ...} block of a report, in a fixed order."""
    return [part[k] for name in SECTIONS if (part := report.get(name)) is not None for k in part]


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(raw_argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device: {args.device!r} is not cpu or cuda")
        sections = [s for s in args.sections.split(",") if s]
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise ValueError(f"--sections: unknown {sorted(unknown)}")
        if "kernel" in sections and device.type != "cuda":
            raise ValueError("--sections kernel: needs --device cuda")
        if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
            raise ValueError("CPU memory needs Linux /proc (VmHWM, clear_refs)")
    except (ValueError, RuntimeError) as e:
        print(f"mixer.py: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(run_sections(args, device, sections)))
        return 0
    t0 = time.time()
    report: dict = {
        "benchmark": "mixer",
        "machine": machine(device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "memory_method": (
            "torch.cuda.max_memory_allocated minus memory_allocated before the step"
            if device.type == "cuda"
            else f"separate process with {MMAP_ENV}=65536: VmHWM (reset via /proc/self/clear_refs) minus VmRSS before the step"
        ),
        "timing": (
            "median wall seconds per forward+backward step over interleaved rounds; ratios are variant / attention; "
            "on CPU also the ratio of median process CPU time, which other load on the machine disturbs less"
        ),
    }
    report.update(run_sections(args, device, sections))
    if device.type == "cpu":
        memory = cpu_memory(raw_argv)
        for block, mem_block in zip(section_results(report), section_results(memory)):
            for name, r in block["results"].items():
                r["peak_bytes"] = mem_block["results"][name]["peak_bytes"]
    for block in section_results(report):
        block["results"] = with_ratios(block["results"], block.pop("tokens"))
    if "model" in report and device.type == "cpu":
        report["goal"] = goal(report)
    report["wall_s"] = round(time.time() - t0, 1)
    return emit_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
