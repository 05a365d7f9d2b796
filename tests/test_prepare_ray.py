"""`leviathan prepare --ray`: Ray Data tokenises into the very shards jobs.prepare writes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.prepare import PrepareError, prepare
from jobs.prepare_ray import prepare_ray, ray_source
from leviathan.data.staging import load_manifest
from leviathan.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Three domains, one per reader: a folder of files, a Parquet column with nulls, one long file."""
    root = tmp_path_factory.mktemp("corpus")
    code = root / "code"
    (code / "pkg").mkdir(parents=True)
    for i in range(40):
        (code / "pkg" / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}  # é\n" * (1 + i % 5))
    (code / "empty.py").write_text("")
    (code / ".hidden.py").write_text("never read\n")
    rows = [None if i % 9 == 0 else f"Row {i}: the quick brown fox, ünïcödé {i * i}.\n" * (1 + i % 3) for i in range(120)]
    pq.write_table(pa.table({"text": rows}), root / "prose.parquet", row_group_size=16)
    (root / "log.txt").write_text("".join(f"2026-11-29 08:{i % 60:02d} event {i} ok\n" for i in range(600)))
    return {"code": code, "prose": root / "prose.parquet", "log": root / "log.txt"}


def _sources(corpus: dict[str, Path]):
    return [ray_source(name, path) for name, path in corpus.items()]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_ray_shards_are_byte_identical_to_the_single_process_path(ray_cluster, corpus, tmp_path):
    """Byte-level here; a BPE tokenizer file through the same path is the Ray-job test's."""
    single = prepare(corpus, tmp_path / "single", tokenizer="byte", vocab_size=300, seq_len=16)
    # Small batches over 2 actors: many batches of each domain come back, and must be written in order.
    parallel = prepare_ray(_sources(corpus), tmp_path / "ray", tokenizer="byte", vocab_size=300, seq_len=16,
                           actors=2, batch_documents=3)
    assert parallel.name == "manifest.json"
    assert _files(parallel.parent) == _files(single.parent), "the Ray path wrote different files"


@pytest.mark.slow
def test_bpe_trains_on_a_bounded_sample_and_encodes_everything(ray_cluster, corpus, tmp_path):
    manifest = prepare_ray(_sources(corpus), tmp_path / "out", tokenizer="bpe", vocab_size=300, seq_len=16,
                           bpe_sample_bytes=600, actors=2)
    m = load_manifest(manifest)
    tok = load_tokenizer(manifest)
    for name, path in corpus.items():
        text = b""
        for split in ("train", "val"):
            ids = np.asarray(m.shard(name, split).tokens)  # every piece ends in eos
            text += tok.decode_bytes(ids[ids != tok.eos_id])
        if path.suffix == ".parquet":
            expected = "".join(v for v in pq.read_table(path)["text"].to_pylist() if v).encode()
        elif path.is_dir():
            expected = b"".join(p.read_bytes() for p in sorted((path / "pkg").iterdir()))
        else:
            expected = path.read_bytes()
        assert text == expected, f"domain {name}: the shards do not decode to the source text"
    # 600 bytes (200 per domain) cannot teach 300 - 260 merges' worth of every domain's words.
    full = prepare(corpus, tmp_path / "full", tokenizer="bpe", vocab_size=300, seq_len=16)
    assert json.loads((manifest.parent / "tokenizer.json").read_text()) != json.loads(
        (full.parent / "tokenizer.json").read_text()), "the sample-trained tokenizer saw the whole corpus"


def test_bad_options_are_one_line_errors(corpus, tmp_path):
    with pytest.raises(PrepareError, match="--tokenizer-file: needs --tokenizer bpe"):
        prepare_ray(_sources(corpus), tmp_path / "a", tokenizer="byte", tokenizer_file=tmp_path / "t.json")
    with pytest.raises(PrepareError, match="--tokenizer-file: tokenizer file not found"):
        prepare_ray(_sources(corpus), tmp_path / "b", tokenizer="bpe", tokenizer_file=tmp_path / "t.json")
    with pytest.raises(PrepareError, match="domain nope: path not found"):
        ray_source("nope", tmp_path / "missing")


@pytest.mark.slow
def test_prepare_ray_runs_under_ray_job_submit(ray_cluster, corpus, tmp_path):
    """`python -m jobs.prepare_ray` as a Ray job, with a BPE tokenizer file and 2 tokenizer actors,
    writes the single-process path's shards."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    single = prepare(corpus, tmp_path / "single", tokenizer="bpe", vocab_size=300, seq_len=16)
    domains = " ".join(f"--domain {name}={path}" for name, path in corpus.items())
    entrypoint = (f"{sys.executable} -m jobs.prepare_ray {domains} --tokenizer bpe --seq-len 16 "
                  f"--tokenizer-file {single.parent / 'tokenizer.json'} --actors 2 --out {tmp_path / 'job'}")
    client = JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_cluster.auth_headers())
    job_id = client.submit_job(entrypoint=entrypoint)
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job_id} still {status} after 300 s"
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]
    assert _files(tmp_path / "job") == _files(single.parent)
