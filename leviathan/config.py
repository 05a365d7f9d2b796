"""Typed, validated configurations of components and ensembles.

Configs are plain dataclasses checked in `__post_init__`, so a bad value fails
where it is written, with a `ValueError` naming the field and what is allowed.
They round-trip through `to_dict()` / `from_dict()` (JSON- and TOML-safe).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

MLP_WIDTH: dict[str, int] = {"gelu4": 4, "relu3": 3, "leaky6": 6}
"""flavour -> the MLP's hidden width as a multiple of n_embd."""

FLAVOURS = tuple(MLP_WIDTH)
"""MLP flavours: activation + hidden width multiplier (GELU x4, ReLU x3, LeakyReLU x6)."""

BYTE_VOCAB_SIZE = 260
"""The byte tokenizer's vocabulary: 256 bytes and 4 special tokens."""

SIZE_FIELDS = ("n_layer", "n_head", "n_embd", "dropout")
"""A component's size settings: what a preset sets (dropout 0) and a spec may override."""

MIXERS = ("correlation", "attention")
"""Token mixers: lagged multi-headed correlation, or its baseline twin, causal attention."""

MERGE_MODES = ("fusion", "mixture")
"""How the merger combines members: fuse their states, or mix their predictions."""

DTYPES = ("float32", "bfloat16")
"""Autocast dtypes of a training run on GPU."""

CONFIG_FORMAT_VERSION = 2
"""`EnsembleConfig.to_dict` writes it. A dict without one predates it: its merger
defaults were fusion without evidence, and `from_dict` keeps them for it."""

_FORMAT_KEY = "format_version"
_UNVERSIONED_DEFAULTS: dict[str, Any] = {"merge": "fusion", "evidence": False}

PRESETS: dict[str, dict] = {
    # < 1M parameters with the byte vocabulary: CPU tests and the demo.
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 64},
    "small": {"n_layer": 6, "n_head": 6, "n_embd": 384},
    # The seed's baseline LeviathanComponent: 20 heads, 20 blocks, embed 800.
    "base": {"n_layer": 20, "n_head": 20, "n_embd": 800},
}


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def _check_keys(cls: type, d: dict) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(known)}")


