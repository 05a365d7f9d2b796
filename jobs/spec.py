"""The JobSpec: one typed, validated description of a training job.

The API validates a spec before it touches Ray and the job entrypoint reads the
same spec, so this module imports neither torch nor Ray (only pydantic, the
standard library and the model library's torch-free `leviathan.config`, whose
choices and checks it reuses). Every model refuses unknown keys, so a typo in a spec is an
error naming the field, not a silently ignored setting.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

if TYPE_CHECKING:
    from leviathan.run.manifest import Manifest

from leviathan.config import (
    BYTE_VOCAB_SIZE, FLAVOURS, MERGE_MODES, MIXERS, PRESETS, SIZE_FIELDS, ComponentConfig, EnsembleConfig,
    TrainingConfig,
)

# The model library's choices (torch-free `leviathan.config`), as the schema's enums.
Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
Flavour = Literal[FLAVOURS]  # type: ignore[valid-type]
Mixer = Literal[MIXERS]  # type: ignore[valid-type]
MergeMode = Literal[MERGE_MODES]  # type: ignore[valid-type]
TokenizerKind = Literal["byte", "bpe"]

BUILTIN_MANIFEST = "builtin"
"""`data.manifest = "builtin"`: the built-in corpus, prepared on first use."""

RUN_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
DEFAULT_BLOCK_SIZE = 256


def refuse_placeholder(value: str, what: str) -> str:
    """A value written `<...>` is a spec file's placeholder for a site-specific setting
    (jobs/specs/giant.toml): refuse it, saying what to put there."""
    if value.startswith("<") and value.endswith(">"):
        raise ValueError(f"still the placeholder {value}: set it to {what}")
    return value


def default_home() -> Path:
    """Where runs and prepared data live unless a spec says otherwise."""
    from leviathan.run.env import leviathan_home

    return leviathan_home()


def default_storage() -> str:
    return str(default_home() / "runs")


def default_of(cls: type, name: str) -> Any:
    """A model-library config's default for `name`: the spec's default is that one, not a copy."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


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

    @field_validator("manifest")
    @classmethod
    def _check_manifest(cls, value: str) -> str:
        return refuse_placeholder(
            value, "a prepared manifest every worker can read (`leviathan prepare --out URI`), or pass --manifest"
        )


