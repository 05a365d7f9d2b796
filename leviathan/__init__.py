"""Leviathan: correlation-based language models and their ensembles, in pure PyTorch.

No Ray, no web framework: the model library is usable on its own. The package
is lazy: a name below is imported on first use, so the torch-free modules
(`leviathan.config`, `leviathan.run.records`, `leviathan.run.tables`) are importable by every layer, the
API included, without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the submodule that defines it.
_EXPORTS = {
    "CheckpointError": "model.checkpoint",
    "load": "model.loading",
    "FLAVOURS": "config",
    "MERGE_MODES": "config",
    "MIXERS": "config",
    "PRESETS": "config",
    "ComponentConfig": "config",
    "EnsembleConfig": "config",
    "CorrelationCache": "model.correlation",
    "MultiHeadedCorrelation": "model.correlation",
    "CorrelationMerger": "model.ensemble",
    "EnsembleOutput": "model.ensemble",
    "LeviathanEnsemble": "model.ensemble",
    "MergeOutput": "model.ensemble",
    "LeviathanComponent": "model.component",
    "LeviathanComponentBase": "model.component",
    "build_component": "model.component",
    "configure_adamw": "model.component",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'leviathan' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
