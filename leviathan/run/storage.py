"""Run-folder and data I/O over local paths and pyarrow.fs URIs (s3://, gs://, file://, ...).

Every layer reads and writes run folders, manifests and shards through this
module, so "is it a URI?" is decided in one place. A location is a plain string:
a local path (`~` expanded, made absolute) or a URI pyarrow.fs resolves to a
filesystem. Object stores cannot append, so `AppendLog` writes a log as numbered
part files there (one small object per append, O(1)), and as one appended file
on local disks.

Torch-free: imported by api/, jobs/ and cluster/ alike.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import pyarrow.fs as pafs

from leviathan.run.env import STORAGE_RETRY_S

logger = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_RETRY_S = 60.0


class StorageUnavailable(OSError):
    """Storage that stayed unreachable past the retry bound, or a full disk; one line says which."""


def retry_budget_s() -> float:
    """How long a storage write keeps retrying: `$LEVIATHAN_STORAGE_RETRY_S`, default 60 s."""
    return float(os.environ.get(STORAGE_RETRY_S) or DEFAULT_RETRY_S)


def _transient(e: OSError) -> bool:
    """An error worth retrying: a network or service fault, not a missing file, a refusal or a full disk."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageUnavailable)):
        return False
    return e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def retrying(action: Callable[[], T], what: str, budget_s: float | None = None) -> T:
    """Run `action` (a storage write), retrying transient failures with doubling backoff.

    An object store that goes away for a while (a restart, a network blip) must
    not take the run down, so a failed write is retried for `budget_s` seconds
    (default `retry_budget_s()`), with one warning when the outage starts and
    one when it ends. Past the bound, or on a full disk, it raises
    `StorageUnavailable` naming `what` and the last error.
    """
    budget = retry_budget_s() if budget_s is None else budget_s
    start, delay, failures = time.monotonic(), 0.5, 0
    while True:
        try:
            result = action()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageUnavailable(f"{what}: the disk is full ({e})") from None
            if not _transient(e):
                raise
            waited = time.monotonic() - start
            if waited >= budget:
                raise StorageUnavailable(
                    f"{what}: storage unreachable for {waited:.0f} s (bound {budget:.0f} s, {STORAGE_RETRY_S}): {e}"
                ) from None
            if failures == 0:
                logger.warning("%s failed, retrying for up to %.0f s: %s", what, budget, e)
            failures += 1
            time.sleep(min(delay, max(0.0, budget - waited)))
            delay = min(delay * 2, 8.0)
            continue
        if failures:
            logger.warning("%s succeeded after %d retries (%.1f s)", what, failures, time.monotonic() - start)
        return result


def is_uri(location: str) -> bool:
    """True for `scheme://...` locations, False for local paths."""
    return "://" in str(location)


def normalize(location: str | os.PathLike) -> str:
    """A canonical spelling: URIs without a trailing slash, local paths absolute with `~` expanded."""
    location = str(location)
    if is_uri(location):
        return location.rstrip("/")
    return os.path.abspath(os.path.expanduser(location))


def join(location: str, *names: str) -> str:
    """`location/name/...` for paths and URIs alike."""
    return "/".join([str(location).rstrip("/"), *names])


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `location` and the path inside it."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location.rstrip("/"))
    return pafs.LocalFileSystem(), normalize(location)


def _is_local_fs(fs: pafs.FileSystem) -> bool:
    """Local disks append in place; object stores do not."""
    return isinstance(fs, pafs.LocalFileSystem)


def local_path(location: str) -> Path | None:
    """The path on this machine's disk of a location on the local filesystem (a plain
    path or a file:// URI); None for remote storage."""
    fs, path = resolve(location)
    return Path(path) if _is_local_fs(fs) else None


def _type(location: str) -> pafs.FileType:
    fs, path = resolve(location)
    return fs.get_file_info(path).type


def exists(location: str) -> bool:
    return _type(location) != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    return _type(location) == pafs.FileType.File


def is_dir(location: str) -> bool:
    return _type(location) == pafs.FileType.Directory


def list_dir(location: str) -> list[str]:
    """Names of the entries directly in a folder ([] when it is absent or empty)."""
    fs, path = resolve(location)
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def read_bytes(location: str) -> bytes:
    """The whole file; FileNotFoundError when it is absent."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str | None:
    """The file's text, or None when it is absent."""
    try:
        return read_bytes(location).decode()
    except FileNotFoundError:
        return None


