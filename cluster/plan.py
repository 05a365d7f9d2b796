"""The run plan: everything a training job's workers need, and nothing else.

`jobs.plan.build_plan` resolves a JobSpec into a `RunPlan` once, on the
driver; `cluster.trainer` and every Ray Train worker receive only the plan.
It is made of plain frozen dataclasses from this layer and the model
library's `EnsembleConfig`, so unpickling it on a worker imports neither the
spec's schema (`jobs/`) nor pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from leviathan.config import EnsembleConfig


@dataclass(frozen=True)
class Training:
    """The schedule and optimiser settings (the JobSpec's `training` table, same names)."""

    phase1_steps: int
    phase2_steps: int
    batch_size: int
    seq_len: int
    lr: float
    merge_lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    eval_interval: int
    eval_batches: int
    checkpoint_interval: int
    joint: bool
    joint_lr_scale: float
    dtype: str
    evidence_lr_scale: float
    switch_fraction: float


@dataclass(frozen=True)
class Resources:
    """What each of the `num_workers` Ray Train workers asks the cluster for."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int

    def per_worker(self) -> dict[str, float]:
        """Ray's `resources_per_worker`: CPUs, and GPUs when the job uses them."""
        out = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            out["GPU"] = float(self.gpus_per_worker)
        return out


@dataclass(frozen=True)
class Tracking:
    """Where rank 0 logs the run besides metrics.jsonl (the JobSpec's `tracking` table).

    `params` is the flattened JobSpec (`training.lr` -> "0.003"), logged as the
    MLflow run's parameters."""

    mlflow_uri: str | None = None
    experiment: str = "leviathan"
    tensorboard: bool = False
    params: tuple[tuple[str, str], ...] = ()

    @property
    def enabled(self) -> bool:
        return self.mlflow_uri is not None or self.tensorboard


@dataclass(frozen=True)
class RunPlan:
    """One job as the cluster runs it.

    `ensemble` is the one source of the module and member counts; module i
    trains on the train shard of `domains[i]` in the prepared `manifest`.
    Checkpoints and metrics.jsonl live under `run_dir` (a local path or a URI).
    """

    name: str
    seed: int
    run_dir: str
    manifest: str
    domains: tuple[str, ...]
    ensemble: EnsembleConfig
    training: Training
    resources: Resources
    tracking: Tracking = field(default_factory=Tracking)

    def __post_init__(self) -> None:
        if len(self.domains) != self.ensemble.modules:
            raise ValueError(f"domains: {len(self.domains)} domains for {self.ensemble.modules} modules")
        if not 1 <= self.resources.num_workers <= self.ensemble.modules:
            raise ValueError(
                f"resources.num_workers: {self.resources.num_workers} workers for {self.ensemble.modules} modules"
            )