@dataclass
class ComponentConfig:
    """One language model (a member of an ensemble, or a model on its own).

    Parameters (weights tied between token embedding and LM head, no biases):
    V*C + P*C (embeddings) + L * (4*C^2 (mixer) + 2*r*C^2 (MLP, hidden r*C)
    + 2*C (norms) + H*w (lag weights, correlation only)) + C (final norm).
    """

    vocab_size: int = BYTE_VOCAB_SIZE
    block_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    flavour: str = "gelu4"
    mixer: str = "correlation"
    window: int = 4
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, 1)
        _check_int("block_size", self.block_size, 1)
        _check_int("n_layer", self.n_layer, 1)
        _check_int("n_head", self.n_head, 1)
        _check_int("n_embd", self.n_embd, 1)
        _check_int("window", self.window, 1)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd: {self.n_embd} is not divisible by n_head={self.n_head}"
            )
        _check_choice("flavour", self.flavour, FLAVOURS)
        _check_choice("mixer", self.mixer, MIXERS)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias: must be true or false, got {self.bias!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_params(self) -> int:
        """The model's parameter count, without building it (torch-free; the API limits it).

        Per block: ln_1, ln_2 (C each), c_attn (3C^2), c_proj (C^2), MLP (2rC^2),
        lag weights (H*w, correlation only); plus wte (V*C, tied with the LM head),
        wpe (P*C) and ln_f (C). With bias: LayerNorms and Linears add their biases.
        """
        C, r = self.n_embd, MLP_WIDTH[self.flavour]
        block = 2 * C + 4 * C * C + 2 * r * C * C
        if self.mixer == "correlation":
            block += self.n_head * self.window
        if self.bias:
            block += 2 * C + 3 * C + C + r * C + C
        final = 2 * C if self.bias else C
        return (self.vocab_size + self.block_size) * C + self.n_layer * block + final

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ComponentConfig":
        """A named preset ("tiny", "small", "base") with any field overridden."""
        _check_choice("preset", name, tuple(PRESETS))
        _check_keys(cls, overrides)
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ComponentConfig":
        _check_keys(cls, d)
        return cls(**d)


@dataclass
class EnsembleConfig:
    """modules x members_per_module members plus the merger that combines them.

    `members` lists every member in module-major order (member i belongs to
    module i // members_per_module); a list of members_per_module entries is
    accepted too and repeated for every module. `mixer` is the merger's own
    scoring: "correlation" sums lagged query-key products over `merge_window`
    time steps, "attention" scores with the zero-lag product only (the merger
    of the attention twin). `evidence` adds each member's decayed log-likelihood
    of the text so far to the merge scores (`leviathan.model.ensemble`), so a fresh
    mixture merger is the running Bayes posterior over members; false keeps
    the state-only merger. `residual` (mixture only) adds a learned correction
    to the mixture's log-probs from the merged states, through a head that
    starts at zero, so the merged distribution starts as the mixture and may
    leave the mixtures of the members' distributions (it needs the members'
    full log-probs in training; benchmarks/MERGE_RESEARCH.md has its figures).
    """

    members: list[ComponentConfig]
    modules: int
    members_per_module: int
    merge: str = "mixture"
    merge_width: int = 128
    merge_heads: int = 4
    merge_window: int = 4
    mixer: str = "correlation"
    evidence: bool = True
    residual: bool = False

    def __post_init__(self) -> None:
        _check_int("modules", self.modules, 1)
        _check_int("members_per_module", self.members_per_module, 1)
        _check_int("merge_width", self.merge_width, 1)
        _check_int("merge_heads", self.merge_heads, 1)
        _check_int("merge_window", self.merge_window, 1)
        _check_choice("merge", self.merge, MERGE_MODES)
        _check_choice("mixer", self.mixer, MIXERS)
        if not isinstance(self.evidence, bool):
            raise ValueError(f"evidence: must be true or false, got {self.evidence!r}")
        if not isinstance(self.residual, bool):
            raise ValueError(f"residual: must be true or false, got {self.residual!r}")
        if self.residual and self.merge != "mixture":
            raise ValueError(f"residual: corrects a mixture; needs merge = 'mixture', got {self.merge!r}")
        if self.merge_width % self.merge_heads:
            raise ValueError(
                f"merge_width: {self.merge_width} is not divisible by merge_heads={self.merge_heads}"
            )
        if not isinstance(self.members, (list, tuple)) or not self.members:
            raise ValueError("members: must be a non-empty list of member configs")
        members = [
            m if isinstance(m, ComponentConfig) else ComponentConfig.from_dict(m)
            for m in self.members
        ]
        total = self.modules * self.members_per_module
        if len(members) == self.members_per_module:
            members = [m for _ in range(self.modules) for m in members]
        if len(members) != total:
            raise ValueError(
                f"members: expected {self.members_per_module} (one per slot) or {total} "
                f"(modules * members_per_module) entries, got {len(members)}"
            )
        vocabs = sorted({m.vocab_size for m in members})
        if len(vocabs) != 1:
            raise ValueError(f"members: all members must share one vocab_size, got {vocabs}")
        self.members = members

    @property
    def vocab_size(self) -> int:
        return self.members[0].vocab_size

    @property
    def block_size(self) -> int:
        """The longest context every member accepts."""
        return min(m.block_size for m in self.members)

    @property
    def num_members(self) -> int:
        return self.modules * self.members_per_module

    @property
    def member_names(self) -> list[str]:
        """["m0.0", "m0.1", "m1.0", ...]: `m{module}.{slot}`, module-major."""
        k = self.members_per_module
        return [f"m{i // k}.{i % k}" for i in range(self.num_members)]

    def module_of(self, i: int) -> int:
        if not 0 <= i < self.num_members:
            raise ValueError(f"member index {i} out of range 0..{self.num_members - 1}")
        return i // self.members_per_module

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["members"] = [m.to_dict() for m in self.members]
        return {_FORMAT_KEY: CONFIG_FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EnsembleConfig":
        """A saved config. One without `format_version` was written when the defaults were
        a fusion merger without evidence, so a field it leaves out takes those old values."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        version = d.pop(_FORMAT_KEY, None)
        if version not in (None, CONFIG_FORMAT_VERSION):
            raise ValueError(f"{_FORMAT_KEY}: {version!r}, expected {CONFIG_FORMAT_VERSION} (or none for an old config)")
        _check_keys(cls, d)
        defaults = _UNVERSIONED_DEFAULTS if version is None else {}
        return cls(**{**defaults, **d})


def bounded(default: Any, description: str, **bounds: Any) -> Any:
    """A dataclass field with its bounds (ge, gt, le, lt, choices) and description as
    metadata: the dataclass checks them, and the JobSpec derives its schema from them."""
    return field(default=default, metadata={"description": description, **bounds})


def _check_bounds(name: str, value: Any, kind: type, meta: dict[str, Any]) -> None:
    if "choices" in meta:
        _check_choice(name, value, meta["choices"])
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: must be true or false, got {value!r}")
        return
    numeric = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise ValueError(f"{name}: must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    for op, ok, text in (
        ("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
        ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<"),
    ):
        if op in meta and not ok(value, meta[op]):
            raise ValueError(f"{name}: must be {text} {meta[op]}, got {value!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """A job's schedule and optimiser settings: the one place their defaults and bounds live.

    The JobSpec's `training` table is derived from these fields (`jobs.spec`), and the
    run plan carries this dataclass to the workers, so a notebook, a spec and a worker
    see the same defaults and refuse the same values."""

    phase1_steps: int = bounded(200, "Member steps (phase 1, per member).", ge=0, le=10_000_000)
    phase2_steps: int = bounded(100, "Merger steps (phase 2).", ge=0, le=10_000_000)
    batch_size: int = bounded(16, "Rows per batch (phase 2 splits them over the workers).", ge=1, le=4096)
    seq_len: int = bounded(128, "Tokens per row.", ge=2, le=65536)
    lr: float = bounded(3e-3, "Member learning rate (phase 1).", gt=0, le=1.0)
    merge_lr: float = bounded(3e-3, "Merger learning rate (phase 2).", gt=0, le=1.0)
    min_lr_ratio: float = bounded(0.1, "Cosine decay floor as a fraction of lr.", ge=0, le=1)
    warmup_steps: int = bounded(20, "Linear warmup steps of each phase.", ge=0)
    weight_decay: float = bounded(0.1, "AdamW weight decay.", ge=0, le=1)
    grad_clip: float = bounded(1.0, "Max global grad norm; 0 disables clipping.", ge=0)
    eval_interval: int = bounded(50, "Steps between evaluations.", ge=1)
    eval_batches: int = bounded(4, "Validation batches per domain.", ge=1, le=1000)
    checkpoint_interval: int = bounded(100, "Steps between checkpoints.", ge=1)
    joint: bool = bounded(False, "Phase 2 also updates the members through the merger.")
    joint_lr_scale: float = bounded(0.1, "Member lr during joint phase 2, as a fraction of lr.", gt=0, le=1)
    dtype: str = bounded("float32", "Autocast dtype on GPU.", choices=DTYPES)
    evidence_lr_scale: float = bounded(
        10.0, "The merger's evidence weights (beta, gamma) learn at merge_lr times this, undecayed.", gt=0, le=1000
    )
    switch_fraction: float = bounded(
        0.25,
        "Share of each phase-2 batch's rows that are domain-switch windows (one domain, then another) from the train split.",
        ge=0, lt=1,
    )

    def __post_init__(self) -> None:
        kinds = {"int": int, "float": float, "bool": bool, "str": str}
        for f in fields(self):
            _check_bounds(f.name, getattr(self, f.name), kinds[str(f.type)], dict(f.metadata))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingConfig":
        _check_keys(cls, d)
        return cls(**d)
