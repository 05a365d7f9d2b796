"""Synthetic recall tasks: where a mixer's lags can matter, measured without a corpus.

Every task returns a `SyntheticBatch` of `inputs` (B, T) int64 token ids,
`targets` (B, T) int64 and `mask` (B, T) bool: at a position with mask True
the model, having read inputs[:, :t+1], must predict targets[:, t] (the next
token). Elsewhere targets is the filler 0 and is never scored. Generation is
seeded by a `torch.Generator` alone, so the same seed gives the same tensors.

Tasks (token 0 is the filler everywhere):

- `mqar` Zoology's multi-query associative recall (Arora et al. 2023): N
  key-value pairs `k v`, then the keys queried again in random order, each
  followed by its value; the answer is the value at every queried key. Keys
  come from the lower half of the vocabulary, values from the upper half, a
  fresh draw per sequence. The queries sit in a region twice their length,
  in random two-token slots among filler tokens; Zoology draws their
  distances from a power law instead.
- `mtk<k>` multi-token-key recall, k = 1..4: N pairs `key v` with every
  key k consecutive tokens, then N queries of keys drawn with replacement
  (so no answer follows by elimination), each as `key ? v`: the k key
  tokens, the query marker `?` (token 1) and the value. The answer is asked
  at the marker. Keys come from tokens [2, V/2), values
  from [V/2, V). For k >= 2 every proper suffix of a key (its last k-1, ...,
  1 tokens) and its first token are each shared with at least one other key,
  so only the whole k-gram identifies it. What each mixer can do here:
    * one layer of correlation with w >= k+1 solves it: at the marker, lags
      1..k compare the query's key with the k tokens before each value
      (score[?, v] = sum_u a_u q[?-u].k[v-u]) and lag 0 compares the marker
      with a value token, so the head can point at the value and copy it;
      with w <= k it sees only a key suffix, which is ambiguous by
      construction, so it cannot beat guessing between the keys sharing it;
    * one layer of attention cannot: its query at the marker is the marker
      alone and its keys single tokens, so it can at best copy some value;
    * two layers of either can, through previous-token heads that move key
      tokens forward to the marker and to the value (the induction circuit).
  For k = 1 the keys are distinct single tokens. No filler.
- `block` the block-finding task of Multi-Token Attention (Golovneva et al.
  2025, section 3): `n_blocks` blocks of `block_len` distinct letters, each
  closed by a separator; then a query marker, `query_len` letters of one
  target block in random order, an answer marker, and the target block
  copied. The answer is every letter of the copy; exactly one block holds all
  query letters (others are redrawn until none does), while each query letter
  alone usually occurs in several blocks. Differs from the paper in scoring
  the copy of the whole block (the paper also has first-/last-token
  variants) and in its sizes (set by the arguments below).
- `induction` copy what followed the previous occurrence of the current
  w-gram: random tokens, one w-gram planted with the token after it in the
  first half, the same w-gram again at the end; the answer is that token.
  The w-gram occurs nowhere else, but its single tokens do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FILLER = 0
TASKS = ("mqar", "mtk1", "mtk2", "mtk3", "mtk4", "block", "induction")
"""Every task `make_batch` builds."""

LETTERS = 26
"""The block task's alphabet: tokens 1..26; the separator and the two markers follow."""


@dataclass(frozen=True)
class SyntheticBatch:
    """inputs, targets (B, T) int64; mask (B, T) bool: the answer positions."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor


@dataclass(frozen=True)
class TaskSettings:
    """A task's difficulty. vocab_size bounds every token id; the recall tasks use
    `pairs` key-value pairs, the block task `n_blocks` x `block_len` letters with a
    `query_len`-letter query, induction a `gram`-token trigger in `seq_len` tokens."""

    vocab_size: int = 64
    pairs: int = 8
    n_blocks: int = 8
    block_len: int = 4
    query_len: int = 2
    gram: int = 2
    seq_len: int = 64

    def __post_init__(self) -> None:
        for name in ("vocab_size", "pairs", "n_blocks", "block_len", "query_len", "gram", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.vocab_size < 2 * self.pairs + 4:  # keys from [2, V/2) in the mtk tasks
            raise ValueError(f"vocab_size: {self.vocab_size} is too small for {self.pairs} pairs (need >= {2 * self.pairs + 4})")
        if not self.query_len < self.block_len <= LETTERS:
            raise ValueError(f"query_len, block_len: need query_len < block_len <= {LETTERS}, got {self.query_len}, {self.block_len}")
        if self.seq_len < 2 * self.gram + 4:
            raise ValueError(f"seq_len: {self.seq_len} is too short for a {self.gram}-gram induction task")

    def seq_len_of(self, task: str) -> int:
        """The length T of a task's sequences under these settings."""
        check_task(task)
        if task == "block":
            return self.n_blocks * (self.block_len + 1) + self.query_len + 2 + self.block_len - 1
        if task == "induction":
            return self.seq_len
        if task == "mqar":
            return 6 * self.pairs
        return self.pairs * (2 * key_len(task) + 3)  # pairs `key v`, queries `key ? v`

    def vocab_of(self, task: str) -> int:
        """The vocabulary a model needs for the task."""
        return LETTERS + 4 if task == "block" else self.vocab_size


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not one of {', '.join(TASKS)}")


