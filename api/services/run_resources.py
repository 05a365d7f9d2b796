"""Run folders as resources: list, read, download from and delete the runs under
the storage root.

What a run is comes from the storage alone (Ray forgets old jobs): a folder
directly under the root holding spec.json. Ray's job list adds only what the
storage cannot say: which runs a job that has not ended writes now, and the owner
of a run whose folder predates its owner.json.

Every path a caller names is checked on its text before any file is opened (a run
name must match the spec's name pattern; an artifact path is relative, without
`.`, `..` or empty parts), and on a local disk a file whose real path leaves the
run folder (a symlink) is not served: 404, as for a file that does not exist.
Free of FastAPI: failures are `api.errors.ApiError`s.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from api.auth import META_OWNER, Principal
from api.errors import ApiError, Conflict, InvalidField, NotFound, StorageError
from api.metrics import MetricsReader, read_run_spec
from api.ray_jobs import TERMINAL, RayJob
from api.schemas import Artifact, RunDetail, RunFigures, RunSummary
from api.services.runs import run_of
from api.strict_json import shorten
from jobs.spec import RUN_NAME_PATTERN
from leviathan.run import storage
from leviathan.run.folder import CHECKPOINTS_DIR, FINAL_DIR, REPORT_JSON, RESULT_FILE, RunFolder

_RUN_NAME = re.compile(RUN_NAME_PATTERN)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK_BYTES = 1 << 20


class RangeNotSatisfiable(ApiError):
    """A byte range that starts past the file's end (RFC 9110 section 15.5.17)."""

    status = 416

    def __init__(self, size: int) -> None:
        super().__init__(f"the range starts past the file's end ({size} bytes)")
        self.headers = {"Content-Range": f"bytes */{size}"}


# ----------------------------------------------------------------------------- names and owners


def check_name(name: str) -> None:
    """422 at the path's `name` unless it is a run name (so never a path)."""
    if not _RUN_NAME.match(name):
        raise InvalidField([{"type": "string_pattern_mismatch", "loc": ("path", "name"),
                             "msg": f"a run name must match {RUN_NAME_PATTERN}", "input": shorten(name)}])


def write_owner(run_dir: str, user: str) -> None:
    """Record who submitted the run, so it stays theirs after Ray forgets the job."""
    storage.write_text(RunFolder(run_dir).owner, json.dumps({"user": user}) + "\n")


def read_owner(folder: RunFolder) -> str | None:
    try:
        data = json.loads(storage.read_bytes(folder.owner))
    except (OSError, ValueError):
        return None
    user = data.get("user") if isinstance(data, dict) else None
    return user if isinstance(user, str) else None


@dataclass(frozen=True)
class RunJob:
    """What Ray knows of the job that writes a run: its id, status and owner."""

    job_id: str
    status: str
    owner: str | None

    @property
    def active(self) -> bool:
        return self.status not in TERMINAL


def jobs_by_run(jobs: list[RayJob], root: str) -> dict[str, RunJob]:
    """Run folder -> the job writing it: one that has not ended if there is one, else the newest."""
    by_run: dict[str, RunJob] = {}
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        run = run_of(job, root)
        if run is None or run.run_dir is None or job.submission_id is None:
            continue
        known = by_run.get(run.run_dir)
        if known is None or (job.status not in TERMINAL and not known.active):
            by_run[run.run_dir] = RunJob(job.submission_id, job.status, job.metadata.get(META_OWNER))
    return by_run


def owner_of(folder: RunFolder, job: RunJob | None) -> str | None:
    """owner.json's user, else the owner in Ray's record of its job (runs older than owner.json)."""
    return read_owner(folder) or (job.owner if job is not None else None)


def may_see(principal: Principal, owner: str | None) -> bool:
    """Admins see every run, anyone else only their own; a run without an owner is an admin's."""
    return principal.is_admin or (owner is not None and owner == principal.user)


# ----------------------------------------------------------------------------- reading a run


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def read_json(location: str) -> Any:
    """A JSON file (NaN and infinities as null), None when absent or unreadable."""
    try:
        return json.loads(storage.read_bytes(location), parse_constant=lambda _: None)
    except (OSError, ValueError):
        return None