def write_bytes(location: str, data: bytes) -> None:
    """Write (replace) one file, creating the folders above it."""
    fs, path = resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def make_dir(location: str, *, new: bool = False) -> None:
    """Create a folder (and its parents). `new=True`: FileExistsError if it already exists,
    so two writers never share one folder (on object stores this check is best effort)."""
    fs, path = resolve(location)
    if new:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise FileExistsError(location)
        if _is_local_fs(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.mkdir(path)  # atomic: fails when another writer won the race
            return
    fs.create_dir(path, recursive=True)


def remove_dir(location: str) -> None:
    """Delete a folder and everything in it (nothing if it is absent)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def upload_dir(local: str | os.PathLike, location: str) -> None:
    """Copy a local folder to `location`, replacing what was there."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    if _is_local_fs(fs):
        shutil.copytree(local, path)
        return
    pafs.copy_files(os.path.abspath(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(location: str, local: str | os.PathLike) -> None:
    """Copy a file or folder at `location` to the local path `local`."""
    fs, path = resolve(location)
    local = os.path.abspath(local)
    is_folder = fs.get_file_info(path).type == pafs.FileType.Directory
    os.makedirs(local if is_folder else os.path.dirname(local), exist_ok=True)  # copy_files makes only subfolders
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


# ----------------------------------------------------------------------------- append-only logs


@dataclass(frozen=True, order=True)
class LogCursor:
    """How far a reader has consumed an `AppendLog`: a part number and a byte offset in it.
    Local logs are one file: part is always 0. Cursors order by position in the log."""

    part: int = 0
    offset: int = 0


_PART = re.compile(r"part-(\d+)\.jsonl$")


class AppendLog:
    """A log of newline-terminated records at `location` (e.g. `<run>/metrics.jsonl`).

    On a local filesystem it is that one file, appended in place. On an object
    store, where an append would rewrite the whole object, each `append` writes
    one new object `<location without .jsonl>/part-000123.jsonl`; parts are never
    rewritten, so an append costs O(its own bytes) and readers can resume from a
    `LogCursor` by reading only the parts after it. One writer at a time.
    """

    def __init__(self, location: str):
        self.location = location.rstrip("/")
        self._fs, self._path = resolve(self.location)
        self.parted = not _is_local_fs(self._fs)
        self._parts_dir = self._path.removesuffix(".jsonl")
        self._next_part: int | None = None  # found by one listing on the first append

    def _part_path(self, n: int) -> str:
        return f"{self._parts_dir}/part-{n:06d}.jsonl"

    def append(self, data: bytes) -> None:
        """Add complete lines (`data` must end with a newline)."""
        if not data:
            return
        if not data.endswith(b"\n"):
            raise ValueError("an AppendLog append must end with a newline")
        if not self.parted:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            try:
                with open(self._path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageUnavailable(f"appending to {self.location}: the disk is full ({e})") from None
                raise
            return
        if self._next_part is None:
            self._next_part = retrying(self._count_parts, f"listing {self.location}")

        def write_part() -> None:
            with self._fs.open_output_stream(self._part_path(self._next_part)) as f:
                f.write(data)

        retrying(write_part, f"appending to {self.location}")  # rewriting the same part is idempotent
        self._next_part += 1

    def _count_parts(self) -> int:
        infos = self._fs.get_file_info(pafs.FileSelector(self._parts_dir, allow_not_found=True))
        numbers = [int(m.group(1)) for i in infos if (m := _PART.search(i.base_name))]
        return max(numbers, default=-1) + 1

    def exists(self) -> bool:
        path = self._part_path(0) if self.parted else self._path
        return self._fs.get_file_info(path).type == pafs.FileType.File

    def read_from(self, cursor: LogCursor = LogCursor()) -> tuple[bytes, LogCursor] | None:
        """The complete lines written after `cursor`, and the cursor after them; None while
        the log does not exist. A torn last line (a local write in progress) is left for
        the next call. A local file that shrank was replaced: it is read from the start, and
        the cursor returned is then smaller than the one given."""
        if not self.parted:
            return self._read_file_from(cursor.offset)
        chunks = []
        part = cursor.part
        while True:
            try:
                with self._fs.open_input_stream(self._part_path(part)) as f:
                    chunks.append(f.read())
            except FileNotFoundError:
                break
            part += 1
        if part == 0:
            return None
        return b"".join(chunks), LogCursor(part=part)

    def _read_file_from(self, offset: int) -> tuple[bytes, LogCursor] | None:
        try:
            # A poll of a log that has not grown (most polls) costs one stat, no open.
            if offset and os.stat(self._path).st_size == offset:
                return b"", LogCursor(offset=offset)
            with open(self._path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size < offset:
                    offset = 0
                f.seek(offset)
                data = f.read(size - offset)
        except FileNotFoundError:
            return None
        end = data.rfind(b"\n") + 1
        return data[:end], LogCursor(offset=offset + end)

    def read_all(self) -> bytes:
        """Every complete line so far (b"" when the log does not exist)."""
        got = self.read_from()
        return b"" if got is None else got[0]

