"""Prepare token shards with Ray Data: jobs.prepare's shards, tokenised in parallel.

    leviathan prepare --ray --domain law=corpus/law --domain news=news.parquet --tokenizer bpe --out data/big
    ray job submit --working-dir . -- python -m jobs.prepare_ray --domain ... --out /shared/data

The same inputs (a text file, a folder, or a Parquet text column per domain,
or `--builtin`), splits and output as `jobs.prepare` (its checks, writers and
manifest are reused); only the tokenising moves into Ray:

- Ray Data reads the documents (`read_binary_files`; Parquet row groups in
  tasks, so each row keeps its index) and
  `map_batches` runs them through a pool of actors (`--actors`, default one per
  CPU of the cluster but one, left to the reads), each holding the tokenizer,
  loaded once per actor.
  Every actor cuts its documents into the train and val pieces from the
  domain's val cut, which the driver computed from the documents' sizes
  alone (file sizes, Parquet column lengths).
- Ray Data keeps the documents' order (`preserve_order`); the driver writes
  the returned token ids in that order, so the shards are byte-identical to
  `jobs.prepare`'s given the same tokenizer file (`--tokenizer-file`).
- BPE without `--tokenizer-file` trains on a bounded sample, the first
  `--bpe-sample-bytes` of train text spread evenly over the domains, and
  then encodes everything in parallel.

Under `ray job submit` (RAY_ADDRESS set) it joins that cluster; otherwise it
starts a local Ray. The driver reads the documents' sizes and the BPE sample
only, receives token ids and writes the shards: `--out` is a folder on the driver.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from jobs.prepare import (
    DEFAULT_TEXT_COLUMN,
    PARQUET_SUFFIXES,
    DomainSource,
    PrepareError,
    bpe_ids,
    byte_ids,
    folder_files,
    parse_domains,
    base_parser,
    SplitWriter,
    builtin_data_dir,
    builtin_sources,
    file_source,
    prepare_sources,
    run_prepare_cli,
    split_documents,
)
from leviathan.data.corpus import BUILTIN_DOMAINS
from leviathan.data.tokenizer import BPETokenizer, TokenizerError

log = logging.getLogger("leviathan.prepare")

DEFAULT_BPE_SAMPLE_BYTES = 64 << 20
BATCH_DOCUMENTS = 64  # documents per map_batches call: small enough to spread a domain over the actors
MAX_READ_BLOCKS = 256


@dataclass
class RaySource(DomainSource):
    """A domain source that Ray Data can also read: `dataset()` yields rows with the
    document (`text`, bytes or str, null for a missing Parquet value) and its `index`
    in `documents()` order, or `bytes` and `path` for files (`paths` maps path -> index)."""

    dataset: Callable[[], Any] = None  # type: ignore[assignment]
    paths: dict[str, int] | None = None


def _blocks(rows: int) -> int:
    """Read blocks for `rows` documents: enough for every actor to get work, not one per tiny file."""
    return max(1, min(rows, MAX_READ_BLOCKS))


def _files_source(base: DomainSource, files: list[Path]) -> RaySource:
    import ray.data

    names = [str(f) for f in files]
    return RaySource(base.name, base.source, base.documents, base.sizes,
                     dataset=lambda: ray.data.read_binary_files(names, include_paths=True,
                                                                override_num_blocks=_blocks(len(names))),
                     paths={name: i for i, name in enumerate(names)})


def _read_row_groups(batch: dict[str, np.ndarray], path: str, column: str) -> dict[str, np.ndarray]:
    """Ray Data task: Parquet row groups -> rows (index in the file, text or null)."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    index, text = [], []
    for group, first in zip(batch["group"], batch["first"]):
        values = file.read_row_group(int(group), columns=[column]).column(0).to_pylist()
        index.append(np.arange(first, first + len(values), dtype=np.int64))
        text.extend(values)
    return {"index": np.concatenate(index), "text": np.array(text, dtype=object)}


