"""The run folder: every path of one training run, spelled once.

    <storage>/<name>/
      spec.json            the validated JobSpec
      owner.json           who submitted it through the API ({"user": ...}); absent otherwise
      metrics.jsonl        one metrics record per line (metrics/part-*.jsonl on object stores)
      checkpoints/         Ray Train's run folder (checkpoint_*/, its snapshot)
      final/               the ensemble, tokenizer and spec: loadable without Ray
      train_result.json    the workers' final evaluation (the report dict)
      report.md, .json     the evaluation report

No other module spells one of these names: api/, jobs/ and cluster/ ask a
`RunFolder`. A location is a local path or a pyarrow.fs URI (`leviathan.run.storage`).
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from leviathan.run import storage

SPEC_FILE = "spec.json"
OWNER_FILE = "owner.json"
METRICS_FILE = "metrics.jsonl"
METRICS_PARTS_DIR = "metrics"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
RESULT_FILE = "train_result.json"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
TENSORBOARD_DIR = "tensorboard"
# Ray Train writes this into its run folder once the first checkpoint is registered.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class RunFolder:
    """The folder of run `name` under `storage_root` (a local path or a URI)."""

    root: str

    @classmethod
    def of(cls, storage_root: str, name: str) -> "RunFolder":
        return cls(storage.join(storage.normalize(storage_root), name))

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    @property
    def storage_root(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[0]

    def path(self, *names: str) -> str:
        return storage.join(self.root, *names)

    @property
    def spec(self) -> str:
        return self.path(SPEC_FILE)

    @property
    def owner(self) -> str:
        return self.path(OWNER_FILE)

    @property
    def metrics(self) -> str:
        return self.path(METRICS_FILE)

    @property
    def checkpoints(self) -> str:
        """Ray Train's run folder: `RunConfig(storage_path=<storage root>, name="<name>/checkpoints")`."""
        return self.path(CHECKPOINTS_DIR)

    @property
    def ray_snapshot(self) -> str:
        return self.path(CHECKPOINTS_DIR, RAY_SNAPSHOT_FILE)

    @property
    def final(self) -> str:
        return self.path(FINAL_DIR)

    def final_file(self, *names: str) -> str:
        return self.path(FINAL_DIR, *names)

    @property
    def result(self) -> str:
        return self.path(RESULT_FILE)

    @property
    def report_md(self) -> str:
        return self.path(REPORT_MD)

    @property
    def report_json(self) -> str:
        return self.path(REPORT_JSON)

    @property
    def tensorboard(self) -> str:
        return self.path(TENSORBOARD_DIR)

    def exists(self) -> bool:
        return storage.exists(self.root)

    def is_finished(self) -> bool:
        """A run is finished once its driver wrote the final evaluation."""
        return storage.exists(self.result)
