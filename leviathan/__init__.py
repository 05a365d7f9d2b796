"""Leviathan: correlation-based language models and their ensembles, in pure PyTorch.

No Ray, no web framework: the model library is usable on its own. The data
modules (`leviathan.tokenizer`, `leviathan.data`) are imported on demand.
"""

from .checkpoint import CheckpointError, load
from .config import FLAVOURS, MERGE_MODES, MIXERS, PRESETS, ComponentConfig, EnsembleConfig
from .correlation import CorrelationCache, MultiHeadedCorrelation
from .ensemble import CorrelationMerger, EnsembleOutput, LeviathanEnsemble, MergeOutput
from .model import LeviathanComponent, LeviathanComponentBase, build_component, configure_adamw

__all__ = [
    "FLAVOURS",
    "MERGE_MODES",
    "MIXERS",
    "PRESETS",
    "CheckpointError",
    "ComponentConfig",
    "CorrelationCache",
    "CorrelationMerger",
    "EnsembleConfig",
    "EnsembleOutput",
    "LeviathanComponent",
    "LeviathanComponentBase",
    "LeviathanEnsemble",
    "MergeOutput",
    "MultiHeadedCorrelation",
    "build_component",
    "configure_adamw",
    "load",
]
