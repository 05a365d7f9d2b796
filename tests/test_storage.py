"""The storage layer (leviathan.run.storage) on local disk and on a real object store (moto's S3)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from leviathan.run import storage
from leviathan.run.storage import AppendLog, LogCursor


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_files_and_folders(root, tmp_path):
    run = storage.join(root, "run")
    assert not storage.exists(run)
    storage.make_dir(run, new=True)
    assert storage.is_dir(run)
    with pytest.raises(FileExistsError):
        storage.make_dir(run, new=True)
    storage.make_dir(run)  # an existing folder is fine without new=True

    assert storage.read_text(storage.join(run, "spec.json")) is None
    storage.write_text(storage.join(run, "a", "b", "spec.json"), "{}\n")
    assert storage.read_text(storage.join(run, "a", "b", "spec.json")) == "{}\n"
    assert storage.is_file(storage.join(run, "a", "b", "spec.json"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(run, "absent"))

    local = tmp_path / "final"
    (local / "sub").mkdir(parents=True)
    (local / "w.bin").write_bytes(b"\0\1\2")
    (local / "sub" / "c.json").write_text("[1]")
    storage.upload_dir(local, storage.join(run, "final"))
    storage.upload_dir(local, storage.join(run, "final"))  # replaces
    assert storage.read_bytes(storage.join(run, "final", "w.bin")) == b"\0\1\2"
    back = tmp_path / "back"
    storage.download(storage.join(run, "final"), back)
    assert (back / "sub" / "c.json").read_text() == "[1]"
    storage.download(storage.join(run, "final", "sub"), tmp_path / "flat")  # a folder of files only
    storage.download(storage.join(run, "final", "w.bin"), tmp_path / "one" / "w.bin")
    assert (tmp_path / "flat" / "c.json").read_text() == "[1]"
    assert (tmp_path / "one" / "w.bin").read_bytes() == b"\0\1\2"

    storage.remove_dir(run)
    assert not storage.exists(storage.join(run, "final", "w.bin"))


def test_normalize_and_join(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("runs/") == str(tmp_path / "runs")
    assert storage.normalize("s3://b/runs/") == "s3://b/runs"
    assert storage.join("s3://b/runs/", "x", "spec.json") == "s3://b/runs/x/spec.json"
    assert storage.is_uri("gs://b") and not storage.is_uri("/tmp/x")


def test_object_store_log_appends_one_part_per_append(s3_bucket, s3_server):
    """On S3 an append writes one new object of its own bytes: nothing written before
    is read or rewritten, so appending n records costs O(n) in all, not O(n^2)."""
    log = AppendLog(f"{s3_bucket}/run/metrics.jsonl")
    assert log.parted and not log.exists() and log.read_from() is None
    appends = [f'{{"step": {i}}}\n'.encode() * (i + 1) for i in range(5)]
    for data in appends:
        log.append(data)
    fs = s3_server.filesystem()
    infos = fs.get_file_info(pafs.FileSelector(s3_bucket.removeprefix("s3://") + "/run", recursive=True))
    parts = sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File)
    assert [p.rsplit("/", 2)[1:] for p, _ in parts] == [["metrics", f"part-{i:06d}.jsonl"] for i in range(5)]
    assert [size for _, size in parts] == [len(d) for d in appends]
    assert log.read_all() == b"".join(appends)

    data, cursor = log.read_from()
    assert cursor == LogCursor(part=5)
    assert log.read_from(cursor) == (b"", cursor)

    restarted = AppendLog(f"{s3_bucket}/run/metrics.jsonl")  # a new writer continues the numbering
    restarted.append(b'{"step": 9}\n')
    assert log.read_from(cursor) == (b'{"step": 9}\n', LogCursor(part=6))
    with pytest.raises(ValueError):
        restarted.append(b"no newline")


def test_local_log_is_one_appended_file(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = AppendLog(str(path))
    assert not log.parted and log.read_from() is None
    log.append(b"a\n")
    log.append(b"b\n")
    assert path.read_bytes() == b"a\nb\n"
    data, cursor = log.read_from()
    assert (data, cursor) == (b"a\nb\n", LogCursor(offset=4))
    with open(path, "ab") as f:
        f.write(b"c\nhalf")  # a line still being written is left for the next read
    assert log.read_from(cursor) == (b"c\n", LogCursor(offset=6))
    path.write_bytes(b"x\n")  # replaced by a shorter file: read from the start
    assert log.read_from(LogCursor(offset=6)) == (b"x\n", LogCursor(offset=2))
    assert log.read_from(LogCursor(offset=2)) == (b"", LogCursor(offset=2))  # nothing new
    path.unlink()
    assert log.read_from(LogCursor(offset=2)) is None
