"""The JobSpec: one typed, validated description of a training job.

The API validates a spec before it touches Ray and the job entrypoint reads the
same spec, so this module imports neither torch nor Ray (only pydantic and the
standard library). Every model refuses unknown keys, so a typo in a spec is an
error naming the field, not a silently ignored setting.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Preset = Literal["tiny", "small", "base"]
Flavour = Literal["gelu4", "relu3", "leaky6"]
Mixer = Literal["correlation", "attention"]
MergeMode = Literal["fusion", "mixture"]
TokenizerKind = Literal["byte", "bpe"]

BUILTIN_MANIFEST = "builtin"
"""`data.manifest = "builtin"`: the built-in corpus, prepared on first use."""

RUN_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


def default_home() -> Path:
    """Where runs and prepared data live unless a spec says otherwise."""
    return Path(os.environ.get("LEVIATHAN_HOME", Path.home() / "leviathan")).expanduser()


def default_storage() -> str:
    return str(default_home() / "runs")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSpec(StrictModel):
    manifest: str = Field(
        BUILTIN_MANIFEST,
        description="Path to a prepared manifest.json (or its folder), or 'builtin' for the built-in corpus.",
    )
    tokenizer: TokenizerKind = Field(
        "byte", description="Tokenizer used when the built-in corpus has to be prepared."
    )
    domains: list[str] | None = Field(
        None,
        description="Domains in module order (module i trains on domains[i]); default: the manifest's first `modules` domains.",
    )


class MemberSpec(StrictModel):
    preset: Preset = "tiny"
    flavour: Flavour = "gelu4"


class EnsembleSpec(StrictModel):
    modules: int = Field(4, ge=1, le=64)
    members_per_module: int = Field(2, ge=1, le=16)
    members: list[MemberSpec] = Field(
        default_factory=lambda: [MemberSpec(flavour="gelu4"), MemberSpec(flavour="relu3")],
        description=(
            "Either members_per_module entries (every module uses the same layout) or "
            "modules * members_per_module entries in module-major order."
        ),
    )
    mixer: Mixer = "correlation"
    window: int = Field(4, ge=1, le=64, description="Lag window w of every member's correlation mixer.")
    merge: MergeMode = "fusion"
    merge_width: int = Field(128, ge=8, le=4096)
    merge_heads: int = Field(4, ge=1, le=64)
    merge_window: int | None = Field(None, ge=1, le=64, description="Lag window of the merger; default: window.")

    @model_validator(mode="after")
    def _check_shapes(self) -> "EnsembleSpec":
        total = self.modules * self.members_per_module
        if len(self.members) not in (self.members_per_module, total):
            raise ValueError(
                f"members: expected {self.members_per_module} (one per member slot) or {total} "
                f"(modules * members_per_module) entries, got {len(self.members)}"
            )
        if self.merge_width % self.merge_heads:
            raise ValueError(
                f"merge_width: {self.merge_width} is not divisible by merge_heads={self.merge_heads}"
            )
        return self

    @property
    def num_members(self) -> int:
        return self.modules * self.members_per_module

    def member_specs(self) -> list[MemberSpec]:
        """All members in module-major order (member j of module i at i * members_per_module + j)."""
        if len(self.members) == self.num_members:
            return list(self.members)
        return [m for _ in range(self.modules) for m in self.members]

    @property
    def effective_merge_window(self) -> int:
        return self.merge_window or self.window


class TrainingSpec(StrictModel):
    phase1_steps: int = Field(200, ge=0, le=10_000_000, description="Member steps (phase 1, per member).")
    phase2_steps: int = Field(100, ge=0, le=10_000_000, description="Merger steps (phase 2).")
    batch_size: int = Field(16, ge=1, le=4096)
    seq_len: int = Field(128, ge=2, le=65536)
    lr: float = Field(3e-3, gt=0, le=1.0)
    merge_lr: float = Field(3e-3, gt=0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor as a fraction of lr.")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
    eval_interval: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1, le=1000)
    checkpoint_interval: int = Field(100, ge=1)
    joint: bool = Field(False, description="Phase 2 also updates the members through the merger.")
    joint_lr_scale: float = Field(0.1, gt=0, le=1, description="Member lr during joint phase 2, as a fraction of lr.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Autocast dtype on GPU.")


class ResourcesSpec(StrictModel):
    workers: int | None = Field(None, ge=1, le=64, description="Ray Train workers; default: one per module.")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, le=256)
    gpus_per_worker: float = Field(1.0, gt=0, le=16)
    max_failures: int = Field(2, ge=0, le=100)


class JobSpec(StrictModel):
    name: str = Field("demo", pattern=RUN_NAME_PATTERN, description="Run name; the run folder is <storage>/<name>.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    storage: str = Field(default_factory=default_storage, description="Local path or pyarrow.fs URI.")
    data: DataSpec = Field(default_factory=DataSpec)
    ensemble: EnsembleSpec = Field(default_factory=EnsembleSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="after")
    def _check_workers(self) -> "JobSpec":
        if self.resources.workers is not None and self.resources.workers > self.ensemble.modules:
            raise ValueError(
                f"resources.workers: {self.resources.workers} workers for {self.ensemble.modules} modules; "
                "each worker hosts at least one module"
            )
        if self.training.batch_size < self.num_workers:
            raise ValueError(
                f"training.batch_size: {self.training.batch_size} rows cannot be split over "
                f"{self.num_workers} workers in the merge phase"
            )
        if self.data.domains is not None and len(self.data.domains) < self.ensemble.modules:
            raise ValueError(
                f"data.domains: {len(self.data.domains)} domains for {self.ensemble.modules} modules"
            )
        return self

    @property
    def num_workers(self) -> int:
        return self.resources.workers or self.ensemble.modules

    @property
    def run_dir(self) -> str:
        """`<storage>/<name>`: a local path, or a URI when storage is one."""
        from leviathan.storage import is_uri, join

        return join(self.storage if is_uri(self.storage) else str(Path(self.storage).expanduser()), self.name)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "JobSpec":
        """Load a spec from TOML (`.toml`) or JSON (anything else)."""
        return cls.model_validate(load_spec_dict(path))


class SpecError(ValueError):
    """A spec that cannot be used; the message is one line naming the field or file."""


def load_spec_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A spec file's fields; the file may be a local path or a pyarrow.fs URI."""
    from leviathan import storage

    path = str(path)
    try:
        text = storage.read_text(path)
        if text is None:
            raise SpecError(f"spec file not found: {path}")
        if path.endswith(".toml"):
            return tomllib.loads(text)
        return json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot parse: {e}") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e}") from None


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, `field.path: message`, for CLIs."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "spec"
        lines.append(f"{loc}: {e['msg']}")
    return "; ".join(lines)


