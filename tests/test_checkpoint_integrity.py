"""Checkpoints are sealed, verified on restore, and a broken latest one falls back to the previous."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster import checkpointing
from cluster.checkpointing import CheckpointLayoutError, newest_intact, seal, seal_file, verify
from leviathan.run.storage import StorageUnavailable, retrying


def write_checkpoint(folder: Path, phase: str, step: int, world_size: int = 2) -> Path:
    """A checkpoint as the ranks leave it: each rank's files and its seal, Ray-merged into one folder."""
    folder.mkdir(parents=True)
    for rank in range(world_size):
        part = folder.parent / f"{folder.name}-rank{rank}"
        part.mkdir()
        (part / checkpointing.module_file(rank)).write_bytes(bytes(range(256)) * (rank + 4))
        (part / checkpointing.rng_file(rank)).write_bytes(b"rng" * 10)
        if rank == 0:
            state = {"format_version": checkpointing.FORMAT_VERSION, "phase": phase, "step": step, "world_size": world_size}
            (part / checkpointing.STATE_FILE).write_text(json.dumps(state))
        seal(part, rank)
        for f in part.iterdir():
            shutil.move(str(f), folder / f.name)
        part.rmdir()
    return folder


def test_an_intact_checkpoint_verifies(tmp_path):
    assert verify(write_checkpoint(tmp_path / "ckpt", "members", 4)) == []


def test_a_truncated_file_is_named_with_its_sizes(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", "members", 4)
    path = ckpt / checkpointing.module_file(1)
    path.write_bytes(path.read_bytes()[:100])
    assert verify(ckpt) == ["module_1.pt: 100 bytes, sealed with 1280"]


def test_a_changed_byte_fails_the_hash(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", "members", 4)
    path = ckpt / checkpointing.rng_file(0)
    path.write_bytes(b"RNG" + path.read_bytes()[3:])
    assert verify(ckpt) == ["rng_rank_0.pt: sha256 differs from its seal"]


def test_a_missing_seal_or_state_is_not_intact(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", "merge", 2)
    (ckpt / seal_file(1)).unlink()
    assert verify(ckpt) == ["files_rank_1.json: missing (rank 1 never finished its part)"]
    (ckpt / checkpointing.STATE_FILE).unlink()
    assert verify(ckpt)[0].startswith("state.json:")


def test_assemble_refuses_a_checkpoint_that_is_not_intact(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", "merge", 2)
    (ckpt / checkpointing.module_file(0)).unlink()
    with pytest.raises(CheckpointLayoutError, match="not intact: module_0.pt: missing"):
        checkpointing.assemble(ckpt)


def test_newest_intact_skips_a_broken_latest_for_the_one_before(tmp_path):
    from ray.train import Checkpoint

    older = write_checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-01", "members", 6)
    latest = write_checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-02", "merge", 4)
    (latest / checkpointing.module_file(0)).write_bytes(b"")
    chosen, skipped = newest_intact(Checkpoint(path=str(latest), filesystem=pafs.LocalFileSystem()))
    assert Path(chosen.path) == older
    assert len(skipped) == 1 and "not intact" in skipped[0] and "module_0.pt: 0 bytes" in skipped[0]

    (older / seal_file(0)).unlink()
    chosen, skipped = newest_intact(Checkpoint(path=str(latest), filesystem=pafs.LocalFileSystem()))
    assert chosen is None and len(skipped) == 2


def test_a_broken_latest_is_still_the_bound_for_what_was_written_after_it(tmp_path):
    from ray.train import Checkpoint

    older = write_checkpoint(tmp_path / "checkpoint_a", "members", 4)
    latest = write_checkpoint(tmp_path / "checkpoint_b", "members", 8)
    write_checkpoint(tmp_path / "checkpoint_c", "members", 12)  # written by the failed attempt, never registered
    (latest / checkpointing.module_file(1)).write_bytes(b"")
    chosen, skipped = newest_intact(Checkpoint(path=str(latest), filesystem=pafs.LocalFileSystem()))
    assert Path(chosen.path) == older and len(skipped) == 1


def test_newest_intact_never_prefers_a_checkpoint_after_rays_latest(tmp_path):
    from ray.train import Checkpoint

    latest = write_checkpoint(tmp_path / "checkpoint_a", "members", 6)
    write_checkpoint(tmp_path / "checkpoint_b", "merge", 2)  # written, never registered
    chosen, skipped = newest_intact(Checkpoint(path=str(latest), filesystem=pafs.LocalFileSystem()))
    assert Path(chosen.path) == latest and skipped == []


class Flaky:
    """An action that fails `failures` times with `error`, then returns "done"."""

    def __init__(self, failures: int, error: OSError):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def test_retrying_outlasts_a_short_outage():
    action = Flaky(2, ConnectionError(errno.ECONNREFUSED, "connection refused"))
    assert retrying(action, "uploading", budget_s=30) == "done" and action.calls == 3


def test_retrying_gives_up_at_its_bound_with_a_clear_reason():
    action = Flaky(10**6, OSError("When uploading part: AWS Error NETWORK_CONNECTION"))
    with pytest.raises(StorageUnavailable, match=r"^uploading checkpoint x: storage unreachable for \d+ s"):
        retrying(action, "uploading checkpoint x", budget_s=0.6)
    assert action.calls >= 2


def test_retrying_does_not_retry_a_full_disk_or_a_missing_file():
    full = Flaky(1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(StorageUnavailable, match="disk is full"):
        retrying(full, "writing", budget_s=30)
    missing = Flaky(1, FileNotFoundError("nope"))
    with pytest.raises(FileNotFoundError):
        retrying(missing, "reading", budget_s=30)
    assert full.calls == missing.calls == 1


# End to end, a broken latest checkpoint is resumed past in tests/test_resume.py: a truncated module
# file after a killed driver, a deleted seal after an API stop; both end with the uninterrupted figures.
