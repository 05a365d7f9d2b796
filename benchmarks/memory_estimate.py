"""GPU memory per worker for each phase of a spec (default: the giant spec), estimated on CPU.

A full base step does not fit this machine, so the activations are measured
at small sizes and extrapolated linearly in tokens (B * T) to the spec's
batch_size and seq_len; the rest is exact from parameter counts.

Per worker (one GPU, one module = `members_per_module` members; W workers):

    phase 1 (members):  weights + grads + AdamW moments of the worker's members (fp32: 4 + 4 + 8 B/param)
                        + the replicated merger's and the projections' weights (4 B/param)
                        + activations of the largest member's step (members step one after another)
    phase 2 (merge):    members' weights (4 B/param; joint = false: no grads, no optimiser)
                        + merger and projections with grads and AdamW (16 B/param)
                        + the gathered states (M, B, T, D) in bf16
                        + projection inputs (the worker's members' hidden states, B, T, C, bf16)
                        + activations of the merger on the worker's B / W rows

Activations are counted per mixer path, for what that path saves:

    triton       the GPU's path: the kernel's autograd op saves q, k, v (views of the
                 attention projection's output), the fp32 lag weights, out and lse; the
                 launch is replaced by a CPU reference for the count (`triton_on_cpu`)
    lag_stacked  SDPA on queries and keys stacked d*w wide (CUDA without Triton, or with
                 dropout): the stacked tensors are saved; on CPU the values are zero-padded
                 to d*w too, so this count is an upper bound for the GPU's

Activations = the bytes autograd saves for backward (`saved_tensors_hooks`,
each storage counted once, parameters left out), measured on CPU under bf16
autocast as on the GPU. Score matrices (..., T, T), which CPU's math SDPA
keeps but the GPU's memory-efficient and flash kernels do not, are counted
apart and left out of the estimate. A fit a + b * tokens over the measured
points gives the extrapolation (a holds autocast's bf16 weight copies).
Transient buffers of the backward pass and the allocator's fragmentation
come on top: `benchmarks/gpu_check.py` reports the measured peak of one base
member at B = 32, T = 512 to compare with.

    python benchmarks/memory_estimate.py [--spec jobs/specs/giant.toml] [--paths triton,lag_stacked] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.common import emit_report  # noqa: E402

GIANT_SPEC = REPO_ROOT / "jobs" / "specs" / "giant.toml"
POINTS = ((1, 64), (2, 64), (1, 128), (2, 128))  # (B, T) measured
GIB = 2**30


class SavedBytes:
    """Bytes autograd saves for backward inside the block: each storage once, parameters excluded.
    `scores`: the part in (..., T, T) tensors (the math SDPA backend's attention matrices)."""

    def __init__(self, seq_len: int, parameters: list[torch.Tensor]):
        self.seq_len = seq_len
        self.seen = {p.untyped_storage().data_ptr() for p in parameters}
        self.total = self.scores = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.total += storage.nbytes()
            if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == self.seq_len:
                self.scores += storage.nbytes()
        return t

    def measure(self, forward: Callable[[], torch.Tensor]) -> dict[str, int]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = forward()
        del out
        return {"saved": self.total - self.scores, "scores": self.scores}


def fit(points: list[tuple[int, int]], values: list[int]) -> tuple[float, float, float]:
    """Least-squares a + b * tokens over (B, T) points; returns (a, b, worst relative residual)."""
    n = torch.tensor([float(B * T) for B, T in points], dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)
    A = torch.stack([torch.ones_like(n), n], dim=1)
    a, b = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1).tolist()
    worst = ((A @ torch.tensor([a, b], dtype=torch.float64) - y).abs() / y).max().item()
    return a, b, worst


PATHS = ("triton", "lag_stacked")


@contextlib.contextmanager
def triton_on_cpu():
    """The Triton path's autograd op on CPU with its launch replaced by a reference forward,
    so the op saves for backward exactly what it saves on the GPU. Restores both on exit."""
    from leviathan.kernels import shifted_diagonal as kernel
    from leviathan.model.correlation import shifted_diagonal

    def reference(q, k, v, lag_weight, scale, **_):
        with torch.no_grad():
            out = shifted_diagonal(q, k, v, lag_weight, scale)
        return out, q.new_zeros(q.shape[:-1], dtype=torch.float32)

    launch, interpret = kernel.forward, os.environ.get("TRITON_INTERPRET")
    kernel.forward, os.environ["TRITON_INTERPRET"] = reference, "1"  # "1": the mixer may take the path on CPU
    try:
        yield
    finally:
        kernel.forward = launch
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def member_activations(config, vocab_size: int, path: str = "triton") -> dict[str, Any]:
    """Saved-for-backward bytes of one member's training forward (loss included) at every point,
    with its mixer on `path`."""
    from leviathan.model.component import build_component
    from leviathan.model.correlation import MultiHeadedCorrelation

    if path not in PATHS:
        raise ValueError(f"path: one of {PATHS}, got {path!r}")
    torch.manual_seed(0)
    model = build_component(config).train()
    for m in model.modules():
        if isinstance(m, MultiHeadedCorrelation):
            m.force_path = path
    rows = []
    with triton_on_cpu() if path == "triton" else contextlib.nullcontext():
        for B, T in POINTS:
            x = torch.randint(0, vocab_size, (B, T + 1))
            counter = SavedBytes(T, list(model.parameters()))
            rows.append({"B": B, "T": T, **counter.measure(lambda: model(x[:, :-1], x[:, 1:])[1])})
    return {"params": model.num_params(), "path": path, "points": rows}