def _parquet_source(base: DomainSource, path: Path, column: str) -> RaySource:
    """Read by row group, so every row keeps its index in the file. A null is an empty
    document here (jobs.prepare drops it): the same cut, the same pieces."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray.data

    def sizes() -> list[int]:
        out: list[int] = []
        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=4096):
            out.extend(pc.fill_null(pc.binary_length(batch.column(0)), 0).to_numpy(zero_copy_only=False).tolist())
        return out

    def documents() -> Iterator[bytes]:
        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=4096):
            for value in batch.column(0).to_pylist():
                yield b"" if value is None else value.encode("utf-8") if isinstance(value, str) else value

    def dataset() -> Any:
        meta = pq.ParquetFile(path).metadata
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        firsts = np.cumsum([0] + rows[:-1]).tolist()
        groups = ray.data.from_items([{"group": g, "first": f} for g, f in enumerate(firsts)],
                                     override_num_blocks=_blocks(len(rows)))
        return groups.map_batches(_read_row_groups, fn_kwargs={"path": str(path), "column": column},
                                  batch_size=1, batch_format="numpy")

    return RaySource(base.name, base.source, documents, sizes, dataset=dataset)


def ray_source(name: str, path: str | os.PathLike, glob: str | None = None, text_column: str | None = None) -> RaySource:
    """`jobs.prepare.file_source` (same checks and description), readable by Ray Data."""
    base = file_source(name, path, glob, text_column)
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        return _files_source(base, folder_files(p, glob))
    if p.suffix.lower() in PARQUET_SUFFIXES:
        return _parquet_source(base, p, text_column or DEFAULT_TEXT_COLUMN)
    return _files_source(base, [p])


def builtin_ray_sources() -> list[RaySource]:
    """The built-in corpus, held by the driver, as Ray Data rows."""
    import ray.data

    out = []
    for s in builtin_sources():
        docs = list(s.documents())
        out.append(RaySource(s.name, s.source, s.documents, s.sizes, dataset=lambda docs=docs: ray.data.from_items(
            [{"index": i, "text": doc} for i, doc in enumerate(docs)], override_num_blocks=_blocks(len(docs)))))
    return out


# ---------------------------------------------------------------- the actors


class Encoder:
    """A Ray Data actor: tokenises batches of one domain's documents.

    Holds the tokenizer (unpickled once, when the actor starts) and the domain's
    val cut (document index, byte offset). Returns, per batch, one row per
    split present: the token ids (each piece's ids then eos, as jobs.prepare
    writes them) as raw bytes of `dtype`, with the source bytes and documents
    they cover and the index of the batch's first document.
    """

    def __init__(self, tokenizer: Any, cut: tuple[int, int], dtype: str, paths: dict[str, int] | None = None):
        self.tokenizer = tokenizer
        self.cut = cut
        self.dtype = np.dtype(dtype)
        self.paths = paths

    def _documents(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[int, bytes]]:
        if self.paths is not None:
            for path, data in zip(batch["path"], batch["bytes"]):
                yield self.paths[str(path)], bytes(data)
            return
        for index, text in zip(batch["index"], batch["text"]):
            if text is None:
                text = b""
            yield int(index), text.encode("utf-8") if isinstance(text, str) else bytes(text)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        cut_index, cut_offset = self.cut
        pieces: dict[str, list[bytes]] = {"train": [], "val": []}
        first = None
        for index, doc in self._documents(batch):
            first = index if first is None else min(first, index)
            # The cut relative to this one document: before it, at it, or after it.
            for split, piece in split_documents([doc], (cut_index - index, cut_offset)):
                pieces[split].append(piece)
        out: dict[str, list] = {"first": [], "split": [], "ids": [], "bytes": [], "documents": []}
        for split, docs in pieces.items():
            if not docs:
                continue
            if self.tokenizer.kind == "byte":
                ids = byte_ids(docs, self.tokenizer.eos_id, self.dtype)
            else:
                ids = bpe_ids(self.tokenizer, docs, self.dtype)
            out["first"].append(first)
            out["split"].append(split)
            out["ids"].append(ids.tobytes())
            out["bytes"].append(sum(len(d) for d in docs))
            out["documents"].append(len(docs))
        return out


def encode_domain(source: RaySource, cut: tuple[int, int], tokenizer: Any, folder: Path, dtype: np.dtype,
                  *, actors: int, batch_documents: int = BATCH_DOCUMENTS) -> dict[str, dict]:
    """jobs.prepare's per-domain encoder, on Ray Data: shards written by the driver in document order."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    encoded = source.dataset().map_batches(
        Encoder,
        fn_constructor_kwargs={"tokenizer": tokenizer, "cut": cut, "dtype": dtype.name, "paths": source.paths},
        batch_size=batch_documents,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=1,
        # One actor per CPU: the tokenizers library's own thread pool would only oversubscribe it.
        runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}},
    )
    writers = {s: SplitWriter(folder, source.name, s, dtype) for s in ("train", "val")}
    last = -1
    for row in encoded.iter_rows():
        if row["first"] < last:
            raise RuntimeError(f"domain {source.name}: Ray Data returned documents out of order")
        last = row["first"]
        writers[row["split"]].write(np.frombuffer(row["ids"], dtype=dtype), int(row["bytes"]), int(row["documents"]))
    return {s: w.finish() for s, w in writers.items()}


