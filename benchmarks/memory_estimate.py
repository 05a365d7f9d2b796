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

Activations = the bytes autograd saves for backward (`saved_tensors_hooks`,
each storage counted once, parameters left out), measured on CPU under bf16
autocast as on the GPU. Score matrices (..., T, T), which CPU's math SDPA
keeps but the GPU's memory-efficient and flash kernels do not, are counted
apart and left out of the estimate. A fit a + b * tokens over the measured
points gives the extrapolation (a holds autocast's bf16 weight copies).
Transient buffers of the backward pass and the allocator's fragmentation
come on top: `benchmarks/gpu_check.py` reports the measured peak of one base
member at B = 32, T = 512 to compare with.

    python benchmarks/memory_estimate.py [--spec jobs/specs/giant.toml] [--out FILE]
"""

from __future__ import annotations

import argparse
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


def member_activations(config, vocab_size: int) -> dict[str, Any]:
    """Saved-for-backward bytes of one member's training forward (loss included) at every point."""
    from leviathan.model.component import build_component

    torch.manual_seed(0)
    model = build_component(config).train()
    rows = []
    for B, T in POINTS:
        x = torch.randint(0, vocab_size, (B, T + 1))
        counter = SavedBytes(T, list(model.parameters()))
        rows.append({"B": B, "T": T, **counter.measure(lambda: model(x[:, :-1], x[:, 1:])[1])})
    return {"params": model.num_params(), "points": rows}


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
        counter = SavedBytes(T, list(merger.parameters()))
        rows.append({"B": B, "T": T, **counter.measure(lambda: merger(states, targets=y).loss)})
    return {"params": sum(p.numel() for p in merger.parameters()), "points": rows}


def extrapolate(measured: dict[str, Any], tokens: int) -> dict[str, float]:
    points = [(r["B"], r["T"]) for r in measured["points"]]
    a, b, worst = fit(points, [r["saved"] for r in measured["points"]])
    return {"fixed_bytes": a, "bytes_per_token": b, "fit_worst_relative_residual": worst, "at_target_bytes": a + b * tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(GIANT_SPEC), help="spec file (its placeholders need not be set)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the prepared corpus (BPE default 4096)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

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

    members = {}
    for c in local:
        measured = member_activations(c, args.vocab_size)
        members[c.flavour] = {**measured, "extrapolated": extrapolate(measured, tokens)}
    merger = merger_activations(config)
    rows_per_worker = -(-B // workers)  # ceil(B / W): the most rows a rank merges
    merger["extrapolated"] = extrapolate(merger, rows_per_worker * T)

    member_params = sum(c.num_params for c in local)
    projection_params = sum(c.n_embd * config.merge_width for c in local)
    merger_params = merger["params"]
    activations_1 = max(m["extrapolated"]["at_target_bytes"] for m in members.values())
    phase1 = {
        "members_weights_grads_adamw": 16 * member_params,
        "merger_and_projections_weights": 4 * (merger_params + projection_params),
        "activations_largest_member_step": activations_1,
    }
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
            "phase1": {**{k_: v / GIB for k_, v in phase1.items()}, "total": sum(phase1.values()) / GIB},
            "phase2": {**{k_: v / GIB for k_, v in phase2.items()}, "total": sum(phase2.values()) / GIB},
        },
        "not_included": "transient buffers of the backward pass, evaluation batches, the CUDA context (~0.5 GiB), allocator fragmentation",
        "cpu_s": round(time.process_time() - started, 1),
    }
    return emit_report(report, args.out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
