"""One rank's data: it stages only the domains the plan gives it (`RunPlan.domains_of_rank`).

Phase 1 needs only the rank's own modules' train shards. Phase 2 and validation
need rows of every domain on every rank (each rank runs its members on the same
mixed batch and scores every domain), so each domain's rows are drawn on the
rank that owns it (`RunPlan.owner_of`) and summed over the ranks by one
`all_reduce` of token ids:

- every rank runs the same sampler with the same seed over the same list of
  domains, so the random starts agree (they depend only on the shards' lengths,
  which the manifest records);
- a domain the rank does not own is an `AbsentShard`: its length, and zeros for
  its tokens;
- each token of a batch comes from exactly one owned shard, so the sum over the
  ranks is the batch that a rank holding every shard would have drawn,
  bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cluster.plan import RunPlan
from leviathan.data.shards import MixedBatchSampler, TokenShard, eval_batches, switch_batches
from leviathan.data.staging import PreparedData

Batch = tuple[torch.Tensor, torch.Tensor]


class _ZeroTokens:
    """Stands for an (n,) token array: indexing it gives zeros of the indexed shape."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            return np.zeros(len(range(*index.indices(self.n))), dtype=np.int64)
        return np.zeros(np.shape(index), dtype=np.int64)


class AbsentShard:
    """A shard another rank owns: its length from the manifest, zeros for its tokens.

    Samplers draw the same random starts from it as from the real shard; the rows
    they fill with zeros come from the owner in `merge_rows`."""

    def __init__(self, path: str, length: int) -> None:
        self.path = path
        self.tokens = _ZeroTokens(length)

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"AbsentShard({self.path!r}, tokens={len(self)})"


def rank_shards(manifest: PreparedData, plan: RunPlan, rank: int, split: str) -> list[TokenShard | AbsentShard]:
    """`split` of every plan domain in module order: the real shard (staged) for the
    domains `rank` owns, an `AbsentShard` for the others (nothing staged)."""
    return [
        manifest.shard(d, split) if plan.owner_of(d) == rank
        else AbsentShard(f"{manifest.location}/{manifest.manifest.split(d, split).file}", manifest.tokens(d, split))
        for d in plan.domains
    ]


def merge_rows(batch: Batch, world_size: int, device: torch.device) -> Batch:
    """Sum a batch of (B, T) inputs and targets over the ranks (one all_reduce of the
    (B, T + 1) windows on `device`): every rank gets every owner's rows."""
    x, y = batch
    if world_size == 1:
        return x.to(device), y.to(device)
    windows = torch.cat([x[:, :1], y], dim=1).to(device)  # y is x shifted by one: (B, T + 1)
    dist.all_reduce(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class SharedMixedSampler:
    """The phase-2 mixed sampler of a rank that holds only its own domains: the same
    draws on every rank, each row filled by its owner and merged by `merge_rows`.

    `state_dict` / `load_state_dict` are the inner sampler's, so a checkpoint is the
    same as a sampler holding every shard would write."""

    def __init__(self, sampler: MixedBatchSampler, world_size: int, device: torch.device) -> None:
        self.sampler = sampler
        self.world_size = world_size
        self.device = device

    def next(self) -> Batch:
        return merge_rows(self.sampler.next(), self.world_size, self.device)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def shared_batches(batches: list[Batch], world_size: int, device: torch.device) -> list[Batch]:
    """Fixed batches (validation, switch windows) merged over the ranks, kept on the CPU
    as the evaluator expects them."""
    out = []
    for batch in batches:
        x, y = merge_rows(batch, world_size, device)
        out.append((x.cpu(), y.cpu()))
    return out


def validation_sets(
    manifest: PreparedData, plan: RunPlan, rank: int, world_size: int, device: torch.device
) -> tuple[dict[str, list[Batch]], list[Batch] | None]:
    """Every domain's validation batches and the domain-switch set (None with one domain),
    the same on every rank, each domain's windows read only by its owner."""
    B, T, k = plan.training.batch_size, plan.training.seq_len, plan.training.eval_batches
    shards = rank_shards(manifest, plan, rank, "val")
    by_domain = dict(zip(plan.domains, shards))
    val_sets = {d: shared_batches(eval_batches(s, B, T, k), world_size, device) for d, s in by_domain.items()}
    switch = shared_batches(switch_batches(shards, B, T), world_size, device) if len(plan.domains) > 1 else None
    return val_sets, switch