# ---------------------------------------------------------------- prepare


def prepare_ray(
    sources: list[RaySource],
    out: str | os.PathLike,
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    seq_len: int = 256,
    force: bool = False,
    *,
    tokenizer_file: str | os.PathLike | None = None,
    bpe_sample_bytes: int = DEFAULT_BPE_SAMPLE_BYTES,
    actors: int | None = None,
    batch_documents: int = BATCH_DOCUMENTS,
) -> Path:
    """Tokenize `sources` into `out` on Ray; returns the manifest path. See the module docstring."""
    import ray

    from cluster.session import init_ray

    if tokenizer_file is not None and tokenizer != "bpe":
        raise PrepareError("--tokenizer-file: needs --tokenizer bpe")
    if actors is not None and actors < 1:
        raise PrepareError(f"--actors {actors}: must be >= 1")
    trained = None
    if tokenizer_file is not None:
        try:
            trained = BPETokenizer.from_file(tokenizer_file)
        except TokenizerError as e:
            raise PrepareError(f"--tokenizer-file: {e}") from None
    init_ray()
    # A fixed pool that held every CPU would leave none for the read tasks feeding it.
    pool = actors or max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
    log.info("tokenising on Ray Data with %d actors", pool)
    return prepare_sources(
        sources, out, tokenizer, vocab_size, val_fraction, seq_len, force, trained=trained,
        encode_domain=partial(encode_domain, actors=pool, batch_documents=batch_documents),
        bpe_sample_bytes=bpe_sample_bytes,
    )


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = base_parser()
    p.prog = "leviathan prepare --ray"
    p.description = "Tokenize text per domain into token shards, in parallel with Ray Data."
    p.add_argument("--tokenizer-file", default=None,
                   help="a trained BPE tokenizer.json to use (with --tokenizer bpe) instead of training one")
    p.set_defaults(bpe_sample_bytes=DEFAULT_BPE_SAMPLE_BYTES)
    p.add_argument("--actors", type=int, default=None,
                   help="tokenizer actors (default: one per CPU of the cluster but one, left to the reads)")
    return p


def _prepare_from_args(argv: list[str] | None) -> Path:
    """The manifest path `prepare --ray` writes for command-line `argv`."""
    args = build_parser().parse_args(argv)
    pairs = parse_domains(args.domain, args.glob)
    use_builtin = args.builtin or not pairs
    if args.out is None and pairs:
        raise PrepareError("--out is required with --domain")
    names = [n for n, *_ in pairs] + ([d.name for d in BUILTIN_DOMAINS] if use_builtin else [])
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PrepareError(f"duplicate domain name {dupes[0]!r}")
    sources = [ray_source(n, p, glob, args.text_column) for n, p, glob in pairs]
    if use_builtin:
        sources += builtin_ray_sources()
    out = Path(args.out) if args.out else builtin_data_dir(args.tokenizer)
    return prepare_ray(
        sources, out, args.tokenizer, args.vocab_size, args.val_fraction, args.seq_len, args.force,
        tokenizer_file=args.tokenizer_file, bpe_sample_bytes=args.bpe_sample_bytes, actors=args.actors,
    )


def main(argv: list[str] | None = None) -> int:
    return run_prepare_cli(lambda: _prepare_from_args(argv))


if __name__ == "__main__":
    sys.exit(main())
