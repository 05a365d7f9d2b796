"""Which run folder a Ray job writes, and which folders the API may touch at all.

Two operator-set roots bound what a caller can make the API touch: every
run-folder read and write stays under the storage root, and every manifest an
API-submitted spec names lies under the data root (or is the built-in corpus).
Both are checked on the path's text, before any file is opened, so a 422 never
tells a caller whether something exists outside them.

A Leviathan job's run folder comes from the first of these channels it has:
1. `leviathan_run_dir` metadata: jobs this API submitted;
2. `leviathan_run_name` metadata, set with
   `ray job submit --metadata-json '{"leviathan_run_name": "NAME"}' ...`:
   `<storage root>/NAME`;
3. the entrypoint itself, `python -m jobs.train ... --name NAME [--storage DIR]`
   (or `leviathan train ...`): `<DIR or storage root>/NAME`.
A folder outside the storage root is never read: such a job shows its Ray fields only.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass

from api.ray_jobs import RayJob
from api.settings import Settings
from jobs.spec import BUILTIN_MANIFEST, RUN_NAME_PATTERN, JobSpec
from leviathan.run.storage import is_uri, normalize

_RUN_NAME = re.compile(RUN_NAME_PATTERN)

# Job metadata keys (Ray metadata values are strings): what a Leviathan job carries.
META_RUN_DIR = "leviathan_run_dir"
META_RUN_NAME = "leviathan_run_name"
META_SPEC_NAME = "leviathan_spec_name"
META_MODULES = "leviathan_modules"
META_MEMBERS_PER_MODULE = "leviathan_members_per_module"
META_PHASE1_STEPS = "leviathan_phase1_steps"
META_PHASE2_STEPS = "leviathan_phase2_steps"


def storage_root(settings: Settings) -> str:
    return normalize(settings.storage)


def under_root(given: str, root: str) -> str | None:
    """`given` normalised if it is `root` or a folder below it, else None.

    Local paths must be absolute; `..` may not climb out; symlinks are not
    followed (the storage root is the operator's, and so is what lies in it).
    """
    if is_uri(given) or is_uri(root):
        norm = given.rstrip("/")
        inside = norm == root or norm.startswith(root + "/")
        return norm if inside and "/../" not in norm + "/" and "/./" not in norm + "/" else None
    norm = os.path.normpath(os.path.expanduser(given))
    if not os.path.isabs(norm):
        return None
    return norm if norm == root or norm.startswith(root.rstrip("/") + "/") else None


def data_root(settings: Settings) -> str:
    if is_uri(settings.data_root):
        return normalize(settings.data_root)
    return os.path.realpath(os.path.expanduser(settings.data_root))


def manifest_allowed(manifest: str, settings: Settings) -> bool:
    """`builtin`, a local path under the data root once symlinks are resolved, or (when the
    operator's data root is shared storage) a URI under it."""
    if manifest == BUILTIN_MANIFEST:
        return True
    if "\0" in manifest:
        return False
    if is_uri(manifest) or is_uri(settings.data_root):
        return under_root(manifest, data_root(settings)) is not None
    if not os.path.isabs(os.path.expanduser(manifest)):
        return False
    real = os.path.realpath(os.path.expanduser(manifest))
    root = data_root(settings)
    return real == root or real.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class RunRef:
    """A Leviathan job's run: its folder (None when the API may not read it) and
    what its metadata says about the spec (None where it says nothing)."""

    run_dir: str | None
    run_name: str | None
    spec_name: str | None = None
    modules: int | None = None
    members_per_module: int | None = None
    phase1_steps: int | None = None
    phase2_steps: int | None = None


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


_PYTHON = re.compile(r"^python[0-9.]*$")


def train_arguments(entrypoint: str) -> list[str] | None:
    """The arguments after `python [flags] -m jobs.train` / `leviathan train` in an
    entrypoint, or None when the entrypoint does not run Leviathan's training."""
    try:
        argv = shlex.split(entrypoint)
    except ValueError:
        return None
    for i, word in enumerate(argv):
        name = os.path.basename(word)
        if name == "leviathan" and argv[i + 1 : i + 2] == ["train"]:
            return argv[i + 2 :]
        if _PYTHON.match(name):
            k = i + 1
            while k < len(argv) and argv[k].startswith("-") and argv[k] != "-m":
                k += 1
            if argv[k : k + 2] == ["-m", "jobs.train"]:
                return argv[k + 2 :]
    return None


def _option(args: list[str], name: str) -> str | None:
    """The value of `--name V` / `--name=V` (the last one wins, as with argparse)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def _folder(storage: str | None, name: str | None, root: str) -> str | None:
    if name is None or not _RUN_NAME.match(name):
        return None
    base = root if storage is None else under_root(storage, root)
    return None if base is None else f"{base}/{name}"


def run_of(job: RayJob, root: str) -> RunRef | None:
    """The job's run, or None when it is not a Leviathan training job."""
    meta = job.metadata
    if META_RUN_DIR in meta:
        given = meta[META_RUN_DIR]
        return RunRef(
            run_dir=under_root(given, root),
            run_name=meta.get(META_RUN_NAME),
            spec_name=meta.get(META_SPEC_NAME),
            modules=_int_or_none(meta.get(META_MODULES)),
            members_per_module=_int_or_none(meta.get(META_MEMBERS_PER_MODULE)),
            phase1_steps=_int_or_none(meta.get(META_PHASE1_STEPS)),
            phase2_steps=_int_or_none(meta.get(META_PHASE2_STEPS)),
        )
    args = train_arguments(job.entrypoint)
    name = meta.get(META_RUN_NAME)
    if name is not None:
        storage = _option(args, "--storage") if args is not None else None
        return RunRef(run_dir=_folder(storage, name, root), run_name=name)
    if args is None:
        return None
    name = _option(args, "--name")
    return RunRef(run_dir=_folder(_option(args, "--storage"), name, root), run_name=name)


def job_metadata(spec: JobSpec, spec_name: str) -> dict[str, str]:
    """The metadata an API-submitted job carries: what `run_of` reads back."""
    return {
        META_RUN_DIR: spec.run_dir,
        META_RUN_NAME: spec.name,
        META_SPEC_NAME: spec_name,
        META_MODULES: str(spec.ensemble.modules),
        META_MEMBERS_PER_MODULE: str(spec.ensemble.members_per_module),
        META_PHASE1_STEPS: str(spec.training.phase1_steps),
        META_PHASE2_STEPS: str(spec.training.phase2_steps),
    }