class MemberSpec(StrictModel):
    """One member: a preset, sizes beside it (overriding it), or sizes instead of one."""

    preset: Preset | None = Field("tiny", description="Named size; null: n_layer, n_head and n_embd give the size.")
    flavour: Flavour = "gelu4"
    n_layer: int | None = Field(None, description="Blocks (overrides the preset's).")
    n_head: int | None = Field(None, description="Heads per block (overrides the preset's); must divide n_embd.")
    n_embd: int | None = Field(None, description="Width (overrides the preset's).")
    dropout: float | None = Field(None, description="Dropout in [0, 1) (default 0).")

    @model_validator(mode="after")
    def _check_sizes(self) -> "MemberSpec":
        if self.preset is None:
            missing = [f for f in ("n_layer", "n_head", "n_embd") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"{missing[0]}: required when no preset is given")
        self.component_config()  # ComponentConfig's own checks, message naming the field
        return self

    def component_config(self, **fields: Any) -> ComponentConfig:
        """This member as a model-library config; `fields` sets the rest (mixer, window, vocab_size, ...)."""
        sizes = {f: getattr(self, f) for f in SIZE_FIELDS if getattr(self, f) is not None}
        base = PRESETS[self.preset] if self.preset is not None else {}
        return ComponentConfig(**{**base, **sizes, "flavour": self.flavour, **fields})


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
    mixer: Mixer = default_of(EnsembleConfig, "mixer")
    window: int = Field(
        default_of(ComponentConfig, "window"), ge=1, le=64, description="Lag window w of every member's correlation mixer."
    )
    merge: MergeMode = Field(
        default_of(EnsembleConfig, "merge"),
        description="mixture: mix the members' predictions (the default: it beats fusion on the demo); fusion: the merger's own head over the fused states.",
    )
    evidence: bool = Field(
        default_of(EnsembleConfig, "evidence"),
        description="Merge scores also see each member's decayed log-likelihood of the text so far (a fresh mixture merger is the running Bayes posterior); false: states only.",
    )
    residual: bool = Field(
        default_of(EnsembleConfig, "residual"),
        description="Mixture only: a learned logit correction over the vocabulary on top of the mixture, zero at init "
        "(phase 2 then exchanges the members' full log-probs).",
    )
    merge_width: int = Field(default_of(EnsembleConfig, "merge_width"), ge=8, le=4096)
    merge_heads: int = Field(default_of(EnsembleConfig, "merge_heads"), ge=1, le=64)
    merge_window: int | None = Field(None, ge=1, le=64, description="Lag window of the merger; default: window.")

    @model_validator(mode="after")
    def _check_shapes(self) -> "EnsembleSpec":
        self.to_config()  # EnsembleConfig's own checks (member count, merge_width / merge_heads)
        return self

    def to_config(self, vocab_size: int = BYTE_VOCAB_SIZE, block_size: int = DEFAULT_BLOCK_SIZE) -> EnsembleConfig:
        """The model library's `EnsembleConfig` of this ensemble (members module-major)."""
        members = [
            m.component_config(mixer=self.mixer, window=self.window, vocab_size=vocab_size, block_size=block_size)
            for m in self.members
        ]
        return EnsembleConfig(
            members=members,
            modules=self.modules,
            members_per_module=self.members_per_module,
            merge=self.merge,
            merge_width=self.merge_width,
            merge_heads=self.merge_heads,
            merge_window=self.effective_merge_window,
            mixer=self.mixer,
            evidence=self.evidence,
            residual=self.residual,
        )

    def member_params(self, vocab_size: int, block_size: int) -> list[int]:
        """Parameter count of each entry of `members`, counted without building a model."""
        return [
            m.component_config(mixer=self.mixer, window=self.window, vocab_size=vocab_size, block_size=block_size).num_params
            for m in self.members
        ]

    @property
    def num_members(self) -> int:
        return self.modules * self.members_per_module

    @property
    def effective_merge_window(self) -> int:
        return self.merge_window or self.window


class _TrainingModel(StrictModel):
    def to_config(self) -> TrainingConfig:
        """The model library's `TrainingConfig` of this table (what the run plan carries)."""
        return TrainingConfig(**self.model_dump())


def _training_field(f: dataclasses.Field) -> tuple[Any, Any]:
    """A `TrainingConfig` field as a pydantic field: its type, default, bounds and description."""
    meta = dict(f.metadata)
    choices = meta.pop("choices", None)
    kind = Literal[choices] if choices else {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
    return kind, Field(f.default, **meta)


TrainingSpec = create_model(
    "TrainingSpec",
    __base__=_TrainingModel,
    __doc__="The schedule and optimiser settings: `leviathan.config.TrainingConfig`'s fields, defaults and bounds.",
    **{f.name: _training_field(f) for f in dataclasses.fields(TrainingConfig)},
)


class ResourcesSpec(StrictModel):
    workers: int | None = Field(None, ge=1, le=64, description="Ray Train workers; default: one per module.")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, le=256)
    gpus_per_worker: float = Field(
        1.0, gt=0, le=16, description="Must be 1 with use_gpu: one GPU per worker (NCCL refuses shared ones)."
    )
    max_failures: int = Field(2, ge=0, le=100)

    @model_validator(mode="after")
    def _check_gpus(self) -> "ResourcesSpec":
        if self.use_gpu and self.gpus_per_worker != 1:
            raise ValueError(
                f"gpus_per_worker: must be 1 with use_gpu (one GPU per worker), got {self.gpus_per_worker:g}"
            )
        return self


