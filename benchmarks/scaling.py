"""Scaling of a Leviathan job on Ray Train (run by hand; prints and writes JSON).

Two jobs, side by side in one run, through the real TorchTrainer path:

- 1 worker hosting 1 module, and 2 workers hosting 1 module each, run in
  the order 1, 2, 2, 1 (ABBA, so drift in the machine's load cancels): the same
  load per worker (modules x members_per_module members, batch, sequence).
  Phase-1 throughput = sum over members of tokens/s (members on one worker
  train one after another, so a worker's throughput is the sum of its
  members'); ideal scaling doubles it.
- The share of a phase-2 step spent in collectives (the differentiable
  all_gather of the members' states, its backward, the all_reduce of the
  merger's gradients), timed on every step of the 2-worker job (rank 0;
  waiting for the slower rank counts as collective time).

    python benchmarks/scaling.py [--members 2] [--preset tiny] [--steps 120] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import emit_report, machine_info  # noqa: E402


def job_spec(args: argparse.Namespace, workers: int, storage: str, manifest: str):
    from jobs.spec import JobSpec

    return JobSpec.model_validate({
        "name": f"scaling-{workers}w",
        "storage": storage,
        "data": {"manifest": manifest},
        "ensemble": {
            "modules": workers,
            "members_per_module": args.members,
            "members": [{"preset": args.preset, "flavour": f} for f in ("gelu4", "relu3", "leaky6")[: args.members]]
            if args.members <= 3 else [{"preset": args.preset}] * args.members,
            "merge_width": 64, "merge_heads": 4,
        },
        "training": {
            "phase1_steps": args.steps, "phase2_steps": args.merge_steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len,
            "eval_interval": args.eval_interval, "eval_batches": 1,
            "checkpoint_interval": 10 * (args.steps + args.merge_steps),
        },
        "resources": {"workers": workers, "cpus_per_worker": args.cpus_per_worker},
    })


def run_job(spec) -> dict:
    """Fit one job; phase-1 tokens/s per eval interval (first one skipped: warmup) and the phase-2 profile."""
    from cluster.metrics import MetricsLog
    from jobs.plan import build_job_trainer

    start = time.perf_counter()
    result = build_job_trainer(spec, profile=True).fit()
    wall = time.perf_counter() - start
    records = MetricsLog(spec.run_dir).read()
    per_step: dict[int, float] = {}
    for r in records:
        if r["phase"] == "members" and r["module"] is not None and r["tokens_per_s"]:
            per_step[r["step"]] = per_step.get(r["step"], 0.0) + r["tokens_per_s"]
    intervals = [per_step[s] for s in sorted(per_step)][1:] or list(per_step.values())
    return {
        "workers": spec.num_workers,
        "members": spec.ensemble.num_members,
        "wall_s": round(wall, 2),
        "phase1_tokens_per_s_median": statistics.median(intervals),
        "phase1_tokens_per_s_intervals": [round(v, 1) for v in intervals],
        "phase2": result.metrics.get("profile"),
    }



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--members", type=int, default=2, help="members per module (= per worker)")
    p.add_argument("--steps", type=int, default=120, help="phase-1 steps")
    p.add_argument("--merge-steps", type=int, default=40, help="phase-2 steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--manifest", default=None, help="prepared data (default: the built-in corpus)")
    p.add_argument("--repeats", type=int, default=2, help="ABBA rounds (1 = one job of each)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    import ray
    import torch

    from cluster.session import init_ray
    from jobs.prepare import ensure_builtin

    manifest = args.manifest or str(ensure_builtin("byte"))
    init_ray(num_cpus=max(2, os.cpu_count() or 2))
    runs: dict[int, list[dict]] = {1: [], 2: []}
    order = [w for i in range(args.repeats) for w in ((1, 2) if i % 2 == 0 else (2, 1))]
    with tempfile.TemporaryDirectory(prefix="leviathan-scaling-") as storage:
        for i, workers in enumerate(order):
            spec = job_spec(args, workers, f"{storage}/{i}", manifest)
            runs[workers].append(run_job(spec))

    def summary(results: list[dict]) -> dict:
        intervals = [v for r in results for v in r["phase1_tokens_per_s_intervals"]]
        profiles = [r["phase2"] for r in results if r["phase2"]]
        return {
            "workers": results[0]["workers"],
            "members": results[0]["members"],
            "jobs": len(results),
            "wall_s": [r["wall_s"] for r in results],
            "phase1_tokens_per_s_median": statistics.median(intervals),
            "phase1_tokens_per_s_intervals": intervals,
            "phase2_step_s_median": statistics.median(p["phase2_step_s_median"] for p in profiles),
            "phase2_comm_s_median": statistics.median(p["phase2_comm_s_median"] for p in profiles),
            "phase2_comm_share_median": statistics.median(p["phase2_comm_share_median"] for p in profiles),
        }

    one, two = summary(runs[1]), summary(runs[2])
    report = {
        "benchmark": "scaling",
        "machine": machine_info(torch=torch.__version__, ray=ray.__version__, load_avg_1m=os.getloadavg()[0]),
        "shapes": {
            "preset": args.preset, "members_per_worker": args.members, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "phase1_steps": args.steps, "phase2_steps": args.merge_steps,
            "cpus_per_worker": args.cpus_per_worker,
        },
        "one_worker": one,
        "two_workers": two,
        "phase1_speedup_2_vs_1": two["phase1_tokens_per_s_median"] / one["phase1_tokens_per_s_median"],
        "phase2_comm_share_2_workers": two["phase2_comm_share_median"],
    }
    return emit_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