def figures(result: Any) -> RunFigures | None:
    """The headline figures of train_result.json: losses per report row, and the verdicts."""
    if not isinstance(result, dict):
        return None
    rows = [r for r in result.get("rows") or [] if isinstance(r, dict) and isinstance(r.get("name"), str)]

    def column(key: str) -> dict[str, float]:
        return {r["name"]: x for r in rows if (x := _finite(r.get(key))) is not None}

    verdict = {k: v for k in ("merged_beats_every_member", "merged_beats_uniform")
               if isinstance(v := result.get(k), bool)}
    return RunFigures(wall_time_s=_finite(result.get("wall_time_s")), mixed_val_loss=column("mixed_val_loss"),
                      switch_val_loss=column("switch_val_loss"), **verdict)


def _checkpoints(folder: RunFolder) -> list[str]:
    return [n for n in storage.list_dir(folder.checkpoints) if n.startswith("checkpoint_")]


def _state(names: set[str], folder: RunFolder, job: RunJob | None) -> str:
    if job is not None and job.active:
        return "running"
    if RESULT_FILE in names:
        return "finished"
    if CHECKPOINTS_DIR in names and _checkpoints(folder):
        return "stopped"
    return "failed"


def _time(seconds: float | None) -> datetime | None:
    return datetime.fromtimestamp(seconds, tz=timezone.utc) if seconds is not None else None


def _created_at(folder: RunFolder) -> datetime | None:
    fs, path = storage.resolve(folder.spec)
    mtime = fs.get_file_info(path).mtime
    return mtime.astimezone(timezone.utc) if isinstance(mtime, datetime) else None


def summarize(folder: RunFolder, owner: str | None, job: RunJob | None, reader: MetricsReader,
              detailed: bool = False) -> RunSummary | RunDetail:
    """One run's summary (or detail) from its folder: a few small reads (500 when they fail)."""
    try:
        return _summarize(folder, owner, job, reader, detailed)
    except OSError as e:
        raise StorageError(f"cannot read {folder.root}: {e}") from None


def _summarize(folder: RunFolder, owner: str | None, job: RunJob | None, reader: MetricsReader,
               detailed: bool) -> RunSummary | RunDetail:
    names = set(storage.list_dir(folder.root))
    state = _state(names, folder, job)
    metrics = reader.summary(folder.root)
    fields: dict[str, Any] = dict(
        name=folder.name, run_dir=folder.root, state=state, owner=owner,
        job_id=job.job_id if job is not None and job.active else None,
        job_status=job.status if job is not None and job.active else None,
        phase=metrics.phase if metrics else None, step=metrics.step if metrics else None,
        created_at=_created_at(folder), updated_at=_time(metrics.updated_at) if metrics else None,
        figures=figures(read_json(folder.result)) if RESULT_FILE in names else None,
    )
    if not detailed:
        return RunSummary(**fields)
    return RunDetail(
        **fields,
        spec=read_run_spec(folder.root),
        checkpoints=_checkpoints(folder) if CHECKPOINTS_DIR in names else [],
        metrics_records=metrics.records if metrics else None,
        has_report=REPORT_JSON in names,
        has_final=FINAL_DIR in names,
    )


def run_names(root: str) -> list[str]:
    """Folders directly under the root that are runs (a run name, holding spec.json)."""
    try:
        names = storage.list_dir(root)
    except OSError as e:
        raise StorageError(f"cannot list {root}: {e}") from None
    return [n for n in names if _RUN_NAME.match(n) and storage.is_file(RunFolder.of(root, n).spec)]


def list_runs(root: str, jobs: list[RayJob], principal: Principal, reader: MetricsReader) -> list[RunSummary]:
    """Every run `principal` may see, newest first (by when spec.json was written)."""
    by_run = jobs_by_run(jobs, root)
    runs = []
    for name in run_names(root):
        folder = RunFolder.of(root, name)
        job = by_run.get(folder.root)
        owner = owner_of(folder, job)
        if may_see(principal, owner):
            runs.append(summarize(folder, owner, job, reader))
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(runs, key=lambda r: (r.created_at or oldest, r.name), reverse=True)


def visible_run(root: str, name: str, jobs: list[RayJob],
                principal: Principal) -> tuple[RunFolder, str | None, RunJob | None]:
    """(folder, owner, job) of the run if `principal` may see it; otherwise the very
    NotFound a missing run gets, so a run's existence is told only to its owner."""
    check_name(name)
    folder = RunFolder.of(root, name)
    job = jobs_by_run(jobs, root).get(folder.root)
    if not storage.is_file(folder.spec):
        raise NotFound(f"no run {name!r}")
    owner = owner_of(folder, job)
    if not may_see(principal, owner):
        raise NotFound(f"no run {name!r}")
    return folder, owner, job