def load_spec(path: str | os.PathLike) -> JobSpec:
    """Load and validate a spec file, raising SpecError with a readable message."""
    try:
        return JobSpec.from_file(path)
    except ValidationError as e:
        raise SpecError(f"{path}: {format_validation_error(e)}") from None


def resolve_manifest_path(manifest: str) -> str:
    """A manifest given as a folder or a file (local path or pyarrow.fs URI) -> the
    manifest.json location (not checked to exist)."""
    from leviathan.storage import is_uri, join

    location = manifest if is_uri(manifest) else str(Path(manifest).expanduser())
    return location if location.endswith(".json") else join(location, "manifest.json")


def check_manifest(spec: JobSpec) -> dict[str, Any] | None:
    """Check the spec's data against its manifest before any worker starts.

    Returns the manifest dict, or None for the built-in corpus when it is not
    prepared yet (the job prepares it). Raises SpecError naming the problem.
    """
    from leviathan.storage import read_text

    if spec.data.manifest == BUILTIN_MANIFEST:
        return None
    path = resolve_manifest_path(spec.data.manifest)
    try:
        text = read_text(path)
    except OSError as e:
        raise SpecError(f"data.manifest: cannot read {path} ({' '.join(str(e).split())})") from None
    if text is None:
        raise SpecError(f"data.manifest: no manifest at {path}")
    try:
        manifest = json.loads(text)
        domains = [d["name"] for d in manifest["domains"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SpecError(f"data.manifest: {path} is not a Leviathan manifest ({e})") from None
    wanted = spec.data.domains or domains[: spec.ensemble.modules]
    unknown = [d for d in wanted if d not in domains]
    if unknown:
        raise SpecError(f"data.domains: {unknown} not in manifest (has {domains})")
    if len(wanted) < spec.ensemble.modules:
        raise SpecError(
            f"ensemble.modules: {spec.ensemble.modules} modules but the manifest has only "
            f"{len(domains)} domains ({', '.join(domains)})"
        )
    return manifest
