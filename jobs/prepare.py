"""Prepare token shards: text per domain -> Arrow IPC token files + manifest.json.

    python -m jobs.prepare --builtin --tokenizer byte
    python -m jobs.prepare --domain law=corpus/law --domain code=src --glob '*.py' \\
        --tokenizer bpe --vocab-size 8192 --out data/mine
    python -m jobs.prepare --domain news=news.parquet --text-column body --out data/news

Each domain is one source: a text file (one document), a folder read
recursively (one document per file, sorted relative paths; hidden files and
folders skipped; `--glob` filters file names at any depth), or a Parquet file
(one document per non-null row of `--text-column`, default "text").

Per domain the documents form one byte stream; its last `val_fraction` of bytes
is the val split, the rest train. The cut is moved forward to the next line
start (or, failing that within 4 KiB, the next UTF-8 character start), so a
single-file domain still gets both splits and no character is cut in two.
Every document (or the piece of one on either side of the cut) is tokenized
and followed by the tokenizer's eos id. A split's `bytes` counts the source
bytes its tokens encode, so bits per byte = loss / ln 2 * tokens / bytes.

Output (`--out`): `<domain>.train.arrow`, `<domain>.val.arrow` (one `tokens`
column of the smallest unsigned type that fits the vocabulary),
`manifest.json` (format in DESIGN section 6) and, for BPE, `tokenizer.json`
(trained on the train split of all domains; the byte tokenizer has nothing to
store, its manifest entry describes it completely, so its `file` is null). Everything is written to
`<out>.tmp-<random>` and renamed onto `<out>` at the end, so an interrupted run
never leaves a folder that looks complete; tokens are spilled to disk as they
are produced, so memory use is bounded by the largest document, not the corpus.

Bad input (missing path, a domain without text, duplicate domain names, a
split shorter than `--seq-len` + 1 tokens, a Parquet file without the column,
an unwritable or non-empty `--out`) is a `PrepareError`; `main` prints it as one
line and returns 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.spec import default_home
from leviathan.data.corpus import BUILTIN_DOMAINS, capped, corpus_version
from leviathan.data.shards import DataError, sha256_file, token_dtype, write_shard
from leviathan.data.staging import load_manifest
from leviathan.run.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest
from leviathan.run import storage
from leviathan.data.tokenizer import BPETokenizer, ByteTokenizer

log = logging.getLogger("leviathan.prepare")

DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
PARQUET_SUFFIXES = (".parquet", ".pq")
DEFAULT_TEXT_COLUMN = "text"
SNAP_WINDOW = 4096  # how far past the val cut to look for a line start
BYTE_CHUNK = 16 << 20  # bytes of documents per byte-tokenizer batch
BPE_CHUNK = 4 << 20  # bytes of documents per BPE encode_batch call
BPE_PIECE = 64 << 10  # long documents are encoded in pieces of about this size (split at newlines)
PROGRESS_EVERY = 256 << 20  # log progress every this many source bytes of a domain


class PrepareError(ValueError):
    """Input or output that prepare cannot use; a one-line message naming the domain or path."""


class OutputExistsError(PrepareError):
    """`--out` already holds prepared data (or another process finished first)."""


@dataclass
class DomainSource:
    """A named source of documents. `documents()` and `sizes()` may be called more than once."""

    name: str
    source: str  # a human-readable description, stored in the manifest
    documents: Callable[[], Iterator[bytes]]
    sizes: Callable[[], list[int]]  # byte length of every document documents() yields, in order


# ---------------------------------------------------------------- sources


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise PrepareError(f"domain {name}: cannot read {path}: {e.strerror or e}") from None


def folder_files(root: Path, glob: str | None) -> list[Path]:
    files = []
    for p in root.rglob(glob or "*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _parquet_source(name: str, path: Path, text_column: str | None) -> DomainSource:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    column = text_column or DEFAULT_TEXT_COLUMN
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (pa.ArrowInvalid, OSError) as e:
        raise PrepareError(f"domain {name}: {path} is not a readable Parquet file ({e})") from None
    if column not in schema.names:
        raise PrepareError(f"domain {name}: {path} has no column {column!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise PrepareError(f"domain {name}: column {column!r} of {path} is {kind}, not text")

    def batches() -> Iterator[Any]:
        try:
            for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=4096):
                yield batch.column(0).drop_null()
        except (pa.ArrowInvalid, OSError) as e:
            raise PrepareError(f"domain {name}: cannot read {path} ({e})") from None

    def documents() -> Iterator[bytes]:
        for col in batches():
            for value in col.to_pylist():
                yield value.encode("utf-8") if isinstance(value, str) else value

    def sizes() -> list[int]:
        out: list[int] = []
        for col in batches():
            out.extend(pc.binary_length(col).to_numpy(zero_copy_only=False).tolist())
        return out

    return DomainSource(name, f"parquet:{path}#{column}", documents, sizes)


def file_source(name: str, path: str | os.PathLike, glob: str | None = None, text_column: str | None = None) -> DomainSource:
    """A domain from a text file, a folder (recursive, optional glob) or a Parquet file."""
    if not DOMAIN_NAME.match(name):
        raise PrepareError(f"domain name {name!r}: use 1-64 letters, digits, '_' or '-' (starting with a letter or digit)")
    p = Path(path).expanduser()
    if not p.exists():
        raise PrepareError(f"domain {name}: path not found: {p}")
    p = p.resolve()
    if p.is_dir():
        files = folder_files(p, glob)
        if not files:
            what = f" matching {glob!r}" if glob else ""
            raise PrepareError(f"domain {name}: no files{what} in {p}")
        return DomainSource(
            name,
            f"folder:{p}" + (f" ({glob})" if glob else ""),
            lambda: (_read(name, f) for f in files),
            lambda: [f.stat().st_size for f in files],
        )
    if p.suffix.lower() in PARQUET_SUFFIXES:
        return _parquet_source(name, p, text_column)
    if not p.is_file():
        raise PrepareError(f"domain {name}: not a file or folder: {p}")
    return DomainSource(name, f"file:{p}", lambda: iter([_read(name, p)]), lambda: [p.stat().st_size])


def builtin_sources() -> list[DomainSource]:
    """The built-in corpus (leviathan.data.corpus) as prepare sources."""
    out = []
    for d in BUILTIN_DOMAINS:
        docs = list(capped(d.documents()))
        out.append(DomainSource(d.name, f"builtin:{d.name} - {d.description} ({corpus_version()})",
                                lambda docs=docs: iter(docs), lambda docs=docs: [len(x) for x in docs]))
    return out


# ---------------------------------------------------------------- splitting


def _val_cut(sizes: list[int], val_fraction: float) -> tuple[int, int]:
    """(document index, byte offset) where the val split starts, before snapping."""
    total = sum(sizes)
    cut = total - max(1, round(total * val_fraction))
    start = 0
    for i, size in enumerate(sizes):
        if cut < start + size:
            return i, cut - start
        start += size
    return len(sizes) - 1, sizes[-1]  # unreachable for total > 0


def _snap(doc: bytes, offset: int) -> int:
    """Move a cut forward to the next line start, else the next UTF-8 character start."""
    offset = min(offset, len(doc))
    if offset == 0 or doc[offset - 1] == 0x0A:
        return offset
    newline = doc.find(b"\n", offset, offset + SNAP_WINDOW)
    if newline >= 0:
        return newline + 1
    while offset < len(doc) and doc[offset] & 0xC0 == 0x80:
        offset += 1
    return offset


def split_documents(documents: Iterable[bytes], cut: tuple[int, int]) -> Iterator[tuple[str, bytes]]:
    """("train" | "val", piece) for every non-empty document or piece, train first."""
    index, offset = cut
    for i, doc in enumerate(documents):
        if i < index:
            pieces = (("train", doc),)
        elif i > index:
            pieces = (("val", doc),)
        else:
            o = _snap(doc, offset)
            pieces = (("train", doc[:o]), ("val", doc[o:]))
        for split, piece in pieces:
            if piece:
                yield split, piece


# ---------------------------------------------------------------- encoding


class SplitWriter:
    """Appends token ids to `<name>.<split>.bin`, then turns it into the Arrow shard."""

    def __init__(self, folder: Path, domain: str, split: str, dtype: np.dtype) -> None:
        self.file = f"{domain}.{split}.arrow"
        self.path = folder / self.file
        self.bin_path = folder / f"{domain}.{split}.bin"
        self.dtype = dtype
        self._f = open(self.bin_path, "wb")
        self.tokens = self.bytes = self.documents = 0

    def write(self, ids: np.ndarray, nbytes: int, ndocs: int) -> None:
        ids.astype(self.dtype, copy=False).tofile(self._f)
        self.tokens += len(ids)
        self.bytes += nbytes
        self.documents += ndocs

    def finish(self) -> dict[str, Any]:
        self._f.close()
        if self.tokens:
            tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        else:
            tokens = np.empty(0, dtype=self.dtype)
        write_shard(self.path, tokens)
        del tokens
        self.bin_path.unlink()
        return {"file": self.file, "tokens": self.tokens, "bytes": self.bytes,
                "documents": self.documents, "sha256": sha256_file(self.path)}


def byte_ids(pieces: list[bytes], eos: int, dtype: np.dtype) -> np.ndarray:
    """Documents -> one (sum(len) + len(pieces),) array: each document's bytes, then eos."""
    data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    ends = np.cumsum([len(p) for p in pieces])  # insertion points (before index = after document)
    return np.insert(data.astype(dtype), ends, eos)