def key_len(task: str) -> int:
    """Tokens per key of a recall task (mqar: 1, mtk<k>: k)."""
    return 1 if task == "mqar" else int(task[3:])


def _perms(rows: int, n: int, g: torch.Generator) -> Tensor:
    """`rows` independent random permutations of range(n): (rows, n)."""
    return torch.rand(rows, n, generator=g).argsort(dim=1)


QUERY_MARK = 1
"""The mtk tasks' query marker: the answer is asked at it. Keys start at token 2."""


def _shared_keys(rows: int, k: int, n: int, lo: int, hi: int, g: torch.Generator) -> Tensor:
    """Per row, n distinct k-token keys (rows, n, k) from tokens [lo, hi).

    For k >= 2, n // 2 suffixes of k-1 tokens are each given to two or three keys
    (so every proper suffix, down to the last token, is shared), and the first
    tokens come from a pool of n // 2 tokens, each used at least twice; rows where
    two keys come out equal are drawn again."""
    if k == 1:
        return (lo + _perms(rows, hi - lo, g)[:, :n]).unsqueeze(2)
    groups = n // 2
    keys = torch.empty(rows, n, k, dtype=torch.long)
    todo = torch.arange(rows)
    while todo.numel():
        m = todo.numel()
        suffixes = torch.randint(lo, hi, (m, groups, k - 1), generator=g)
        firsts = lo + _perms(m, hi - lo, g)[:, :groups]  # (m, groups) distinct
        first = firsts[:, torch.arange(n) % groups].gather(1, _perms(m, n, g))  # (m, n)
        suffix = suffixes[:, torch.arange(n) % groups]  # (m, n, k - 1)
        drawn = torch.cat([first.unsqueeze(2), suffix], dim=2).gather(
            1, _perms(m, n, g).unsqueeze(2).expand(-1, -1, k))  # (m, n, k), keys in random order
        keys[todo] = drawn
        code = (drawn * hi ** torch.arange(k)).sum(dim=2).sort(dim=1).values  # (m, n), one id per key
        repeated = (code[:, 1:] == code[:, :-1]).any(dim=1)
        todo = todo[repeated]
    return keys


def _recall(task: str, batch: int, s: TaskSettings, g: torch.Generator) -> SyntheticBatch:
    k, n = key_len(task), s.pairs
    T = s.seq_len_of(task)
    half = s.vocab_size // 2
    mtk = task != "mqar"
    if mtk and k >= 2 and n < 4:
        raise ValueError(f"pairs: {task} needs >= 4 pairs so that every key token is shared, got {n}")
    keys = _shared_keys(batch, k, n, QUERY_MARK + 1 if mtk else 1, half, g)  # (B, n, k)
    values = half + torch.randint(0, s.vocab_size - half, (batch, n), generator=g)  # (B, n)
    pairs = torch.cat([keys, values.unsqueeze(2)], dim=2)  # (B, n, k + 1)
    # mqar queries every key once; mtk draws its n queries with replacement, so the
    # values already answered do not narrow down the next answer.
    order = torch.randint(0, n, (batch, n), generator=g) if mtk else _perms(batch, n, g)
    queried = pairs.gather(1, order.unsqueeze(2).expand(-1, -1, k + 1))  # (B, n, k + 1)
    inputs = torch.full((batch, T), FILLER, dtype=torch.long)
    inputs[:, : n * (k + 1)] = pairs.reshape(batch, -1)
    if mtk:  # `key ? v` back to back
        marks = torch.full((batch, n, 1), QUERY_MARK, dtype=torch.long)
        queried = torch.cat([queried[:, :, :k], marks, queried[:, :, k:]], dim=2)  # (B, n, k + 2)
        inputs[:, n * (k + 1) :] = queried.reshape(batch, -1)
        answer_at = n * (k + 1) + (k + 2) * torch.arange(n).expand(batch, n) + k  # the markers
    else:  # n of the 2n two-token slots after the pairs, in order
        slots = _perms(batch, 2 * n, g)[:, :n].sort(dim=1).values
        query_at = n * (k + 1) + slots * (k + 1)  # (B, n) first token of each query
        for j in range(k + 1):
            inputs.scatter_(1, query_at + j, queried[:, :, j])
        answer_at = query_at + k - 1  # the key token
    targets = torch.full((batch, T), FILLER, dtype=torch.long).scatter_(1, answer_at, queried[:, :, -1])
    mask = torch.zeros(batch, T, dtype=torch.bool).scatter_(1, answer_at, True)
    return SyntheticBatch(inputs, targets, mask)


