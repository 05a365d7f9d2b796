"""The pieces of an ensemble a rank hosts: its modules' members, their
projections and optimisers, and the module's data sampler.

Every piece is initialised from the job seed and its own index only, never from
the rank, so any placement of modules on workers (and a restart on a different
worker) builds the same weights. The merger is built the same way on every
rank, so its replicas start identical.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from leviathan.config import EnsembleConfig
from leviathan.model.ensemble import CorrelationMerger
from leviathan.model.component import LeviathanComponentBase, build_component, configure_adamw

def derived_seed(seed: int, *parts: Any) -> int:
    """A stable 31-bit seed for (job seed, part names...): independent of rank and placement."""
    return zlib.crc32(repr((seed, *parts)).encode()) & 0x7FFFFFFF


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under `torch.manual_seed(seed)` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_member(config: EnsembleConfig, index: int, seed: int) -> tuple[LeviathanComponentBase, nn.Linear]:
    """Member `index` and its projection n_embd -> merge_width (as `LeviathanEnsemble` shapes them)."""
    cfg = config.members[index]
    with seeded(derived_seed(seed, "member", index)):
        model = build_component(cfg)
        projection = nn.Linear(cfg.n_embd, config.merge_width, bias=False)
    return model, projection


def build_merger(config: EnsembleConfig, seed: int) -> CorrelationMerger:
    with seeded(derived_seed(seed, "merger")):
        return CorrelationMerger(config)


def adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The model library's AdamW (decay on 2-D weights only); each group keeps its
    peak lr as `base_lr`, which the schedule scales every step."""
    opt = configure_adamw(module, lr, weight_decay)
    for group in opt.param_groups:
        group["base_lr"] = lr
    return opt


EVIDENCE_PARAMETERS = ("beta", "gamma_raw")


def merger_adamw(merger: CorrelationMerger, lr: float, weight_decay: float, evidence_lr_scale: float) -> torch.optim.AdamW:
    """`adamw` for the merger, its evidence weights (beta, gamma) in their own group at
    lr * evidence_lr_scale without decay: at the merger's lr they barely leave (1, 1)
    in a short phase 2 (benchmarks/MERGE_RESEARCH.md)."""
    opt = adamw(merger, lr, weight_decay)
    if not merger.evidence:
        return opt
    evidence = [getattr(merger, n) for n in EVIDENCE_PARAMETERS]
    for group in opt.param_groups:
        group["params"] = [p for p in group["params"] if all(p is not q for q in evidence)]
    scaled = lr * evidence_lr_scale
    opt.add_param_group({"params": evidence, "weight_decay": 0.0, "lr": scaled, "base_lr": scaled})
    return opt


@dataclass
class Member:
    """One member as a rank trains it."""

    index: int  # module-major index
    name: str  # "m{module}.{slot}"
    model: LeviathanComponentBase
    projection: nn.Linear
    optimizer: torch.optim.AdamW | None = None  # phase 1
    projection_optimizer: torch.optim.AdamW | None = None  # phase 2
    joint_optimizer: torch.optim.AdamW | None = None  # phase 2 with joint = true

    def state_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "model": self.model.state_dict(),
            "projection": self.projection.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "projection_optimizer": None if self.projection_optimizer is None else self.projection_optimizer.state_dict(),
            "joint_optimizer": None if self.joint_optimizer is None else self.joint_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ValueError(f"checkpoint holds member {state['name']!r}, expected {self.name!r}")
        self.model.load_state_dict(state["model"])
        self.projection.load_state_dict(state["projection"])
        for key in ("optimizer", "projection_optimizer", "joint_optimizer"):
            opt = getattr(self, key)
            if opt is not None and state.get(key) is not None:
                opt.load_state_dict(state[key])


@dataclass
class Module:
    """A module: members that all train on one domain, fed by one sampler."""

    index: int
    domain: str
    members: list[Member]
    sampler: Any  # leviathan.data.shards.BatchSampler over the domain's train shard
