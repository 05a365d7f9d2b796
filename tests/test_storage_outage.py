"""An object store that goes away mid-run: uploads and appends retry, and the run finishes whole."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from leviathan.run import storage
from tests.scripts.common import builtin_manifest, tiny_spec, wait_for


def test_an_append_outlasts_a_short_outage(s3_server, s3_bucket):
    log = storage.AppendLog(f"{s3_bucket}/run/metrics.jsonl")
    log.append(b'{"a": 1}\n')
    s3_server.pause(3)
    log.append(b'{"a": 2}\n')  # refused at first, retried until the store is back
    assert log.read_all() == b'{"a": 1}\n{"a": 2}\n'


def test_an_outage_past_the_bound_fails_with_the_reason(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("LEVIATHAN_STORAGE_RETRY_S", "1")
    log = storage.AppendLog(f"{s3_bucket}/run/metrics.jsonl")
    log.append(b"{}\n")
    s3_server.pause(20)
    with pytest.raises(storage.StorageUnavailable, match=r"^appending to s3://.*: storage unreachable for \d+ s"):
        log.append(b"{}\n")
    s3_server.pause(0)


def test_a_run_on_an_object_store_survives_outages_during_its_uploads(ray_cluster, s3_server, s3_bucket, tmp_path):
    """The store is cut off for 4 s twice while checkpoints and metrics are being written;
    the run finishes with the figures of the same spec on a local disk."""
    from jobs import train

    manifest = builtin_manifest(tmp_path.parent / "leviathan-builtin")
    training = {"phase1_steps": 12, "phase2_steps": 8, "checkpoint_interval": 4, "eval_interval": 2}
    clean = train.run(tiny_spec(manifest, tmp_path, "clean", training=training), progress=False)

    spec = tiny_spec(manifest, f"{s3_bucket}/runs", "outage", training=training)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=train.run(spec, progress=False)), daemon=True)
    thread.start()
    fs = s3_server.filesystem()
    key = spec.run_dir.removeprefix("s3://")

    def checkpoints() -> int:
        try:
            infos = fs.get_file_info(pafs.FileSelector(f"{key}/checkpoints", allow_not_found=True))
        except OSError:  # the store is paused for us too
            return 0
        return sum(1 for i in infos if i.base_name.startswith("checkpoint_"))

    for seen in (1, 2):  # while the run writes its next checkpoint
        wait_for(lambda: checkpoints() >= seen, 600, f"checkpoint {seen}", poll_s=0.2)
        s3_server.pause(4)
    thread.join(timeout=900)
    assert "result" in out, "the run did not finish"
    assert out["result"]["rows"] == clean["rows"]
