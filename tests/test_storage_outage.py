"""An object store that goes away mid-run: uploads and appends retry, and the run finishes whole."""

from __future__ import annotations

import pytest

from leviathan.run import storage


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


# A whole run through two outages: tests/test_train_slow.py's object-store run.
