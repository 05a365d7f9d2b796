"""One-GPU check of the real training path: TorchTrainer, NCCL, bf16 autocast.

Trains a small ensemble (2 modules x 1 member on one worker by default,
preset `base` = the seed's 20-layer LeviathanComponent) for about a minute on
one GPU through `jobs.plan.build_job_trainer` (use_gpu, dtype bfloat16,
NCCL backend), then prints JSON with phase-1 tokens/s and the model FLOPs
utilisation:

    MFU = sum_m 6 * N_m * tokens_per_s_m / peak

N_m = member m's parameters without position embeddings (the tied
embedding / LM head counted once); the correlation mixer's extra lag-window
score FLOPs are not counted, so MFU is a lower bound. Peak: dense bf16
tensor-core FLOP/s of the detected GPU (H100/H200 SXM: 989 TFLOP/s; pass
--peak-tflops for another card). Needs only the repository and its venv.

    python benchmarks/gpu_check.py [--preset base] [--steps 300] [--out FILE]
    python benchmarks/gpu_check.py --cpu --preset tiny --steps 40 --seq-len 128   # smoke test, no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_tflops(name: str) -> tuple[float | None, str]:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"{key} dense bf16 ({value:g} TFLOP/s)"
    return None, "unknown GPU: pass --peak-tflops"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--modules", type=int, default=2)
    p.add_argument("--steps", type=int, default=300, help="phase-1 steps")
    p.add_argument("--merge-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--cpu", action="store_true", help="smoke-test the script on CPU (gloo, float32, no MFU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import ray
    import torch

    use_gpu = not args.cpu
    if use_gpu and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device visible to torch", "torch": torch.__version__}))
        return 1
    gpu = torch.cuda.get_device_name(0) if use_gpu else "cpu"
    if args.peak_tflops:
        peak, peak_note = args.peak_tflops, f"--peak-tflops {args.peak_tflops:g}"
    else:
        peak, peak_note = peak_tflops(gpu) if use_gpu else (None, "cpu smoke test: no MFU")

    with tempfile.TemporaryDirectory(prefix="leviathan-gpu-") as home:
        os.environ["LEVIATHAN_HOME"] = home
        from jobs.plan import ensemble_config
        from cluster.metrics import MetricsLog
        from cluster.session import init_ray
        from jobs.plan import build_job_trainer
        from jobs.prepare import ensure_builtin
        from jobs.spec import JobSpec
        from leviathan.data import load_manifest
        from leviathan.model import build_component

        manifest = ensure_builtin("byte")
        spec = JobSpec.model_validate({
            "name": "gpu-check",
            "storage": str(Path(home) / "runs"),
            "data": {"manifest": str(manifest)},
            "ensemble": {
                "modules": args.modules, "members_per_module": 1, "members": [{"preset": args.preset}],
                "merge_width": 256, "merge_heads": 8,
            },
            "training": {
                "phase1_steps": args.steps, "phase2_steps": args.merge_steps, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "lr": 6e-4, "merge_lr": 3e-4, "warmup_steps": 20,
                "eval_interval": args.eval_interval, "eval_batches": 2,
                "checkpoint_interval": 10 * (args.steps + args.merge_steps),
                "dtype": "bfloat16" if use_gpu else "float32",
            },
            "resources": {"workers": 1, "use_gpu": use_gpu, "gpus_per_worker": 1, "cpus_per_worker": 1},
        })
        config = ensemble_config(spec, load_manifest(manifest).vocab_size)
        params = [build_component(c).num_params(non_embedding=True) for c in config.members]

        init_ray()
        start = time.perf_counter()
        trainer = build_job_trainer(spec, profile=True)
        result = trainer.fit()
        wall = time.perf_counter() - start
        records = MetricsLog(spec.run_dir).read()

    by_step: dict[int, dict[str, float]] = {}
    for r in records:
        if r["phase"] == "members" and r["module"] is not None and r["tokens_per_s"]:
            by_step.setdefault(r["step"], {})[r["member"]] = r["tokens_per_s"]
    steps = sorted(by_step)[1:] or sorted(by_step)  # the first interval includes warmup / compilation
    names = config.member_names
    tps = [sum(by_step[s].values()) for s in steps]
    flops = [sum(6 * params[names.index(m)] * v for m, v in by_step[s].items()) for s in steps]
    final = next((r for r in records if r["phase"] == "final" and r["member"] == "merger"), None)
    report = {
        "benchmark": "gpu_check",
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "backend": "nccl" if use_gpu else "gloo",
        "dtype": "bfloat16" if use_gpu else "float32",
        "shapes": {
            "preset": args.preset, "members": len(params), "params_per_member_non_embedding": params,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "phase1_steps": args.steps,
            "phase2_steps": args.merge_steps,
        },
        "wall_s": round(wall, 1),
        "phase1_tokens_per_s_median": statistics.median(tps) if tps else None,
        "model_tflops_median": statistics.median(flops) / 1e12 if flops else None,
        "peak_tflops": peak,
        "peak_used": peak_note,
        "mfu_median": statistics.median(flops) / (peak * 1e12) if flops and peak else None,
        "phase2": result.metrics.get("profile"),
        "merged_mixed_val_loss": final["mixed_val_loss"] if final else None,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
