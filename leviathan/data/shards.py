"""Token shards and batch samplers (the manifest: `leviathan.run.manifest`; staging: `leviathan.data.staging`).

A prepared data folder (written by `jobs.prepare`) holds one Arrow IPC file per
domain and split with a single column `tokens` of the smallest unsigned integer
type that fits the vocabulary, written as one record batch without nulls. Such
a column's data buffer is one contiguous array in the file, so `TokenShard`
memory-maps the file and exposes that buffer as a read-only numpy view: opening
a shard reads only the Arrow footer, and sampling a batch copies only the
B * (T + 1) tokens it returns. The kernel pages the file in on demand (those
pages count as file-backed RSS and can be dropped under memory pressure); no
anonymous copy of the shard is ever made, which is what `RssAnon` in
/proc/self/status measures and what the tests pin.

The dev split is the last `DEV_FRACTION` of every train shard (`dev_part`;
`train_part` is the rest): the samplers draw training windows from the train
part only, so dev windows (`dev_batches`) are never trained on and, being train
data, never scored as val. Recipe choices (merger settings, training settings)
are made on dev; val is scored once per run.

Samplers draw random windows of T + 1 tokens and return (x, y) int64 tensors of
shape (B, T) with y[:, t] = x[:, t + 1] shifted (the next-token targets). Their
randomness is one numpy `Generator(PCG64(seed))`, so `state_dict()` (the
generator state and the number of batches drawn) restores a sampler that
yields exactly the batches the original would have.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

TOKEN_COLUMN = "tokens"


class DataError(ValueError):
    """Prepared data that cannot be used; the message names the file or domain."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id below vocab_size."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32")


def write_shard(path: str | Path, tokens: np.ndarray) -> Path:
    """Write a 1-D array of unsigned token ids as a one-column, one-batch Arrow IPC file.

    `tokens` may be a `np.memmap`: Arrow wraps its buffer without copying, so a
    shard larger than RAM streams from the page cache to the file.
    """
    path = Path(path)
    tokens = np.ascontiguousarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind != "u":
        raise DataError(f"{path}: tokens must be a 1-D unsigned array, got {tokens.dtype} {tokens.shape}")
    arrow_type = pa.from_numpy_dtype(tokens.dtype)
    array = pa.Array.from_buffers(arrow_type, len(tokens), [None, pa.py_buffer(tokens)])
    batch = pa.record_batch([array], names=[TOKEN_COLUMN])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return path


