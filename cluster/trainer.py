"""Build the one `TorchTrainer` of a job, and refuse jobs the cluster cannot place.

    TorchTrainer(train_loop_per_worker,
                 train_loop_config={"plan": RunPlan, "metrics_dir": folder of metrics.jsonl, "profile": bool, "verbose": bool},
                 scaling_config=ScalingConfig(num_workers=W, use_gpu=..., resources_per_worker=...),
                 run_config=RunConfig(name="<run name>/checkpoints", storage_path=<storage root>, failure_config=..., checkpoint_config=...),
                 torch_config=TorchConfig(backend="gloo" | "nccl"))

Members are different models, so there is no DDP and no `prepare_model`: the
workers use torch.distributed collectives directly (cluster.merge).

The Train run is named after the run. In Ray Train V2 `RunConfig.name` is also the
run's folder under `storage_path` (`<storage_path>/<name>`), with no separate display
name, so "<run name>/checkpoints" under the storage root both names the run in
Ray's Train state API and dashboard and keeps the checkpoints in `<run>/checkpoints/`.
A re-run with the same spec reaches the same folder, so it resumes there.
"""

from __future__ import annotations

from typing import Any

from cluster.plan import Resources, RunPlan
from leviathan.run.capacity import capacity, describe
from leviathan.run.folder import CHECKPOINTS_DIR
from leviathan.run.storage import join, normalize

# Restarts of the controller itself (e.g. a worker group that cannot start):
# bounded, so a job that lost its capacity fails instead of waiting forever.
CONTROLLER_FAILURE_LIMIT = 2


class PlacementError(ValueError):
    """The cluster cannot host the job's workers; the message says what is missing."""


def check_placement(resources: Resources, name: str, nodes: list[dict[str, Any]] | None = None) -> None:
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
    need = resources.per_worker()
    W = resources.num_workers
    cap = capacity(need, (n.get("Resources", {}) for n in nodes))
    if cap.fits(W):
        return
    totals = cap.totals
    hint = " (set resources.use_gpu = false to train on CPUs)" if resources.use_gpu and totals.get("GPU", 0) == 0 else ""
    raise PlacementError(
        f"cannot place job {name!r}: {W} workers x ({describe(need)}) each, but the cluster "
        f"({cap.nodes} node(s), {describe(totals)} in total) fits only {cap.slots}{hint}"
    )


def build_trainer(
    plan: RunPlan,
    *,
    run_name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    profile: bool = False,
    verbose: bool = False,
):
    """The job's `ray.train.torch.TorchTrainer`.

    Default layout: checkpoints in `<plan.run_dir>/checkpoints`, metrics.jsonl in
    `<plan.run_dir>`; the Train run is called "<run name>/checkpoints" (module doc).
    With `run_name` (one trainer per Tune trial), checkpoints and metrics.jsonl both
    go to `<storage_path or plan.run_dir>/<run_name>`.
    `profile` (benchmarks) times phase-2 steps and their collectives and adds
    the medians to the last report's metrics under "profile". `verbose` shows
    Ray Train's own per-report and checkpoint INFO lines (cluster.verbosity).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.session import configure_train_env
    from cluster.verbosity import ray_train_log_level
    from cluster.worker import train_loop_per_worker

    configure_train_env()

    if run_name is None:
        storage = normalize(plan.folder.storage_root)
        name = f"{plan.folder.name}/{CHECKPOINTS_DIR}"
        metrics_dir = normalize(plan.run_dir)
    else:
        storage = normalize(storage_path or plan.run_dir)
        name = run_name
        metrics_dir = join(storage, run_name)
    r = plan.resources
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan, "metrics_dir": metrics_dir, "profile": profile, "verbose": verbose},
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,
            resources_per_worker=r.per_worker(),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(
                max_failures=r.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=ray_train_log_level(verbose)),
        ),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
    )
