"""The run plan: everything a training job's workers need, and nothing else.

`jobs.plan.build_plan` resolves a JobSpec into a `RunPlan` once, on the
driver; `cluster.trainer` and every Ray Train worker receive only the plan.
It is made of plain frozen dataclasses from this layer and the model
library's `EnsembleConfig` and `TrainingConfig` (the spec's `training` table is
derived from the latter, so nothing here copies its fields), and unpickling it
on a worker imports neither the spec's schema (`jobs/`) nor pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.placement import modules_for_rank
from leviathan.config import EnsembleConfig, TrainingConfig
from leviathan.run.folder import RunFolder


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
    `spec_json` is the validated spec as the run folder keeps it (spec.json, and
    final/spec.json beside the model).
    """

    name: str
    seed: int
    run_dir: str
    manifest: str
    domains: tuple[str, ...]
    ensemble: EnsembleConfig
    training: TrainingConfig
    resources: Resources
    tracking: Tracking = field(default_factory=Tracking)
    spec_json: str = ""

    def __post_init__(self) -> None:
        if len(self.domains) != self.ensemble.modules:
            raise ValueError(f"domains: {len(self.domains)} domains for {self.ensemble.modules} modules")
        if not 1 <= self.resources.num_workers <= self.ensemble.modules:
            raise ValueError(
                f"resources.num_workers: {self.resources.num_workers} workers for {self.ensemble.modules} modules"
            )

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    def modules_of_rank(self, rank: int) -> list[int]:
        """The modules rank `rank` hosts (cluster.placement's contiguous blocks)."""
        return modules_for_rank(rank, self.resources.num_workers, self.ensemble.modules)

    def owner_of(self, domain: str) -> int:
        """The rank that reads `domain`: the one hosting the first module trained on it."""
        module = self.domains.index(domain)
        return next(r for r in range(self.resources.num_workers) if module in self.modules_of_rank(r))

    def domains_of_rank(self, rank: int) -> tuple[str, ...]:
        """The domains rank `rank` reads and stages: those of the modules it hosts. Of
        these it draws the mixed and validation rows of the ones it owns (`owner_of`);
        the other ranks receive them by a collective."""
        return tuple(dict.fromkeys(self.domains[i] for i in self.modules_of_rank(rank)))