def member_step_estimate(config, batch_size: int, seq_len: int, path: str) -> dict[str, float]:
    """GiB of one member's training step on `path`: weights, grads, AdamW (16 B/param) and the
    activations extrapolated to batch_size x seq_len (what `benchmarks/gpu_check.py` measures)."""
    measured = member_activations(config, config.vocab_size, path)
    activations = extrapolate(measured, batch_size * seq_len)["at_target_bytes"]
    state = 16 * measured["params"]
    return {"weights_grads_adamw": state / GIB, "activations": activations / GIB, "total": (state + activations) / GIB}


def merger_activations(ensemble_config) -> dict[str, Any]:
    """Saved-for-backward bytes of the merger (loss included) on (B, T) rows of states."""
    from leviathan.model.ensemble import CorrelationMerger

    torch.manual_seed(0)
    merger = CorrelationMerger(ensemble_config)
    M, D, V = ensemble_config.num_members, ensemble_config.merge_width, ensemble_config.vocab_size
    rows = []
    for B, T in POINTS:
        states = torch.randn(B, T, M, D, requires_grad=True)
        y = torch.randint(0, V, (B, T))
        # The members' log-probs of the targets: the evidence term and the mixture loss read them.
        target_lp = -5 * torch.rand(B, T, M)
        counter = SavedBytes(T, list(merger.parameters()))
        rows.append({"B": B, "T": T, **counter.measure(lambda: merger(states, target_logprobs=target_lp, targets=y).loss)})
    return {"params": sum(p.numel() for p in merger.parameters()), "points": rows}


def extrapolate(measured: dict[str, Any], tokens: int) -> dict[str, float]:
    points = [(r["B"], r["T"]) for r in measured["points"]]
    a, b, worst = fit(points, [r["saved"] for r in measured["points"]])
    return {"fixed_bytes": a, "bytes_per_token": b, "fit_worst_relative_residual": worst, "at_target_bytes": a + b * tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(GIANT_SPEC), help="spec file (its placeholders need not be set)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the prepared corpus (BPE default 4096)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"mixer paths to count, of {PATHS}")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if not paths or not set(paths) <= set(PATHS):
        p.error(f"--paths: a comma-separated subset of {PATHS}, got {args.paths!r}")

    from jobs.spec import EnsembleSpec, ResourcesSpec, TrainingSpec

    started = time.process_time()
    torch.set_num_threads(1)
    raw = tomllib.loads(Path(args.spec).read_text())
    ens_spec = EnsembleSpec.model_validate(raw["ensemble"])
    training = TrainingSpec.model_validate(raw["training"])
    workers = ResourcesSpec.model_validate(raw.get("resources", {})).workers or ens_spec.modules
    B, T = training.batch_size, training.seq_len
    config = ens_spec.to_config(vocab_size=args.vocab_size, block_size=max(256, T))
    k = config.members_per_module
    local = config.members[:k]  # module 0's members: every worker hosts one module of the same shapes
    tokens = B * T

    members: dict[str, dict[str, Any]] = {path: {} for path in paths}
    for path in paths:
        for c in local:
            measured = member_activations(c, args.vocab_size, path)
            members[path][c.flavour] = {**measured, "extrapolated": extrapolate(measured, tokens)}
    merger = merger_activations(config)
    rows_per_worker = -(-B // workers)  # ceil(B / W): the most rows a rank merges
    merger["extrapolated"] = extrapolate(merger, rows_per_worker * T)

    member_params = sum(c.num_params for c in local)
    projection_params = sum(c.n_embd * config.merge_width for c in local)
    merger_params = merger["params"]
    phase1 = {}
    for path in paths:
        flavour, largest = max(members[path].items(), key=lambda kv: kv[1]["extrapolated"]["at_target_bytes"])
        parts = {
            "members_weights_grads_adamw": 16 * member_params,
            "merger_and_projections_weights": 4 * (merger_params + projection_params),
            "activations_largest_member_step": largest["extrapolated"]["at_target_bytes"],
        }
        phase1[path] = {**{k_: v / GIB for k_, v in parts.items()}, "total": sum(parts.values()) / GIB,
                        "largest_member": flavour}
    bf16 = 2
    phase2 = {
        "members_weights": 4 * member_params,
        "merger_and_projections_weights_grads_adamw": 16 * (merger_params + projection_params),
        "gathered_states": bf16 * config.num_members * B * T * config.merge_width,
        "projection_inputs": bf16 * sum(c.n_embd for c in local) * B * T,
        "merger_activations": merger["extrapolated"]["at_target_bytes"],
    }
    report = {
        "benchmark": "memory_estimate",
        "spec": str(Path(args.spec).resolve().relative_to(REPO_ROOT)) if Path(args.spec).resolve().is_relative_to(REPO_ROOT) else args.spec,
        "target": {"batch_size": B, "seq_len": T, "workers": workers, "members_per_worker": k,
                   "merge_rows_per_worker": rows_per_worker, "vocab_size": args.vocab_size, "dtype": "bfloat16 autocast"},
        "measured_points": [{"B": b, "T": t} for b, t in POINTS],
        "members": members,
        "merger": merger,
        "per_gpu_gib": {
            "phase1_by_path": phase1,
            "phase2": {**{k_: v / GIB for k_, v in phase2.items()}, "total": sum(phase2.values()) / GIB},
        },
        "not_included": "transient buffers of the backward pass, evaluation batches, the CUDA context (~0.5 GiB), allocator fragmentation",
        "cpu_s": round(time.process_time() - started, 1),
    }
    return emit_report(report, args.out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
