"""Build the one `TorchTrainer` of a job, and refuse jobs the cluster cannot place.

    TorchTrainer(train_loop_per_worker,
                 train_loop_config={"spec", "manifest", "domains", "metrics_dir"},
                 scaling_config=ScalingConfig(num_workers=W, use_gpu=..., resources_per_worker=...),
                 run_config=RunConfig(name="checkpoints", storage_path=<run dir>, failure_config=..., checkpoint_config=...),
                 torch_config=TorchConfig(backend="gloo" | "nccl"))

Members are different models, so there is no DDP and no `prepare_model`: the
workers use torch.distributed collectives directly (cluster.merge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leviathan.config import EnsembleConfig
from leviathan.storage import join, normalize

CHECKPOINTS_NAME = "checkpoints"
# Restarts of the controller itself (e.g. a worker group that cannot start):
# bounded, so a job that lost its capacity fails instead of waiting forever.
CONTROLLER_FAILURE_LIMIT = 2


class PlacementError(ValueError):
    """The cluster cannot host the job's workers; the message says what is missing."""


def worker_resources(spec: Any) -> dict[str, float]:
    r = spec.resources
    out = {"CPU": float(r.cpus_per_worker)}
    if r.use_gpu:
        out["GPU"] = float(r.gpus_per_worker)
    return out


def check_placement(spec: Any, nodes: list[dict[str, Any]] | None = None) -> None:
    """Fail fast when the cluster cannot hold the job's workers.

    Each worker needs `resources_per_worker` on a single node, so a worker
    fits if some alive node has that much in total; W workers need W such
    slots over the cluster. `nodes` defaults to `ray.nodes()` (alive ones).
    Resources in use by other jobs are not counted: those free up, missing
    hardware does not.
    """
    if nodes is None:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
    need = worker_resources(spec)
    W = spec.num_workers
    slots = 0
    for n in nodes:
        res = n.get("Resources", {})
        slots += int(min(res.get(k, 0.0) / v for k, v in need.items()) + 1e-9)
    if slots >= W:
        return
    totals = {k: sum(n.get("Resources", {}).get(k, 0.0) for n in nodes) for k in need}
    asked = ", ".join(f"{v:g} {k}" for k, v in need.items())
    have = ", ".join(f"{v:g} {k}" for k, v in totals.items())
    hint = " (set resources.use_gpu = false to train on CPUs)" if spec.resources.use_gpu and totals.get("GPU", 0) == 0 else ""
    raise PlacementError(
        f"cannot place job {spec.name!r}: {W} workers x ({asked}) each, but the cluster "
        f"({len(nodes)} node(s), {have} in total) fits only {slots}{hint}"
    )


def build_trainer(
    spec: Any,
    *,
    manifest: str | Path,
    domains: list[str],
    ensemble: EnsembleConfig,
    run_name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    profile: bool = False,
):
    """The job's `ray.train.torch.TorchTrainer`.

    `spec` is a validated JobSpec (the schema belongs to `jobs/`, the layer above;
    `jobs.plan.build_job_trainer` resolves it into `manifest`, module i's domain
    `domains[i]`, and the model library's `ensemble` config).

    Default layout: checkpoints in `<spec.run_dir>/checkpoints`, metrics.jsonl in
    `<spec.run_dir>`. With `run_name` (one trainer per Tune trial), checkpoints
    and metrics.jsonl both go to `<storage_path or spec.run_dir>/<run_name>`.
    `profile` (benchmarks) times phase-2 steps and their collectives and adds
    the medians to the last report's metrics under "profile".
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.session import configure_train_env
    from cluster.worker import train_loop_per_worker

    configure_train_env()

    storage = normalize(storage_path or spec.run_dir)
    name = run_name or CHECKPOINTS_NAME
    metrics_dir = storage if run_name is None else join(storage, run_name)
    r = spec.resources
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec,
            "ensemble": ensemble.to_dict(),
            "manifest": str(manifest),
            "domains": domains,
            "metrics_dir": metrics_dir,
            "profile": profile,
        },
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers,
            use_gpu=r.use_gpu,
            resources_per_worker=worker_resources(spec),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(
                max_failures=r.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
    )
