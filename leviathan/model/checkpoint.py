"""Model folders on disk: `config.json` + `model.safetensors`.

    <dir>/config.json        {"format_version": 1, "kind": "component" | "ensemble",
                              "config": {...}, "weights": {"file": "model.safetensors",
                              "sha256": "...", "bytes": N}}
    <dir>/model.safetensors  the module's state dict (tied tensors stored once)

This module is folder I/O only: which class a folder's kind rebuilds is
`leviathan.model.loading`'s business. The checksum in config.json lets a load tell a damaged weights file from a
valid one before any tensor is read, so every failure names the file at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..data.shards import sha256_file

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message names the file."""


def save_folder(module: nn.Module, directory: str | Path, kind: str, config: dict[str, Any]) -> Path:
    """Write the module's weights and config; config.json goes last, so a folder
    interrupted mid-save has no config.json and is refused on load."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    from safetensors.torch import save_model  # lazy: torch-only machines build and run models without it

    save_model(module, str(tmp), metadata={"format": "pt", "kind": kind})
    os.replace(tmp, weights)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights), "bytes": weights.stat().st_size},
    }
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / CONFIG_FILE)
    return folder


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Parse and check `<directory>/config.json`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a Leviathan model folder)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or not {"format_version", "kind", "config", "weights"} <= set(meta):
        raise CheckpointError(f"{path}: not a Leviathan model config (needs format_version, kind, config, weights)")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta['format_version']!r}, expected {FORMAT_VERSION}")
    return meta


def load_folder(
    directory: str | Path,
    kind: str,
    build: Callable[[dict[str, Any]], nn.Module],
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a module from its folder: `build(config)` makes it, the weights fill it."""
    folder = Path(directory)
    meta = read_meta(folder)
    config_path = folder / CONFIG_FILE
    if meta["kind"] != kind:
        raise CheckpointError(f"{config_path}: holds a {meta['kind']!r}, not a {kind!r}")
    try:
        module = build(meta["config"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{config_path}: invalid config: {e}") from None
    weights = folder / meta["weights"].get("file", WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    expected = meta["weights"].get("sha256")
    if expected is not None and sha256_file(weights) != expected:
        raise CheckpointError(f"{weights}: corrupt (sha256 differs from {config_path.name})")
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(module, str(weights), strict=False, device="cpu")
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot load: {e}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: does not match {config_path.name}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return module.to(map_location)


def assign_state(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Fill a module built on the meta device (`with torch.device("meta"): build()`)
    with the tensors of `state`, without allocating or randomly initialising weights first.

    `load_state_dict(assign=True)` gives every registration of a shared parameter
    (the LM head tied to the token embedding) its own Parameter; the registrations
    that shared one before are tied again here. Every parameter and buffer must
    come from `state` (strict), so nothing is left on the meta device.
    """
    shared: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    module.load_state_dict(state, strict=True, assign=True)
    for first, *others in shared.values():
        param = module.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, param)
    return module