def _text_pieces(doc: bytes) -> list[str]:
    """A document as text pieces of about BPE_PIECE bytes, split after newlines, for encode_batch."""
    text = doc.decode("utf-8", errors="replace")
    if len(doc) <= BPE_PIECE:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + BPE_PIECE // 2)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def bpe_ids(tokenizer: BPETokenizer, pieces: list[bytes], dtype: np.dtype) -> np.ndarray:
    texts, owner = [], []
    for i, doc in enumerate(pieces):
        parts = _text_pieces(doc)
        texts.extend(parts)
        owner.extend([i] * len(parts))
    encoded = tokenizer.encode_arrays(texts)
    out: list[np.ndarray] = []
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    for j, ids in enumerate(encoded):
        out.append(ids.astype(dtype, copy=False))
        if j + 1 == len(encoded) or owner[j + 1] != owner[j]:
            out.append(eos)
    return np.concatenate(out)


def _encode_domain(source: DomainSource, cut: tuple[int, int], tokenizer: Any, folder: Path, dtype: np.dtype) -> dict[str, dict]:
    writers = {s: SplitWriter(folder, source.name, s, dtype) for s in ("train", "val")}
    chunk = BYTE_CHUNK if tokenizer.kind == "byte" else BPE_CHUNK
    pending: list[bytes] = []
    pending_split, pending_bytes = "train", 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        if tokenizer.kind == "byte":
            ids = byte_ids(pending, tokenizer.eos_id, dtype)
        else:
            ids = bpe_ids(tokenizer, pending, dtype)
        writers[pending_split].write(ids, pending_bytes, len(pending))
        pending, pending_bytes = [], 0

    done, reported, t0 = 0, 0, time.perf_counter()
    for split, piece in split_documents(source.documents(), cut):
        if split != pending_split:
            flush()
            pending_split = split
        pending.append(piece)
        pending_bytes += len(piece)
        done += len(piece)
        if pending_bytes >= chunk:
            flush()
        if done - reported >= PROGRESS_EVERY:
            reported = done
            log.info("domain %s: %.0f MB tokenized (%.1f MB/s)", source.name, done / 1e6,
                     done / 1e6 / max(time.perf_counter() - t0, 1e-9))
    flush()
    return {s: w.finish() for s, w in writers.items()}


