"""jobs.prepare: shards that decode back to the source, manifests, bad input, the built-in corpus."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.prepare import (
    DomainSource,
    builtin_data_dir,
    ensure_builtin,
    main,
    prepare,
    prepare_sources,
)
from leviathan.data.corpus import BUILTIN_DOMAINS, DOMAIN_CAP, builtin_corpus
from leviathan.data.shards import DataError, TokenShard
from leviathan.data.staging import load_manifest
from leviathan.data.tokenizer import BPETokenizer, ByteTokenizer

REPO = Path(__file__).resolve().parents[1]

LINES = [f"line {i}: the {'quick' if i % 2 else 'lazy'} fox {'é' * (i % 3)}\n" for i in range(200)]


@pytest.fixture()
def corpus(tmp_path) -> dict[str, Path]:
    """Three small domains: a folder (with a hidden file and a subfolder), a text file, a Parquet file."""
    code = tmp_path / "code"
    (code / "sub").mkdir(parents=True)
    (code / ".hidden").mkdir()
    (code / "a.py").write_text("def a():\n    return 1\n" * 30)
    (code / "sub" / "b.py").write_text("class B:\n    x = 2\n" * 30)
    (code / "notes.txt").write_text("notes about the code\n" * 20)
    (code / ".hidden" / "c.py").write_text("SECRET = 1\n")
    (code / "empty.py").write_text("")
    (tmp_path / "prose.txt").write_text("".join(LINES))
    pq.write_table(pa.table({"body": [f"row {i} says hello\n" * 5 for i in range(40)] + [None], "id": list(range(41))}),
                   tmp_path / "rows.parquet")
    return {"code": code, "prose": tmp_path / "prose.txt", "rows": tmp_path / "rows.parquet"}


def source_documents(corpus: dict[str, Path]) -> dict[str, list[bytes]]:
    code = corpus["code"]
    return {
        "code": [(code / p).read_bytes() for p in ("a.py", "notes.txt", "sub/b.py")],  # sorted, hidden + empty skipped
        "prose": [corpus["prose"].read_bytes()],
        "rows": [(f"row {i} says hello\n" * 5).encode() for i in range(40)],
    }


def split_on(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.nonzero(tokens == eos)[0]
    assert len(ends) and ends[-1] == len(tokens) - 1, "every split must end with eos"
    return np.split(tokens, ends + 1)[:-1]


def test_byte_prepare_decodes_back_to_the_source(corpus, tmp_path):
    out = tmp_path / "out"
    path = prepare(corpus, out, tokenizer="byte", val_fraction=0.2, text_column="body", seq_len=16)
    assert path == out / "manifest.json"
    m = load_manifest(out)
    assert m.domains == ["code", "prose", "rows"]
    assert m.vocab_size == 260 and m.dtype == np.uint16 and m.tokenizer_spec["kind"] == "byte"
    m.verify()
    tok = ByteTokenizer()
    for name, docs in source_documents(corpus).items():
        entry = m.manifest.domain(name)
        pieces = {s: [p[:-1] for p in split_on(np.asarray(m.shard(name, s).tokens), tok.eos_id)] for s in ("train", "val")}
        assert b"".join(tok.decode_bytes(p) for s in ("train", "val") for p in pieces[s]) == b"".join(docs)
        for s in ("train", "val"):
            info = entry.splits[s]
            assert info.tokens == len(m.shard(name, s))
            assert info.bytes == sum(len(p) for p in pieces[s]) == info.tokens - info.documents
            assert info.documents == len(pieces[s])
            assert info.sha256 == hashlib.sha256((out / info.file).read_bytes()).hexdigest()
        assert entry.bytes == sum(map(len, docs)) and entry.documents == len(docs)
        val_share = entry.splits["val"].bytes / entry.bytes
        assert 0.15 < val_share <= 0.2 + 0.05, f"{name}: val holds {val_share:.2f} of the bytes"
        # the cut sits at a line start: the last train piece ends a line
        assert tok.decode_bytes(pieces["train"][-1]).endswith(b"\n")
    assert not list(tmp_path.glob("out.tmp-*")), "the temp folder must be gone"


def test_glob_filters_folder_files(corpus, tmp_path):
    prepare({"code": corpus["code"]}, tmp_path / "out", glob="*.py", val_fraction=0.2, seq_len=16)
    m = load_manifest(tmp_path / "out")
    assert m.manifest.domain("code").documents == 2  # a.py, sub/b.py; empty.py has no text, .hidden/c.py skipped
    text = b"".join(ByteTokenizer().decode_bytes(m.shard("code", s).tokens) for s in ("train", "val"))
    assert b"notes" not in text and b"SECRET" not in text and b"class B" in text


def test_bpe_prepare_trains_saves_and_reloads_tokenizer(corpus, tmp_path):
    out = tmp_path / "out"
    prepare(corpus, out, tokenizer="bpe", vocab_size=300, val_fraction=0.2, text_column="body", seq_len=16)
    m = load_manifest(out)
    spec = m.tokenizer_spec
    assert spec["kind"] == "bpe" and spec["file"] == "tokenizer.json" and m.vocab_size == spec["vocab_size"] == 300
    assert spec["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    tok = m.tokenizer()
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    m.verify()
    for name, docs in source_documents(corpus).items():
        text = b"".join(tok.decode_bytes(m.shard(name, s).tokens) for s in ("train", "val"))
        assert text == b"".join(docs)
        assert m.bytes_per_token(name, "train") > 1.2, "BPE must merge bytes"


def test_smallest_dtype_for_bpe_vocab(corpus, tmp_path):
    """uint8 for a byte-level vocab is impossible (260 ids); a BPE vocab above 256 needs uint16 too."""
    prepare({"prose": corpus["prose"]}, tmp_path / "o", tokenizer="bpe", vocab_size=270, val_fraction=0.2, seq_len=16)
    assert TokenShard(tmp_path / "o" / "prose.train.arrow").dtype == np.uint16


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, the stderr lines main printed, log lines left out)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if line.startswith("error")]


SMALL = ["--val-fraction", "0.2", "--seq-len", "16"]  # lets the tiny test corpus pass the size check

BAD_INPUTS = {  # case: (argv without --out, text the error line must hold, more text it must hold)
    "missing path": (lambda c, t: ["--domain", f"gone={t}/nope.txt", *SMALL], "domain gone: path not found", "nope.txt"),
    "empty file": (lambda c, t: ["--domain", f"blank={t}/blank.txt", *SMALL], "domain blank: no text", "blank.txt"),
    "no matching files": (lambda c, t: ["--domain", f"code={c['code']}", "--glob", "*.rs", *SMALL], "domain code: no files", "*.rs"),
    "duplicate names": (lambda c, t: ["--domain", f"x={c['prose']}", "--domain", f"x={c['code']}", *SMALL], "duplicate domain name 'x'", ""),
    "too small for val": (lambda c, t: ["--domain", f"prose={c['prose']}", "--seq-len", "4096"], "domain prose: the val split has", "4097"),
    "parquet column": (lambda c, t: ["--domain", f"rows={c['rows']}", "--text-column", "nope", *SMALL], "domain rows:", "no column 'nope'"),
    "parquet default column": (lambda c, t: ["--domain", f"rows={c['rows']}", *SMALL], "domain rows:", "no column 'text'"),
    "not NAME=PATH": (lambda c, t: ["--domain", "justaname"], "--domain 'justaname'", "NAME=PATH"),
    "bad name": (lambda c, t: ["--domain", f"a/b={c['prose']}"], "domain name 'a/b'", ""),
    "bad fraction": (lambda c, t: ["--domain", f"prose={c['prose']}", "--val-fraction", "1.5"], "--val-fraction", "1.5"),
    "unknown flag": (lambda c, t: ["--domain", f"prose={c['prose']}", "--nope"], "--nope", ""),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, corpus, tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("")
    args, expected, also = BAD_INPUTS[case]
    out = tmp_path / "out"
    rc, errors = run_main(args(corpus, tmp_path) + ["--out", str(out)], capsys)
    assert rc == 2
    assert len(errors) == 1, f"expected one error line, got {errors}"
    assert expected in errors[0] and also in errors[0], errors[0]
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*")), "a failed prepare must leave nothing behind"


def test_unwritable_out(corpus, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, errors = run_main(["--domain", f"prose={corpus['prose']}", "--seq-len", "16", "--out", str(blocker / "out")], capsys)
    assert rc == 2 and len(errors) == 1 and "--out" in errors[0] and str(blocker) in errors[0]


def test_existing_out_needs_force(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--domain", f"prose={corpus['prose']}", "--seq-len", "16", "--out", str(out)]
    rc, errors = run_main(args, capsys)
    assert rc == 2 and "exists and is not empty" in errors[0] and (out / "keep.txt").exists()
    assert main(args + ["--force"]) == 0
    assert load_manifest(out).domains == ["prose"] and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_interrupted_prepare_leaves_no_output(tmp_path):
    def documents():
        yield b"first document\n" * 100
        raise KeyboardInterrupt

    source = DomainSource("boom", "test", documents, lambda: [1500, 1500])
    with pytest.raises(KeyboardInterrupt):
        prepare_sources([source], tmp_path / "out", seq_len=8)
    assert list(tmp_path.iterdir()) == [], "neither the output nor its temp folder may remain"


def test_cli_subprocess_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare", "--domain", f"x={tmp_path}/missing", "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: domain x: path not found: {tmp_path}/missing"], proc.stderr


def test_builtin_corpus_is_deterministic_and_varied():
    a, b = builtin_corpus(), builtin_corpus()
    assert list(a) == [d.name for d in BUILTIN_DOMAINS] and len(a) >= 4
    assert a == b
    hist = {}
    for name, docs in a.items():
        size = sum(map(len, docs))
        assert 300_000 <= size <= DOMAIN_CAP, f"{name}: {size} bytes"
        counts = np.bincount(np.frombuffer(b"".join(docs), dtype=np.uint8), minlength=256)
        hist[name] = counts / counts.sum()
    names = list(hist)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            tv = 0.5 * np.abs(hist[x] - hist[y]).sum()
            assert tv > 0.1, f"domains {x} and {y} have nearly the same byte distribution (TV {tv:.3f})"


def test_ensure_builtin_prepares_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LEVIATHAN_HOME", str(tmp_path))
    path = ensure_builtin("byte")
    assert path == builtin_data_dir("byte") / "manifest.json" == tmp_path / "data" / "builtin-byte" / "manifest.json"
    m = load_manifest(path)
    assert m.domains == ["python", "docs", "codecs", "unicode"]
    for d in m.domains:
        assert m.tokens(d, "val") >= 10_000 and m.tokens(d, "train") >= 200_000
    stamp = path.stat().st_mtime_ns
    assert ensure_builtin("byte") == path and path.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_ensure_builtin_survives_a_race(tmp_path):
    env = {**os.environ, "LEVIATHAN_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    code = "from jobs.prepare import ensure_builtin; print(ensure_builtin('byte'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in results}
    assert paths == {str(tmp_path / "data" / "builtin-byte" / "manifest.json")}
    load_manifest(paths.pop()).verify()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["builtin-byte"], "losers must clean up"


def test_cli_defaults_to_builtin_and_reuses_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEVIATHAN_HOME", str(tmp_path))
    assert main([]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "data" / "builtin-byte" / "manifest.json" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert main(["--builtin"]) == 0 and Path(capsys.readouterr().out.strip()) == path
    assert path.stat().st_mtime_ns == stamp, "an existing built-in corpus is reused"
    assert main(["--builtin", "--force"]) == 0
    assert path.stat().st_mtime_ns != stamp
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["builtin-byte"]


# ----------------------------------------------------------------------------- data on shared storage


@pytest.fixture()
def remote_manifest(corpus, s3_bucket, tmp_path, monkeypatch, capsys) -> str:
    """The corpus prepared with `--out s3://...` (BPE, so the tokenizer file travels too);
    staging goes to a temp folder."""
    monkeypatch.setenv("LEVIATHAN_STAGING_DIR", str(tmp_path / "staged"))
    out = f"{s3_bucket}/data/corpus"
    args = ["--out", out, "--tokenizer", "bpe", "--vocab-size", "300", "--seq-len", "16"]
    assert main([*(a for n in ("code", "prose") for a in ("--domain", f"{n}={corpus[n]}")), *args]) == 0
    assert capsys.readouterr().out.strip() == f"{out}/manifest.json"
    return out


def test_prepare_to_a_uri_uploads_shards_that_workers_stage_and_map(remote_manifest, s3_server, tmp_path):
    m = load_manifest(remote_manifest)
    assert m.source == remote_manifest and m.domains == ["code", "prose"]
    assert m.root.parent == tmp_path / "staged" and not m.root.exists(), "nothing is staged before it is used"

    shard = m.shard("code", "train")  # staged, verified, memory-mapped
    staged = m.root / m.manifest.split("code", "train").file
    assert shard.path == staged and sorted(p.name for p in m.root.iterdir()) == [staged.name]
    assert hashlib.sha256(staged.read_bytes()).hexdigest() == m.manifest.split("code", "train").sha256
    assert isinstance(shard._mmap, pa.MemoryMappedFile) and not shard.tokens.flags.owndata

    # Staged once: with the remote copy gone, the node still opens its verified copy.
    s3_server.filesystem().delete_file(f"{remote_manifest}/{staged.name}".removeprefix("s3://"))
    assert np.array_equal(m.shard("code", "train").tokens, shard.tokens)
    assert m.tokenizer().vocab_size == m.vocab_size  # the BPE file is staged as well


def test_a_corrupt_remote_shard_is_refused_and_never_staged(remote_manifest, s3_server):
    m = load_manifest(remote_manifest)
    name = m.manifest.split("prose", "val").file
    key = f"{remote_manifest}/{name}".removeprefix("s3://")
    fs = s3_server.filesystem()
    with fs.open_input_stream(key) as f:
        data = bytearray(f.read())
    data[-1] ^= 0xFF
    with fs.open_output_stream(key) as f:
        f.write(bytes(data))
    with pytest.raises(DataError, match="sha256 mismatch"):
        m.shard("prose", "val")
    assert not m.root.exists() or not any(m.root.iterdir()), "a bad download leaves nothing behind"


def test_prepare_to_a_uri_refuses_a_non_empty_folder_and_missing_files_are_named(remote_manifest, corpus, capsys,
                                                                                   s3_server):
    assert main(["--domain", f"prose={corpus['prose']}", "--out", remote_manifest, "--seq-len", "16"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    m = load_manifest(remote_manifest)
    name = m.manifest.split("code", "val").file
    s3_server.filesystem().delete_file(f"{remote_manifest}/{name}".removeprefix("s3://"))
    with pytest.raises(DataError, match=f"missing file {remote_manifest}/{name}"):
        load_manifest(remote_manifest)
    with pytest.raises(DataError, match="no manifest at"):
        load_manifest(f"{remote_manifest}/absent")