class TrackingSpec(StrictModel):
    """Experiment tracking, written by rank 0 from inside the training function.

    One tracking run per run folder: a restarted worker group continues it and
    logs no step twice."""

    mlflow_uri: str | None = Field(
        None,
        pattern=r"^[A-Za-z][A-Za-z0-9+.-]*:",
        description="MLflow tracking URI (file:/path and sqlite:///path work offline; http://host:5000 for a server).",
    )
    experiment: str = Field("leviathan", min_length=1, max_length=250, description="MLflow experiment name.")
    tensorboard: bool = Field(False, description="Write TensorBoard event files under <run>/tensorboard.")

    @property
    def local_store(self) -> str | None:
        """The local path a `file:` or `sqlite:` MLflow store writes to; None for a server."""
        from urllib.parse import urlparse

        uri = self.mlflow_uri
        if uri is None:
            return None
        if uri.startswith("sqlite:"):
            return uri.removeprefix("sqlite:").removeprefix("///")  # sqlite:////abs/x.db -> /abs/x.db
        if uri.startswith("file:"):
            return urlparse(uri).path
        return None


class JobSpec(StrictModel):
    name: str = Field("demo", pattern=RUN_NAME_PATTERN, description="Run name; the run folder is <storage>/<name>.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    storage: str = Field(default_factory=default_storage, description="Local path or pyarrow.fs URI.")
    data: DataSpec = Field(default_factory=DataSpec)
    ensemble: EnsembleSpec = Field(default_factory=EnsembleSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        return refuse_placeholder(value, "a URI every node can write (s3://, gs://, ...), or pass --storage")

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
    def block_size(self) -> int:
        """Members' context: at least `training.seq_len` tokens (max(256, seq_len)), so a
        model trained on long windows can still generate past them."""
        return max(DEFAULT_BLOCK_SIZE, self.training.seq_len)

    @property
    def run_dir(self) -> str:
        """`<storage>/<name>`: a local path, or a URI when storage is one."""
        from leviathan.run.storage import is_uri, join

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
    from leviathan.run import storage

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


def with_values(spec: JobSpec | dict[str, Any], values: dict[str, Any]) -> JobSpec:
    """A spec (or a spec dict) with dotted fields set, e.g. {"training.lr": 1e-3, "name": "x"},
    validated like a spec file. Raises SpecError naming the field.

    A spec dict (a file's fields, not yet validated) may leave sections and fields out;
    setting one adds it, and validation then refuses names the schema does not have."""
    data = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else copy.deepcopy(spec)
    partial = not isinstance(spec, JobSpec)
    for name, value in values.items():
        *path, leaf = name.split(".")
        node = data
        for i, key in enumerate(path):
            if partial:
                node.setdefault(key, {})
            if not isinstance(node.get(key), dict):
                raise SpecError(f"{name}: the spec has no section {'.'.join(path[: i + 1])!r}")
            node = node[key]
        if leaf not in node and not partial:
            raise SpecError(f"{name}: the spec has no field {name!r}")
        node[leaf] = value
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e)) from None


def load_spec(path: str | os.PathLike) -> JobSpec:
    """Load and validate a spec file, raising SpecError with a readable message."""
    try:
        return JobSpec.from_file(path)
    except ValidationError as e:
        raise SpecError(f"{path}: {format_validation_error(e)}") from None


def resolve_manifest_path(manifest: str) -> str:
    """A manifest given as a folder or a file (local path or pyarrow.fs URI) -> the
    manifest.json location (not checked to exist)."""
    from leviathan.run.manifest import manifest_file
    from leviathan.run.storage import is_uri

    return manifest_file(manifest if is_uri(manifest) else str(Path(manifest).expanduser()))


def check_manifest(spec: JobSpec) -> "Manifest | None":
    """Check the spec's data against its manifest before any worker starts.

    Returns the `Manifest`, or None for the built-in corpus when it is not
    prepared yet (the job prepares it). Raises SpecError naming the problem.
    """
    from leviathan.run.manifest import ManifestError, read_manifest

    if spec.data.manifest == BUILTIN_MANIFEST:
        return None
    try:
        manifest = read_manifest(resolve_manifest_path(spec.data.manifest))
    except ManifestError as e:
        raise SpecError(f"data.manifest: {e}") from None
    domains = manifest.domain_names
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
