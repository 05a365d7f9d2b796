"""Checkpoint layout of a training run, and turning one into a `final/` model.

Each `ray.train.report(..., checkpoint=...)` writes, into one checkpoint
directory (Ray merges the ranks' files):

    module_{i}.pt     by the rank hosting module i: every member's weights,
                      projection and optimiser states, the module's train
                      sampler state (its position in the domain's shard)
    rng_rank_{r}.pt   by rank r: its torch / own-GPU / numpy / python RNG states
    merger.pt         by rank 0: the merger (identical on every rank), its
                      optimiser, and the phase-2 mixed-batch sampler state
    ensemble.json     by rank 0: the EnsembleConfig (to rebuild without the spec)
    state.json        by rank 0: {"phase": "members" | "merge", "step": n, ...}
    final_table.json  by rank 0, in the job's last checkpoint only: the closing
                      evaluation table (leviathan.run.report.final_table, the report under "report")
    files_rank_{r}.json  by rank r, written last: size and sha256 of every file
                      the rank wrote (its seal)

A checkpoint is intact when every rank's seal is there and every sealed file
has its size and hash: a node lost mid-upload, or a disk that filled, leaves a
checkpoint that is not. Restore (`newest_intact`) takes the newest intact
checkpoint, names what was wrong with any newer one, and says which steps
will be replayed; the run keeps two checkpoints (`CheckpointConfig
(num_to_keep=2)`), so the one before is there. Uploads (`persist`) retry an
unreachable object store for a bounded time (`leviathan.run.storage.retrying`).

Module files do not depend on the placement, so a run restarted on a
different set of workers still finds every module's state. `assemble` reads a
checkpoint without Ray into a `LeviathanEnsemble` (for `final/`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from cluster.members import Module
from leviathan.config import EnsembleConfig
from leviathan.model.checkpoint import assign_state
from leviathan.model.ensemble import LeviathanEnsemble
from leviathan.run.storage import retrying

FORMAT_VERSION = 1
STATE_FILE = "state.json"
ENSEMBLE_FILE = "ensemble.json"
MERGER_FILE = "merger.pt"


class CheckpointLayoutError(ValueError):
    """A training checkpoint that lacks a file or does not match the job."""


SEAL = re.compile(r"files_rank_(\d+)\.json$")


def seal_file(rank: int) -> str:
    return f"files_rank_{rank}.json"


def module_file(index: int) -> str:
    return f"module_{index}.pt"


def rng_file(rank: int) -> str:
    return f"rng_rank_{rank}.pt"


def _load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointLayoutError(f"{path}: missing from the checkpoint")
    # Our own files: they hold numpy RNG states and sampler states besides tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states; on a CUDA `device`, that one device's generator only.

    Ray shares `CUDA_VISIBLE_DEVICES` among a node's workers, so "every visible GPU"
    differs between nodes: a state list saved on an 8-GPU node cannot be restored on
    a 4-GPU one. Each rank owns exactly its own device's generator, so that is
    what it saves and restores (into whichever device it runs on after a restart).
    """
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state`'s output; the CUDA state goes to this rank's own `device`."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_module(directory: Path, module: Module) -> None:
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "module": module.index,
            "domain": module.domain,
            "members": [m.state_dict() for m in module.members],
            "sampler": module.sampler.state_dict(),
        },
        directory / module_file(module.index),
    )


def load_module(directory: Path, module: Module) -> None:
    state = _load(directory / module_file(module.index))
    if state["domain"] != module.domain:
        raise CheckpointLayoutError(
            f"{directory / module_file(module.index)}: module {module.index} trained on "
            f"{state['domain']!r}, the job gives it {module.domain!r}"
        )
    for member, member_state in zip(module.members, state["members"], strict=True):
        member.load_state_dict(member_state)
    module.sampler.load_state_dict(state["sampler"])


def save_rank(directory: Path, rank: int, device: torch.device | None = None) -> None:
    torch.save(rng_state(device), directory / rng_file(rank))


def load_rank(directory: Path, rank: int, device: torch.device | None = None) -> None:
    """Restore this rank's RNG (absent when the worker count changed: then keep the fresh seed)."""
    path = directory / rng_file(rank)
    if path.is_file():
        set_rng_state(_load(path), device)


def save_coordinator(
    directory: Path,
    *,
    merger: torch.nn.Module,
    merger_optimizer: torch.optim.Optimizer | None,
    mixed_sampler: Any,
    config: EnsembleConfig,
    phase: str,
    step: int,
    extra: dict[str, Any] | None = None,
) -> None:
    torch.save(
        {
            "merger": merger.state_dict(),
            "optimizer": None if merger_optimizer is None else merger_optimizer.state_dict(),
            "mixed_sampler": mixed_sampler.state_dict(),
        },
        directory / MERGER_FILE,
    )
    (directory / ENSEMBLE_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    state = {"format_version": FORMAT_VERSION, "phase": phase, "step": step, **(extra or {})}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointLayoutError(f"{path}: missing from the checkpoint")
    state = json.loads(path.read_text())
    if state.get("format_version") != FORMAT_VERSION or state.get("phase") not in ("members", "merge"):
        raise CheckpointLayoutError(f"{path}: not a Leviathan training state")
    return state


def load_coordinator(
    directory: Path, merger: torch.nn.Module, merger_optimizer: torch.optim.Optimizer | None, mixed_sampler: Any
) -> None:
    state = _load(directory / MERGER_FILE)
    merger.load_state_dict(state["merger"])
    if merger_optimizer is not None and state["optimizer"] is not None:
        merger_optimizer.load_state_dict(state["optimizer"])
    mixed_sampler.load_state_dict(state["mixed_sampler"])


def assemble(directory: str | Path) -> LeviathanEnsemble:
    """Rebuild the whole ensemble from a training checkpoint (no Ray needed).

    The ensemble is built on the meta device and takes the checkpoint's tensors
    as they are: no parameter is allocated or randomly initialised only to be
    overwritten (1.2B of them for the giant spec)."""
    directory = Path(directory)
    problems = verify(directory)
    if problems:
        raise CheckpointLayoutError(f"{directory}: not intact: {'; '.join(problems[:3])}")
    path = directory / ENSEMBLE_FILE
    config = EnsembleConfig.from_dict(json.loads(path.read_text()))
    with torch.device("meta"):
        ensemble = LeviathanEnsemble(config)
    names = config.member_names
    state: dict[str, torch.Tensor] = {}
    for module in range(config.modules):
        for member_state in _load(directory / module_file(module))["members"]:
            i = member_state["index"]
            if names[i] != member_state["name"]:
                raise CheckpointLayoutError(f"{directory / module_file(module)}: member {i} is not {names[i]}")
            state.update({f"members.{i}.{k}": v for k, v in member_state["model"].items()})
            state.update({f"projections.{i}.{k}": v for k, v in member_state["projection"].items()})
    state.update({f"merger.{k}": v for k, v in _load(directory / MERGER_FILE)["merger"].items()})
    try:
        return assign_state(ensemble, state)
    except RuntimeError as e:  # missing or unexpected keys, wrong shapes
        raise CheckpointLayoutError(f"{directory}: the checkpoint does not fit {ENSEMBLE_FILE}: {e}") from None


# ----------------------------------------------------------------------------- integrity


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(directory: Path, rank: int) -> None:
    """Record size and sha256 of every file in `directory` (this rank's part), written last."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and not SEAL.match(p.name)
    }
    (directory / seal_file(rank)).write_text(json.dumps({"rank": rank, "files": files}, indent=2) + "\n")


def verify(directory: Path) -> list[str]:
    """What is wrong with a merged checkpoint folder, one line each (empty: intact).

    Every rank named by `state.json`'s world_size must have sealed its files,
    and every sealed file must be there with its size and hash.
    """
    directory = Path(directory)
    try:
        state = read_state(directory)
    except (CheckpointLayoutError, ValueError, OSError) as e:
        return [f"{STATE_FILE}: {e}"]
    problems = []
    world_size = int(state.get("world_size", 1))
    for rank in range(world_size):
        path = directory / seal_file(rank)
        if not path.is_file():
            problems.append(f"{seal_file(rank)}: missing (rank {rank} never finished its part)")
            continue
        try:
            files = json.loads(path.read_text())["files"]
        except (ValueError, KeyError) as e:
            problems.append(f"{seal_file(rank)}: unreadable ({e})")
            continue
        for name, want in files.items():
            f = directory / name
            if not f.is_file():
                problems.append(f"{name}: missing")
            elif f.stat().st_size != want["size"]:
                problems.append(f"{name}: {f.stat().st_size} bytes, sealed with {want['size']}")
            elif _sha256(f) != want["sha256"]:
                problems.append(f"{name}: sha256 differs from its seal")
    return problems


def _position(state: dict[str, Any]) -> tuple[int, int]:
    return (0 if state["phase"] == "members" else 1, int(state["step"]))


def describe(state: dict[str, Any]) -> str:
    return f"phase {state['phase']}, step {state['step']}"


def checkpoint_history(latest: "Any") -> list["Any"]:
    """Every checkpoint beside Ray's latest one (same run folder, same filesystem), newest first.

    Ray hands a restarted worker only the latest registered checkpoint; the ones
    it keeps besides it (num_to_keep) are its siblings `checkpoint_*`.
    """
    from ray.train import Checkpoint

    fs, path = latest.filesystem, latest.path.rstrip("/")
    parent = path.rsplit("/", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    siblings = sorted(
        (i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
        reverse=True,
    )
    ordered = [path] + [p for p in siblings if p.rstrip("/") != path]
    return [Checkpoint(path=p, filesystem=fs) for p in ordered]


def newest_intact(latest: "Any") -> tuple["Any | None", list[str]]:
    """The newest intact checkpoint at or before Ray's `latest`, and one line per one skipped.

    Candidates are ordered by their (phase, step), so a sibling written after
    `latest` by a run that then failed is never preferred to it.
    """
    skipped: list[str] = []
    candidates = []
    for ckpt in checkpoint_history(latest):
        with ckpt.as_directory() as d:
            problems = verify(Path(d))
            state = None if problems else read_state(Path(d))
        if problems:
            skipped.append(f"checkpoint {ckpt.path} is not intact, not used: {'; '.join(problems[:3])}")
        else:
            candidates.append((_position(state), ckpt, state))
    if not candidates:
        return None, skipped
    with latest.as_directory() as d:
        try:  # a broken latest usually still says where it was; one that cannot is no bound
            limit = _position(read_state(Path(d)))
        except (CheckpointLayoutError, ValueError, KeyError, OSError):
            limit = max(c[0] for c in candidates)
    usable = [c for c in candidates if c[0] <= limit]
    if not usable:
        return None, skipped
    _, ckpt, _ = max(usable, key=lambda c: c[0])
    return ckpt, skipped


def persist(checkpoint: "Any", dir_name: str) -> "Any":
    """Ray's checkpoint upload (`ray.train.report(checkpoint_upload_fn=...)`), retried.

    The default upload fails the worker on the first error from the object
    store; this one retries it for the storage retry bound. The previous
    checkpoint is untouched either way, and a half-uploaded one has no seals of
    every rank, so restore never takes it.
    """
    import ray.train

    storage = ray.train.get_context().get_storage()
    return retrying(lambda: storage.persist_current_checkpoint(checkpoint, dir_name), f"uploading checkpoint {dir_name}")
