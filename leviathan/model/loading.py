"""Load any model folder: its config.json's kind picks the class that rebuilds it."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CONFIG_FILE, CheckpointError, read_meta
from .ensemble import LeviathanEnsemble
from .component import LeviathanComponent

KINDS: dict[str, type[LeviathanComponent] | type[LeviathanEnsemble]] = {
    "component": LeviathanComponent,
    "ensemble": LeviathanEnsemble,
}


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load whatever the folder holds: a component or an ensemble."""
    kind = read_meta(directory)["kind"]
    if kind not in KINDS:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: unknown kind {kind!r}")
    return KINDS[kind].load(directory, map_location)