def _block(batch: int, s: TaskSettings, g: torch.Generator) -> SyntheticBatch:
    sep, query_mark, answer_mark = LETTERS + 1, LETTERS + 2, LETTERS + 3
    T = s.seq_len_of("block")
    inputs = torch.full((batch, T), FILLER, dtype=torch.long)
    targets = torch.full((batch, T), FILLER, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.bool)
    for b in range(batch):
        blocks = [1 + torch.randperm(LETTERS, generator=g)[: s.block_len] for _ in range(s.n_blocks)]
        target = int(torch.randint(0, s.n_blocks, (1,), generator=g))
        query = blocks[target][torch.randperm(s.block_len, generator=g)[: s.query_len]]
        wanted = set(query.tolist())
        for i in range(s.n_blocks):
            while i != target and wanted <= set(blocks[i].tolist()):
                blocks[i] = 1 + torch.randperm(LETTERS, generator=g)[: s.block_len]
        body = torch.cat([torch.cat([blk, torch.tensor([sep])]) for blk in blocks])
        seq = torch.cat([body, torch.tensor([query_mark]), query, torch.tensor([answer_mark]), blocks[target]])
        inputs[b] = seq[:T]
        start = body.numel() + 1 + s.query_len  # the answer marker: predicts the first letter
        at = start + torch.arange(s.block_len)
        targets[b, at] = blocks[target]
        mask[b, at] = True
    return SyntheticBatch(inputs, targets, mask)


def _induction(batch: int, s: TaskSettings, g: torch.Generator) -> SyntheticBatch:
    w, T, V = s.gram, s.seq_len, s.vocab_size
    inputs = torch.randint(1, V, (batch, T), generator=g)
    targets = torch.full((batch, T), FILLER, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.bool)
    for b in range(batch):
        gram = torch.randint(1, V, (w,), generator=g)
        start = int(torch.randint(0, T // 2 - w, (1,), generator=g))
        row = inputs[b]
        row[start : start + w] = gram
        row[T - w :] = gram
        # Any other occurrence of the gram loses one token outside the planted spans;
        # repeat until none is left (a change may create a new occurrence).
        planted = set(range(start, start + w + 1)) | set(range(T - w, T))
        clean = False
        while not clean:
            clean = True
            for i in range(T - w + 1):
                if i not in (start, T - w) and torch.equal(row[i : i + w], gram):
                    # Inside the planted spans only by overlapping the first gram: change its answer.
                    p = next((j for j in range(i, i + w) if j not in planted), start + w)
                    row[p] = 1 + (int(row[p]) % (V - 1))
                    clean = False
        targets[b, T - 1] = row[start + w]
        mask[b, T - 1] = True
    return SyntheticBatch(inputs, targets, mask)


def make_batch(task: str, batch: int, settings: TaskSettings, generator: torch.Generator) -> SyntheticBatch:
    """`batch` sequences of `task` drawn from `generator` (the same state gives the same batch)."""
    check_task(task)
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    if task == "block":
        return _block(batch, settings, generator)
    if task == "induction":
        return _induction(batch, settings, generator)
    return _recall(task, batch, settings, generator)