class TokenShard:
    """A memory-mapped Arrow IPC file of token ids; `tokens` is a read-only (n,) numpy view."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"token shard not found: {self.path}")
        try:
            self._mmap = pa.memory_map(str(self.path), "r")
            table = pa.ipc.open_file(self._mmap).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{self.path}: not an Arrow IPC token file ({e})") from None
        if TOKEN_COLUMN not in table.column_names:
            raise DataError(f"{self.path}: no '{TOKEN_COLUMN}' column (has {table.column_names})")
        column = table.column(TOKEN_COLUMN)
        if not pa.types.is_unsigned_integer(column.type) or column.null_count:
            raise DataError(f"{self.path}: '{TOKEN_COLUMN}' must be unsigned integers without nulls, got {column.type}")
        if column.num_chunks == 1:
            self.tokens = column.chunk(0).to_numpy(zero_copy_only=True)
        elif column.num_chunks == 0:
            self.tokens = np.empty(0, dtype=column.type.to_pandas_dtype())
        else:  # not written by write_shard; a contiguous view needs one chunk
            raise DataError(f"{self.path}: {column.num_chunks} record batches, expected one")
        self.tokens.flags.writeable = False

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype

    def __reduce__(self):  # pickles as its path (e.g. into a Ray worker), re-mapped on load
        return (TokenShard, (str(self.path),))

    def __repr__(self) -> str:
        return f"TokenShard({str(self.path)!r}, tokens={len(self)}, dtype={self.dtype})"


DEV_FRACTION = 0.05
DEV_MIN_TOKENS = 4096  # shards with less than twice this have no dev part (tiny test corpora)


class ShardPart:
    """Tokens [start, stop) of a shard (or of anything shard-like: `tokens`, `path`, `len`), with
    the same interface. A part from 0 keeps the shard's own `tokens` (indices below `stop`
    are the same), so it also wraps shards whose tokens cannot be sliced."""

    def __init__(self, shard: Any, start: int, stop: int) -> None:
        self.shard = shard
        self.start, self.stop = start, stop
        self.tokens = shard.tokens if start == 0 else shard.tokens[start:stop]
        self.path = shard.path

    def __len__(self) -> int:
        return self.stop - self.start

    def __reduce__(self):
        return (ShardPart, (self.shard, self.start, self.stop))

    def __repr__(self) -> str:
        return f"ShardPart({str(self.path)!r}, {self.start}, {self.stop})"


def dev_tokens(n: int) -> int:
    """How many tokens at the end of an n-token train shard are the dev split: DEV_FRACTION of
    them, at least DEV_MIN_TOKENS, none when that would leave less than half the shard to train on."""
    dev = max(DEV_MIN_TOKENS, int(n * DEV_FRACTION))
    return dev if 2 * dev <= n else 0


def train_part(shard: Any) -> Any:
    """The train shard without its dev tail: what the samplers draw from."""
    dev = dev_tokens(len(shard))
    return ShardPart(shard, 0, len(shard) - dev) if dev else shard


def dev_part(shard: TokenShard) -> ShardPart:
    """The dev tail of a train shard (`dev_tokens`); a DataError when the shard is too small to have one."""
    dev = dev_tokens(len(shard))
    if not dev:
        raise DataError(f"{shard.path}: {len(shard)} tokens, too few for a dev split (needs {2 * DEV_MIN_TOKENS})")
    return ShardPart(shard, len(shard) - dev, len(shard))


def sha256_file(path: str | Path) -> str:
    """The file's sha256, hex (manifests and model folders record it to detect damage)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class MixedBatchSampler:
    """Random (B, T) next-token batches drawn from several shards (one per domain).

    Rows are spread evenly over the D domains by a rotating rule: row i of the
    k-th batch (k = 0, 1, ...) comes from domain (k * B + i) mod D. Any D
    consecutive batches therefore hold exactly B rows of every domain, whether
    or not D divides B. Each row is a window of T + 1 consecutive tokens at a
    start drawn uniformly from [0, n_d - T - 1]; x = window[:T], y = window[1:].

    With `switch_fraction` f > 0, the first round(f * B) rows of every batch are
    domain-switch windows instead (`switch_window`: a random ordered pair of
    domains a != b, the switch point uniform in [T/4, 3T/4)), so a merger learns
    to follow a change of domain mid-context. They are drawn from the same
    generator, so `state_dict` covers them.

    Every window comes from a shard's `train_part`: the dev tail is never drawn.
    """

    def __init__(
        self, shards: list[TokenShard], batch_size: int, seq_len: int, seed: int = 0, switch_fraction: float = 0.0
    ) -> None:
        if not shards:
            raise DataError("MixedBatchSampler needs at least one shard")
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0.0 <= switch_fraction < 1.0:
            raise DataError(f"switch_fraction: must be in [0, 1), got {switch_fraction}")
        if switch_fraction > 0 and len(shards) < 2:
            raise DataError("switch_fraction: domain-switch windows need at least two domains")
        for s in shards:
            if len(s) < seq_len + 1:
                raise DataError(f"{s.path}: {len(s)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.shard_tokens = [len(s) for s in shards]
        self.shards = [train_part(s) for s in shards]
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.switch_fraction = float(switch_fraction)
        self.switch_rows = int(round(switch_fraction * batch_size))
        self.batches_drawn = 0
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._highs = np.array([len(s) - seq_len for s in self.shards], dtype=np.int64)  # exclusive bound on starts
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def row_domains(self, batch_index: int) -> np.ndarray:
        """(B,) domain index of every row of batch `batch_index` (the rotating rule above)."""
        return (batch_index * self.batch_size + np.arange(self.batch_size)) % len(self.shards)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        domains = self.row_domains(self.batches_drawn)  # (B,)
        starts = self._rng.integers(0, self._highs[domains])  # (B,)
        windows = np.empty((B, T + 1), dtype=np.int64)
        for d, shard in enumerate(self.shards):
            rows = np.nonzero(domains == d)[0]
            if len(rows):
                windows[rows] = shard.tokens[starts[rows, None] + self._offsets]  # (rows, T+1)
        D = len(self.shards)
        for row in range(self.switch_rows):
            a, b = divmod(int(self._rng.integers(0, D * (D - 1))), D - 1)  # ordered pair, b != a
            b += b >= a
            cut = int(self._rng.integers(T // 4, max(T // 4 + 1, 3 * T // 4)))
            windows[row] = switch_window(self.shards[a], self.shards[b], T, cut, self._rng)
        self.batches_drawn += 1
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))  # (B, T)
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))  # (B, T)
        return x, y

    __next__ = next

    def __iter__(self) -> "MixedBatchSampler":
        return self

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON- and torch.save-able)."""
        return {
            "kind": type(self).__name__,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "switch_fraction": self.switch_fraction,
            "shard_tokens": self.shard_tokens,
            "batches_drawn": self.batches_drawn,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"kind": type(self).__name__, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "shard_tokens": self.shard_tokens}
        if state.get("switch_fraction", 0.0) != self.switch_fraction:
            raise DataError(
                f"sampler state: switch_fraction is {state.get('switch_fraction', 0.0)!r}, this sampler has {self.switch_fraction!r}"
            )
        for key, value in mine.items():
            if state.get(key) != value:
                raise DataError(f"sampler state: {key} is {state.get(key)!r}, this sampler has {value!r}")
        self._rng.bit_generator.state = state["rng"]
        self.batches_drawn = int(state["batches_drawn"])
        self.seed = state.get("seed", self.seed)


class BatchSampler(MixedBatchSampler):
    """Random (B, T) next-token batches from one shard; see MixedBatchSampler."""

    def __init__(self, shard: TokenShard, batch_size: int, seq_len: int, seed: int = 0) -> None:
        super().__init__([shard], batch_size, seq_len, seed)
        self.shard = shard


def switch_window(first: TokenShard, second: TokenShard, seq_len: int, cut: int, rng: np.random.Generator) -> np.ndarray:
    """One domain-switch window (T + 1,) int64: `cut` tokens from `first`, then T + 1 - cut from
    `second`, each at a uniform random start."""
    rest = seq_len + 1 - cut
    for shard, n in ((first, cut), (second, rest)):
        if len(shard) < n + 1:
            raise DataError(f"{shard.path}: {len(shard)} tokens, too few for a switch window part of {n}")
    sa = int(rng.integers(0, len(first) - cut))
    sb = int(rng.integers(0, len(second) - rest))
    return np.concatenate([first.tokens[sa : sa + cut], second.tokens[sb : sb + rest]]).astype(np.int64)


SWITCH_WINDOWS_PER_PAIR = 32
SWITCH_SEED = 1234


def switch_pairs(num_domains: int, per_pair: int = SWITCH_WINDOWS_PER_PAIR) -> list[tuple[int, int]]:
    """(first, second) domain of every switch window, in `switch_batches` order: every ordered
    pair a != b (a-major), `per_pair` windows each."""
    return [(a, b) for a in range(num_domains) for b in range(num_domains) if a != b for _ in range(per_pair)]


def switch_cuts(
    num_domains: int, seq_len: int, per_pair: int = SWITCH_WINDOWS_PER_PAIR, seed: int = SWITCH_SEED
) -> np.ndarray:
    """(W,) int64 cut of every switch window (tokens 0 .. cut-1 come from the first domain), uniform
    in [T/4, 3T/4] from their own fixed seed, so a scorer can recompute them without the tokens."""
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    low, high = max(1, seq_len // 4), max(1, (3 * seq_len) // 4)
    return rng.integers(low, high + 1, size=len(switch_pairs(num_domains, per_pair))).astype(np.int64)


def switch_batches(
    shards: list[TokenShard], batch_size: int, seq_len: int, per_pair: int = SWITCH_WINDOWS_PER_PAIR, seed: int = SWITCH_SEED
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The domain-switch evaluation set: `per_pair` windows for every ordered pair of domains
    (a, b), a != b (`switch_pairs` order), the first `cut` tokens from a and the rest from b, the
    cuts drawn at random in [T/4, 3T/4] (`switch_cuts`) so that no fixed switch point can be
    learned, random starts from a fixed seed (the same windows for every caller), in batches
    of at most `batch_size`."""
    if len(shards) < 2:
        raise DataError("switch windows need at least two domains")
    rng = np.random.Generator(np.random.PCG64(seed))
    cuts = switch_cuts(len(shards), seq_len, per_pair, seed)
    windows = np.stack([
        switch_window(shards[a], shards[b], seq_len, int(cut), rng)
        for (a, b), cut in zip(switch_pairs(len(shards), per_pair), cuts)
    ])  # (pairs * per_pair, T + 1)
    return [
        (torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:])))
        for w in (windows[i : i + batch_size] for i in range(0, len(windows), batch_size))
    ]