# ---------------------------------------------------------------- prepare


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"--out {out} exists and is not empty (use --force to replace it)")


def _make_tmp(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
        return tmp
    except OSError as e:
        raise PrepareError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished temp folder onto out; with force, replace what is there."""
    old = None
    if force and out.exists():
        old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)  # atomic; fails if out is a non-empty folder (another process won)
    except OSError as e:
        if old is not None:
            os.rename(old, out)
        if out.is_dir():
            raise OutputExistsError(f"--out {out} was created by another process while preparing") from None
        raise PrepareError(f"--out {out}: cannot rename the prepared folder into place ({e.strerror or e})") from None
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def prepare_sources(
    sources: list[DomainSource],
    out: str | os.PathLike,
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    seq_len: int = 256,
    force: bool = False,
    trained: Any = None,
    encode_domain: Callable[..., dict[str, dict]] | None = None,
    bpe_sample_bytes: int | None = None,
) -> Path:
    """Tokenize `sources` into `out`; returns the manifest path. See the module docstring.

    `bpe_sample_bytes`: BPE trains on the first bpe_sample_bytes / len(sources)
    bytes of every domain's train split (None: on all of it).
    `trained`: a tokenizer of kind `tokenizer` to use instead of training one.
    `encode_domain(source, cut, tokenizer, folder, dtype)`: writes a domain's
    two shards and returns their manifest entries (default: in this process;
    jobs.prepare_ray passes its Ray Data encoder).
    """
    out = Path(out).expanduser().absolute()
    if not sources:
        raise PrepareError("no domains given (use --domain NAME=PATH or --builtin)")
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PrepareError(f"duplicate domain name {dupes[0]!r}")
    if tokenizer not in ("byte", "bpe"):
        raise PrepareError(f"--tokenizer {tokenizer!r}: expected 'byte' or 'bpe'")
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction {val_fraction}: must be between 0 and 1 (exclusive)")
    if tokenizer == "bpe" and not 260 <= vocab_size <= 1 << 20:
        raise PrepareError(f"--vocab-size {vocab_size}: must be between 260 and {1 << 20}")
    if seq_len < 1:
        raise PrepareError(f"--seq-len {seq_len}: must be >= 1")
    if bpe_sample_bytes is not None and bpe_sample_bytes < 1:
        raise PrepareError(f"--bpe-sample-bytes {bpe_sample_bytes}: must be >= 1")
    _check_out(out, force)

    t0 = time.perf_counter()
    cuts: dict[str, tuple[int, int]] = {}
    documents: dict[str, int] = {}
    for s in sources:
        sizes = s.sizes()
        if sum(sizes) == 0:
            raise PrepareError(f"domain {s.name}: no text in {s.source}")
        cuts[s.name] = _val_cut(sizes, val_fraction)
        documents[s.name] = sum(1 for n in sizes if n)

    tmp = _make_tmp(out)
    try:
        if trained is not None:
            if trained.kind != tokenizer:
                raise PrepareError(f"--tokenizer {tokenizer}: the given tokenizer is {trained.kind}")
            tok: Any = trained
        elif tokenizer == "byte":
            tok = ByteTokenizer()
        else:
            share = None if bpe_sample_bytes is None else max(1, bpe_sample_bytes // len(sources))

            def train_texts() -> Iterator[str]:
                for s in sources:
                    left = share
                    for split, piece in split_documents(s.documents(), cuts[s.name]):
                        if split != "train" or left == 0:
                            break  # the train split comes first
                        if left is not None:
                            piece = piece[:left]
                            left -= len(piece)
                        yield from _text_pieces(piece)

            log.info("training BPE (vocab %d) on the train splits of %d domains%s", vocab_size, len(sources),
                     "" if share is None else f" (up to {share} bytes each)")
            tok = BPETokenizer.train(train_texts(), vocab_size=vocab_size)
            log.info("BPE trained: vocab %d (%.1fs)", tok.vocab_size, time.perf_counter() - t0)
        dtype = token_dtype(tok.vocab_size)

        domains = []
        total_bytes = 0
        for s in sources:
            t1 = time.perf_counter()
            splits = (encode_domain or _encode_domain)(s, cuts[s.name], tok, tmp, dtype)
            for split, entry in splits.items():
                if entry["tokens"] < seq_len + 1:
                    raise PrepareError(
                        f"domain {s.name}: the {split} split has {entry['tokens']} tokens, fewer than "
                        f"--seq-len + 1 = {seq_len + 1} (give it more text or a larger --val-fraction)"
                    )
            nbytes = splits["train"]["bytes"] + splits["val"]["bytes"]
            total_bytes += nbytes
            dt = time.perf_counter() - t1
            log.info("domain %s: %d bytes -> train %d / val %d tokens (%.1f MB/s)", s.name, nbytes,
                     splits["train"]["tokens"], splits["val"]["tokens"], nbytes / 1e6 / max(dt, 1e-9))
            domains.append({"name": s.name, "source": s.source, "documents": documents[s.name],
                            "bytes": nbytes, "splits": splits})

        spec = tok.spec()
        if spec.get("file"):
            tok.save(tmp)
            spec["sha256"] = sha256_file(tmp / spec["file"])
        manifest = Manifest.from_dict({
            "format_version": FORMAT_VERSION,
            "tokenizer": spec,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "val_fraction": val_fraction,
            "seq_len": seq_len,
            "domains": domains,
        })
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        _publish(tmp, out, force)
    except OSError as e:
        raise PrepareError(f"--out {out}: {e.strerror or e} ({e.filename or tmp})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    dt = time.perf_counter() - t0
    log.info("prepared %d domains, %.1f MB in %.2fs (%.1f MB/s) -> %s", len(domains), total_bytes / 1e6, dt,
             total_bytes / 1e6 / max(dt, 1e-9), out)
    return out / MANIFEST_FILE


def prepare_sources_to_uri(sources: list[DomainSource], out: str, *, force: bool = False, **options: Any) -> str:
    """`prepare_sources` into a pyarrow.fs URI (shared storage): prepared in a local
    temp folder, then uploaded, manifest.json last, so a manifest there always has
    its files. Returns the manifest's URI."""
    manifest_uri = storage.join(out, MANIFEST_FILE)
    try:
        if storage.list_dir(out) and not force:
            raise OutputExistsError(f"--out {out} exists and is not empty (use --force to replace it)")
        with tempfile.TemporaryDirectory(prefix="leviathan-prepare-") as tmp:
            local = prepare_sources(sources, Path(tmp) / "out", force=False, **options)
            manifest = local.read_bytes()
            local.unlink()
            storage.upload_dir(local.parent, out)
            storage.write_bytes(manifest_uri, manifest)
    except OSError as e:
        raise PrepareError(f"--out {out}: cannot upload the prepared data ({' '.join(str(e).split())})") from None
    return manifest_uri


def prepare(
    domains: dict[str, Path],
    out: str | os.PathLike,
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    glob: str | None = None,
    text_column: str | None = None,
    seq_len: int = 256,
    force: bool = False,
) -> Path:
    """Prepare user text, {domain name: file | folder | Parquet path}; returns the manifest path."""
    sources = [file_source(name, path, glob, text_column) for name, path in domains.items()]
    return prepare_sources(sources, out, tokenizer, vocab_size, val_fraction, seq_len, force)


def builtin_data_dir(tokenizer: str = "byte") -> Path:
    return default_home() / "data" / f"builtin-{tokenizer}"


def ensure_builtin(tokenizer: str = "byte") -> Path:
    """The built-in corpus's manifest path, preparing it on first use.

    Safe when several processes race: each prepares into its own temp folder
    and renames it into place; a loser discards its copy and uses the winner's.
    BPE uses the default vocabulary (4096).
    """
    out = builtin_data_dir(tokenizer)
    manifest = out / MANIFEST_FILE
    if not manifest.is_file():
        try:
            prepare_sources(builtin_sources(), out, tokenizer=tokenizer)
        except OutputExistsError:
            pass
    try:
        load_manifest(manifest)
    except DataError as e:
        raise PrepareError(f"built-in data at {out} is unusable ({e}); delete the folder to prepare it again") from None
    return manifest


# ---------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        raise PrepareError(message)


class _Once(argparse.Action):
    """An option that may be given once: a second value is an error, not a silent replacement."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        if getattr(namespace, self.dest) is not None:
            raise PrepareError(f"{option_string} given twice; give a pattern per domain with --domain NAME=PATH:GLOB")
        setattr(namespace, self.dest, values)


def base_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leviathan prepare", description="Tokenize text per domain into memory-mapped token shards.")
    p.add_argument("--domain", action="append", default=[], metavar="NAME=PATH[:GLOB]",
                   help="a domain from a text file, a folder (recursive; GLOB picks its files, at any depth) "
                        "or a Parquet file; repeatable. A path holding ':' ends with ':'")
    p.add_argument("--builtin", action="store_true",
                   help="the built-in corpus from this Python's standard library (the default without --domain)")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seq-len", type=int, default=256, help="every split must hold at least seq_len + 1 tokens")
    p.add_argument("--glob", default=None, action=_Once,
                   help="file-name pattern for folder domains without their own :GLOB (matched at any depth); once")
    p.add_argument("--text-column", default=None, help=f"Parquet text column (default {DEFAULT_TEXT_COLUMN!r})")
    p.add_argument("--out", default=None, help="output folder (default for --builtin: $LEVIATHAN_HOME/data/builtin-<tokenizer>)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--bpe-sample-bytes", type=int, default=None,
                   help="train BPE on at most this many bytes of train text, spread over the domains (default: all)")
    p.add_argument("--ray", action="store_true",
                   help="tokenise in parallel with Ray Data (jobs.prepare_ray; `--ray --help` lists its options)")
    return p


def parse_domains(values: list[str], default_glob: str | None = None) -> list[tuple[str, str, str | None]]:
    """`--domain NAME=PATH[:GLOB]` values as (name, path, glob); a domain without its own
    GLOB takes `default_glob` (`--glob`). The text after the last ':' is a GLOB when it
    holds no '/' (a pattern matches file names); a path holding ':' ends with ':'."""
    domains = []
    for v in values:
        name, sep, spec = v.partition("=")
        path, colon, glob = spec.rpartition(":")
        if not colon or "/" in glob:
            path, glob = spec, ""
        if not sep or not name or not path:
            raise PrepareError(f"--domain {v!r}: expected NAME=PATH or NAME=PATH:GLOB")
        domains.append((name, path, glob or default_glob))
    return domains


def _already_prepared(out: Path, tokenizer: str, vocab_size: int) -> bool:
    try:
        m = load_manifest(out)
    except DataError:
        return False
    return m.tokenizer_spec.get("kind") == tokenizer and (tokenizer == "byte" or m.vocab_size == vocab_size)


def run_prepare_cli(prepare: Callable[[], Path | str]) -> int:
    """Exit code of a prepare CLI (`prepare`, `prepare --ray`, `corpora.make_custom`), all ending alike.

    Logs progress with timestamps; a PrepareError is one `error:` line on stderr
    and exit code 2; else the manifest path `prepare()` returns goes to stdout,
    where scripts read it.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        manifest = prepare()
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


def _prepare_from_args(argv: list[str]) -> Path | str:
    """The manifest path `prepare` writes (or finds already prepared) for command-line `argv`."""
    args = base_parser().parse_args(argv)
    pairs = parse_domains(args.domain, args.glob)
    names = [n for n, _, _ in pairs]
    use_builtin = args.builtin or not pairs
    if use_builtin:
        names += [d.name for d in BUILTIN_DOMAINS]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PrepareError(f"duplicate domain name {dupes[0]!r}")
    if args.out is None and pairs:
        raise PrepareError("--out is required with --domain")
    builtin_out = builtin_data_dir(args.tokenizer)
    if args.out is None and not args.force and _already_prepared(builtin_out, args.tokenizer, args.vocab_size):
        log.info("the built-in corpus is already prepared at %s (--force prepares it again)", builtin_out)
        return builtin_out / MANIFEST_FILE
    sources = [file_source(n, p, glob, args.text_column) for n, p, glob in pairs]
    if use_builtin:
        sources += builtin_sources()
    options = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                   seq_len=args.seq_len, force=args.force, bpe_sample_bytes=args.bpe_sample_bytes)
    if args.out is not None and storage.is_uri(args.out):
        return prepare_sources_to_uri(sources, args.out, **options)
    return prepare_sources(sources, args.out or builtin_out, **options)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ray" in argv:  # jobs.prepare_ray builds on this module, so it is reached from above it
        print("prepare: --ray runs in jobs.prepare_ray: `python -m jobs.prepare_ray ...` or `leviathan prepare --ray ...`",
              file=sys.stderr)
        return 2
    return run_prepare_cli(lambda: _prepare_from_args(argv))


if __name__ == "__main__":
    sys.exit(main())
