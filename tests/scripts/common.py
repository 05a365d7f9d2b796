"""Helpers shared by the training tests and their subprocess scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.spec import JobSpec


def builtin_manifest(folder: Path) -> Path:
    """The built-in corpus prepared into `folder` (reused when already there)."""
    from jobs.prepare import builtin_sources, prepare_sources

    manifest = folder / "manifest.json"
    if not manifest.is_file():
        prepare_sources(builtin_sources(), folder)
    return manifest


def tiny_spec(manifest: Path | str, storage: Path | str, name: str, **sections: dict[str, Any]) -> JobSpec:
    """A spec small enough for a test: 2 modules x 2 tiny members on 2 CPU workers."""
    spec: dict[str, Any] = {
        "name": name,
        "storage": str(storage),
        "data": {"manifest": str(manifest)},
        "ensemble": {
            "modules": 2, "members_per_module": 2, "merge_width": 32, "merge_heads": 2,
            "members": [{"preset": "tiny", "flavour": "gelu4"}, {"preset": "tiny", "flavour": "relu3"}],
        },
        "training": {
            "phase1_steps": 6, "phase2_steps": 4, "batch_size": 4, "seq_len": 32, "warmup_steps": 1,
            "eval_interval": 3, "eval_batches": 1, "checkpoint_interval": 4,
        },
        "resources": {"workers": 2, "cpus_per_worker": 1, "max_failures": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            spec[key] = {**spec.get(key, {}), **value}
        else:
            spec[key] = value
    return JobSpec.model_validate(spec)


def write_spec(spec: JobSpec, path: Path) -> Path:
    path.write_text(spec.to_json())
    return path