def dev_batches(
    train_shards: list[TokenShard], batch_size: int, seq_len: int, max_batches: int
) -> tuple[list[list[tuple[torch.Tensor, torch.Tensor]]], list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """The dev set: every domain's `eval_batches` of its train shard's dev tail, and (two or more
    domains) the `switch_batches` of those tails; the same shape as the val set."""
    parts = [dev_part(s) for s in train_shards]
    per_domain = [eval_batches(p, batch_size, seq_len, max_batches) for p in parts]
    return per_domain, (switch_batches(parts, batch_size, seq_len) if len(parts) > 1 else None)


def eval_batches(shard: TokenShard, batch_size: int, seq_len: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches: the same tokens for every caller.

    nb = min(max_batches, W // B) batches (at least one) of B windows of T + 1
    tokens, where W = (n - 1) // T is the number of non-overlapping windows the
    shard holds; the nb * B window starts are spaced evenly over [0, n - T - 1]
    (rounded), so they cover the whole shard and overlap only when W < B.
    """
    B, T = batch_size, seq_len
    n = len(shard)
    if n < T + 1:
        raise DataError(f"{shard.path}: {n} tokens, fewer than seq_len + 1 = {T + 1} for one eval window")
    if B < 1 or max_batches < 1:
        raise DataError(f"batch_size and max_batches must be >= 1, got {B}, {max_batches}")
    nb = max(1, min(max_batches, ((n - 1) // T) // B))
    starts = np.rint(np.linspace(0, n - T - 1, nb * B)).astype(np.int64)  # (nb*B,)
    windows = shard.tokens[starts[:, None] + np.arange(T + 1)].astype(np.int64)  # (nb*B, T+1)
    windows = windows.reshape(nb, B, T + 1)
    return [
        (torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:])))
        for w in windows
    ]
