"""Start-up check of every collective a job's workers will call, before training.

Phase 2's collectives first run after all of phase 1 (hours into a large job),
and on NCCL some take other code paths than gloo's (the differentiable
gather's backward is a reduce-scatter there). So every rank, right after it
has built its members and merger, pushes a tiny batch through the very
functions training and validation call:

1. `merge step`: `cluster.merge.merged_loss` and its backward (the member
   exchange and its differentiable backward), then `reduce_and_clip` (the
   clipping all-reduce); the loss and norm must be finite and every
   projection of this rank must have received a finite gradient;
2. `object gather`: `cluster.evaluation.gather_objects` (how rank 0
   collects everyone's metric records), carrying each rank's loss and norm
   from step 1: every rank must appear in order, and the all-reduced loss
   must be the same everywhere;
3. `evaluation with the merger`: `cluster.evaluation.evaluate` on the same
   batch (member log-probs exchange, merged rows gathered back); every row's
   loss must be finite.

The batch is (W, T) rows, W = world size, identical on every rank. The check
runs with members and merger in eval mode (no dropout) under a forked RNG and
clears every gradient it made, so training proceeds exactly as without it.
Any failure raises `CollectiveCheckError` with one line naming the rank, the
device, the backend and the step.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from cluster.evaluation import evaluate, gather_objects
from cluster.members import Member
from cluster.merge import Exchange, local_parameters, merged_loss, reduce_and_clip
from leviathan.evaluation import default_prefix_tokens

CHECK_FAILED = "collective check failed"
CHECK_SEQ_LEN = 8  # tokens per row of the check batch
MAX_MESSAGE = 300  # characters of the underlying error kept in the one line


class CollectiveCheckError(RuntimeError):
    """A collective failed (or gave a wrong result) in the start-up check; the message is one line."""


def check_collectives(
    members: Sequence[Member],
    member_names: Sequence[str],
    merger: nn.Module,
    exchange: Exchange,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    *,
    joint: bool,
    vocab_size: int,
) -> dict[str, float]:
    """Run the three steps above on every rank (all ranks must call it together).

    Returns each step's seconds; raises CollectiveCheckError on the first failure."""
    rank, world = exchange.rank, exchange.world_size
    backend = dist.get_backend() if dist.is_initialized() else "none"
    B, T = world, CHECK_SEQ_LEN
    # The same (B, T + 1) token ids on every rank: inputs and next-token targets.
    ids = torch.arange(B * (T + 1), dtype=torch.long).reshape(B, T + 1) * 7919 % vocab_size
    x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)

    params = [p for m in members for p in (*m.model.parameters(), *m.projection.parameters())]
    params += list(merger.parameters())
    modes = [(mod, mod.training) for mod in [*(m.model for m in members), *(m.projection for m in members), merger]]
    seconds: dict[str, float] = {}
    step = "start"
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            for mod, _ in modes:
                mod.eval()

            step = "merge step (member exchange, its backward, the clipping all-reduce)"
            t0 = time.perf_counter()
            with autocast():
                loss_share = merged_loss(members, merger, x, y, exchange, joint=joint)
            loss_share.backward()
            mine = local_parameters(members, joint=joint)
            projections = [p for m in members for p in m.projection.parameters() if p.requires_grad]
            _require(all(p.grad is not None and torch.isfinite(p.grad).all() for p in projections),
                     "a projection got no finite gradient from the exchange's backward")
            loss, norm = reduce_and_clip(merger, mine, loss_share, world, grad_clip=1.0)
            _require(math.isfinite(loss) and math.isfinite(norm), f"loss {loss}, gradient norm {norm}")
            seconds["merge_step"] = time.perf_counter() - t0

            step = "object gather"
            t0 = time.perf_counter()
            everyone = gather_objects({"rank": rank, "loss": loss}, world)
            _require([e["rank"] for e in everyone] == list(range(world)), f"ranks {[e['rank'] for e in everyone]}")
            _require(len({e["loss"] for e in everyone}) == 1,
                     f"the all-reduced loss differs between ranks: {[e['loss'] for e in everyone]}")
            seconds["object_gather"] = time.perf_counter() - t0

            step = "evaluation with the merger"
            t0 = time.perf_counter()
            result = evaluate(members, member_names, merger, {"check": [(x, y)]}, default_prefix_tokens(T),
                              exchange, device, autocast)
            losses = [v for column in result.losses.values() for v in column]
            _require(all(math.isfinite(v) for v in losses), f"losses {losses}")
            seconds["evaluation"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - any failure of the check fails the job with one line
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:MAX_MESSAGE]
        raise CollectiveCheckError(
            f"{CHECK_FAILED} on rank {rank} of {world} ({device}, backend {backend}): {step}: {detail}"
        ) from None
    finally:
        for mod, was_training in modes:
            mod.train(was_training)
        for p in params:
            p.grad = None
    return seconds


class _WrongResult(RuntimeError):
    """A collective returned, but not what every rank sent."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _WrongResult(what)