def report(folder: RunFolder, markdown: bool) -> Any:
    """report.md's text, or report.json's content; 404 until the run has one."""
    if markdown:
        text = storage.read_text(folder.report_md)
        if text is None:
            raise NotFound(f"run {folder.name!r} has no report yet")
        return text
    data = read_json(folder.report_json)
    if data is None:
        raise NotFound(f"run {folder.name!r} has no report yet")
    return data


def delete_run(folder: RunFolder, job: RunJob | None) -> None:
    """Remove the run folder, local or on an object store; 409 while a job writes it."""
    if job is not None and job.active:
        raise Conflict(f"job {job.job_id} ({job.status}) is writing run {folder.name!r}; stop it first")
    try:
        storage.remove_dir(folder.root)
    except OSError as e:
        raise StorageError(f"cannot remove {folder.root}: {e}") from None


# ----------------------------------------------------------------------------- artifacts


def _inside(real: str, base: str) -> bool:
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _real_base(folder: RunFolder) -> str | None:
    """The run folder's real path on a local disk; None on an object store (no symlinks there)."""
    local = storage.local_path(folder.root)
    return os.path.realpath(local) if local is not None else None


_DIGESTS: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_DIGESTS_LOCK = threading.Lock()


def _sha256(fs: pafs.FileSystem, path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, remembered per (path, size, mtime): a model is hashed once, not per listing."""
    key = (path, size, mtime_ns)
    with _DIGESTS_LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key]
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    with _DIGESTS_LOCK:
        _DIGESTS[key] = digest.hexdigest()
        while len(_DIGESTS) > 1024:
            _DIGESTS.popitem(last=False)
    return digest.hexdigest()


def artifacts(folder: RunFolder) -> list[Artifact]:
    """The files under final/ with their sizes and sha256 (on a local disk, symlinks that
    leave the run folder are left out)."""
    fs, final = storage.resolve(folder.final)
    base = _real_base(folder)
    infos = fs.get_file_info(pafs.FileSelector(final, recursive=True, allow_not_found=True))
    found = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        if base is not None and not _inside(os.path.realpath(info.path), base):
            continue
        rel = info.path[len(final.rstrip("/")) + 1 :]
        found.append(Artifact(path=rel, size=info.size,
                              sha256=_sha256(fs, info.path, info.size, info.mtime_ns or 0)))
    return found


def artifact_path(path: str) -> list[str]:
    """The parts of an artifact path; 422 at `path` for an absolute one or one with `.`/`..`/empty parts."""
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise InvalidField([{"type": "value_error", "loc": ("path", "path"),
                             "msg": "must be a relative path inside final/ (no '.', '..' or empty parts)",
                             "input": shorten(path)}])
    return parts


@dataclass
class OpenArtifact:
    """An artifact opened for reading: its handle and size."""

    file: BinaryIO
    size: int

    def chunks(self, start: int, length: int) -> Iterator[bytes]:
        """`length` bytes from `start`, in chunks; closes the file at the end."""
        try:
            self.file.seek(start)
            left = length
            while left > 0:
                data = self.file.read(min(CHUNK_BYTES, left))
                if not data:
                    break
                left -= len(data)
                yield data
        finally:
            self.file.close()


def open_artifact(folder: RunFolder, parts: list[str]) -> OpenArtifact:
    """Open final/<parts> for reading; 404 when it is not a file inside the run folder."""
    location = folder.final_file(*parts)
    base = _real_base(folder)
    if base is not None:
        real = os.path.realpath(storage.local_path(location))  # type: ignore[arg-type]
        if not _inside(real, base) or not os.path.isfile(real):
            raise NotFound(f"run {folder.name!r} has no artifact {shorten('/'.join(parts))!r}")
        return OpenArtifact(open(real, "rb"), os.path.getsize(real))
    fs, path = storage.resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise NotFound(f"run {folder.name!r} has no artifact {shorten('/'.join(parts))!r}")
    return OpenArtifact(fs.open_input_file(path), info.size)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range `Range: bytes=...` asks for, as (start, end inclusive); None for
    the whole file (no header, or one this server ignores: several ranges, another unit,
    bad syntax, as RFC 9110 allows). 416 for a range past the end."""
    match = _RANGE.match(header.strip()) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, min(int(last), size - 1) if last else size - 1


async def off_loop(fn: Any, *args: Any) -> Any:
    """Storage calls run in a worker thread: an object store's round trips would stall the loop."""
    return await asyncio.to_thread(fn, *args)
