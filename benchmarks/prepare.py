"""Throughput of `jobs.prepare` on the built-in corpus: byte vs BPE, MB/s of source text.

    python benchmarks/prepare.py [--rounds 3] [--vocab-size 4096] [--out result.json]

Each round runs, interleaved so machine load hits both alike, the whole
prepare of the built-in corpus into a fresh temp folder (collecting the
documents from the standard library, splitting, tokenizing, writing the Arrow
shards, sha256, manifest, rename) once with the byte tokenizer and once with
BPE. `byte_collected` is the byte prepare of documents already collected in
memory (splitting, tokenizing, writing, hashing only). For BPE the two phases are also timed apart: training the tokenizer on
the train splits (wall time), and encoding with the trained tokenizer in
process CPU time, so the figure is per core whatever else the machine runs
(`encode_arrays`, which remembers every distinct word's ids, beside
`tokenizers`' own `encode_batch` on the same batches, ids as arrays in both). MB/s = source bytes /
seconds (1 MB = 1e6 bytes), medians over rounds; the goals: byte >= 20 MB/s,
BPE encoding >= 5 MB per CPU second (what each `prepare --ray` actor does).

JSON goes to stdout (and --out); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.prepare import BPE_CHUNK, _text_pieces, builtin_sources, prepare_sources, split_documents, _val_cut  # noqa: E402
from leviathan.data.corpus import corpus_version  # noqa: E402
from benchmarks.common import emit_report, machine_info  # noqa: E402
from leviathan.data.tokenizer import BPETokenizer  # noqa: E402

BYTE_GOAL_MB_S = 20.0
BPE_ENCODE_GOAL_MB_PER_CPU_S = 5.0


def machine() -> dict:
    import numpy
    import pyarrow
    import tokenizers

    return machine_info(
        processor=platform.processor() or platform.machine(),
        load_avg_1m=os.getloadavg()[0],
        numpy=numpy.__version__,
        pyarrow=pyarrow.__version__,
        tokenizers=tokenizers.__version__,
        corpus=corpus_version(),
    )


def timed_prepare(tokenizer: str, vocab_size: int, sources: list | None = None) -> float:
    """Seconds for one whole prepare; with `sources` given, minus collecting the corpus."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        prepare_sources(sources or builtin_sources(), Path(tmp) / "out", tokenizer=tokenizer, vocab_size=vocab_size)
        return time.perf_counter() - t0


def bpe_phases(vocab_size: int) -> dict[str, float]:
    """Training and encoding of the BPE tokenizer on the built-in corpus, timed apart.

    Training: wall seconds on the train splits. Encoding: process CPU seconds
    (every thread of the process) of `encode_arrays` over the whole corpus in
    batches of BPE_CHUNK bytes, as jobs.prepare and jobs.prepare_ray call it,
    with an empty word cache, then again with every word known; and the same
    batches through `tokenizers` alone.
    """
    sources = builtin_sources()
    train: list[str] = []
    batches: list[list[str]] = [[]]
    size = 0
    for s in sources:
        for split, piece in split_documents(s.documents(), _val_cut(s.sizes(), 0.05)):
            texts = _text_pieces(piece)
            if split == "train":
                train += texts
            batches[-1] += texts
            size += len(piece)
            if size >= BPE_CHUNK:
                batches.append([])
                size = 0
    t0 = time.perf_counter()
    tok = BPETokenizer.train(iter(train), vocab_size=vocab_size)
    train_s = time.perf_counter() - t0
    fresh = pickle.loads(pickle.dumps(tok))  # no remembered words
    c0 = time.process_time()
    for batch in batches:
        fresh.encode_arrays(batch)
    encode_cpu_s = time.process_time() - c0
    c0 = time.process_time()
    for batch in batches:  # again, every word known: the steady state of an actor deep into a large corpus
        fresh.encode_arrays(batch)
    warm_cpu_s = time.process_time() - c0
    c0 = time.process_time()
    for batch in batches:
        [np.asarray(ids, dtype=np.uint32) for ids in tok._encode_with_tokenizers(batch)]
    tokenizers_cpu_s = time.process_time() - c0
    return {"bpe_train": train_s, "bpe_encode_cpu": encode_cpu_s, "bpe_encode_warm_cpu": warm_cpu_s,
            "bpe_encode_tokenizers_cpu": tokenizers_cpu_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.getLogger("leviathan.prepare").setLevel(logging.WARNING)

    nbytes = sum(sum(s.sizes()) for s in builtin_sources())
    collected = builtin_sources()
    times: dict[str, list[float]] = {"byte": [], "byte_collected": [], "bpe": [], "bpe_train": [], "bpe_encode_cpu": [],
                                     "bpe_encode_warm_cpu": [], "bpe_encode_tokenizers_cpu": []}
    timed_prepare("byte", args.vocab_size)  # warm the page cache and lazy imports
    for r in range(args.rounds):
        times["byte"].append(timed_prepare("byte", args.vocab_size))
        times["byte_collected"].append(timed_prepare("byte", args.vocab_size, collected))
        times["bpe"].append(timed_prepare("bpe", args.vocab_size))
        for name, seconds in bpe_phases(args.vocab_size).items():
            times[name].append(seconds)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), file=sys.stderr)

    median = {k: statistics.median(v) for k, v in times.items()}
    mb_s = {k: nbytes / 1e6 / v for k, v in median.items()}
    result = {
        "benchmark": "prepare",
        "machine": machine(),
        "corpus_bytes": nbytes,
        "domains": [s.name for s in builtin_sources()],
        "vocab_size": args.vocab_size,
        "rounds": args.rounds,
        "seconds": times,
        "median_s": median,
        "mb_per_s": mb_s,
        "ratio_byte_over_bpe": mb_s["byte"] / mb_s["bpe"],
        "byte_goal_mb_per_s": BYTE_GOAL_MB_S,
        "byte_goal_met": mb_s["byte"] >= BYTE_GOAL_MB_S,
        "bpe_encode_mb_per_cpu_s": mb_s["bpe_encode_cpu"],
        "bpe_encode_warm_mb_per_cpu_s": mb_s["bpe_encode_warm_cpu"],
        "bpe_encode_tokenizers_mb_per_cpu_s": mb_s["bpe_encode_tokenizers_cpu"],
        "bpe_encode_speedup_over_tokenizers": mb_s["bpe_encode_cpu"] / mb_s["bpe_encode_tokenizers_cpu"],
        "bpe_encode_goal_mb_per_cpu_s": BPE_ENCODE_GOAL_MB_PER_CPU_S,
        "bpe_encode_goal_met": mb_s["bpe_encode_cpu"] >= BPE_ENCODE_GOAL_MB_PER_CPU_S,
    }
    return emit_report(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
