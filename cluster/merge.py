"""Phase 2, the coordinator's merge step, spread over the Ray Train workers.

Every rank hosts some members (cluster.placement) and a replica of the merger.
One step on a mixed-domain batch (x, y) (B, T), the same on every rank:

1. Each rank runs its members on all B rows and projects their final hidden
   states to the merge width: s_m = P_m h_m (B, T, D) for its members m
   (`leviathan.model.ensemble.run_members`). Mixture mode and the evidence also keep
   each member's log-prob of the target tokens, log p_m(y_t) (B, T): the
   mixture loss -mean log sum_m pi[t, m] p_m(y_t) and the evidence (the same
   tensor shifted by one position) need nothing more, so no (B, T, V) tensor
   travels. With `joint = false` the members run under no_grad; the
   projections stay differentiable.
2. Rank r merges only its rows R_r (a contiguous 1/W of the batch), so it
   only needs those rows of every member: `Exchange.exchange_rows` sends each
   rank its row block of the states, with the target log-probs as one more
   channel (M_r, B, T, D + 1), in one `torch.distributed.nn.functional.all_to_all_single`
   (differentiable: its backward is the reverse all-to-all, so gradients reach
   the projections, and with `joint` the members). A rank receives
   M x |R_r| x T x (D + 1) values instead of the M x B x T x D(+1) an
   all-gather of every row would bring. Ranks hosting fewer members pad with
   zeros; the padding is dropped again. Both travel in the states' (autocast) dtype.
   With the merger's `residual` (a logit correction over the vocabulary on top
   of the mixture) the loss needs each member's full log-probs, so only then
   they travel too, as V more channels (M_r, B, T, D + 1 + V), all in float32
   (the log-probs feed a loss; bf16 would round them).
3. Rank r merges its own rows R_r (`leviathan.model.ensemble.merge_members`) and takes
   loss_r = CE(merged logits on R_r) * |R_r| / B, so sum_r loss_r is the mean
   loss over the whole batch, exactly what `LeviathanEnsemble.forward` gives
   on one process. Backpropagating loss_r on every rank gives each projection
   (and joint member) d(sum_r loss_r)/d(theta) through the gather's backward.
4. The merger replicas' gradients are summed with one all_reduce, which also
   carries loss_r (-> the global loss) and each rank's squared gradient norm
   of its own parameters (-> the global norm for clipping). The replicas then
   take identical optimiser steps and stay identical.

Only tensors for this step travel, through torch.distributed (gloo on CPU,
NCCL on GPU); nothing goes through the Ray object store or the driver.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn

from cluster.members import Member
from cluster.placement import members_for_rank, row_slice
from leviathan.model.ensemble import MemberOutputs, merge_members, run_members

# torch 2.13 marks torch.distributed.nn's differentiable all_gather and all_to_all_single
# deprecated in favour of a private API; they are still the public differentiable collectives.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_gather is deprecated")
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_to_all_single is deprecated")


@dataclass
class CommTimer:
    """Seconds spent in collectives, by kind (for benchmarks; synchronises CUDA when timing)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)  # bytes this rank passed into each kind of collective
    bytes_received: dict[str, int] = field(default_factory=dict)  # bytes of the buffers it got back

    def sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def add_bytes(self, name: str, sent: torch.Tensor, received: Sequence[torch.Tensor]) -> None:
        """Count the tensors passed to a collective: its input and its output buffers."""
        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + _nbytes(sent)
        self.bytes_received[name] = self.bytes_received.get(name, 0) + sum(_nbytes(t) for t in received)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@dataclass(frozen=True)
class Exchange:
    """Who holds which members: rank r holds counts[r] members, module-major in rank order."""

    rank: int
    world_size: int
    counts: tuple[int, ...]

    @classmethod
    def for_placement(cls, rank: int, world_size: int, modules: int, members_per_module: int) -> "Exchange":
        counts = tuple(len(members_for_rank(r, world_size, modules, members_per_module)) for r in range(world_size))
        return cls(rank, world_size, counts)

    @property
    def num_members(self) -> int:
        return sum(self.counts)

    def rows(self, batch: int) -> slice:
        return row_slice(self.rank, self.world_size, batch)

    def gather(self, local: torch.Tensor, timer: CommTimer | None = None) -> torch.Tensor:
        """Stack every rank's member tensors (M_r, ...) into (M, ...), module-major.

        Differentiable when `local` requires grad (torch.distributed.nn), plain
        all_gather otherwise.
        """
        if self.world_size == 1:
            return local
        pad = max(self.counts) - local.shape[0]
        if pad:
            local = torch.cat([local, local.new_zeros(pad, *local.shape[1:])])
        t0 = timer.sync() if timer else 0.0
        if local.requires_grad:
            parts = dist_nn.all_gather(local)
            if timer:
                _time_backward(local, parts, timer)
        else:
            parts = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(parts, local.contiguous())
        if timer:
            timer.add("gather", timer.sync() - t0)
            timer.add_bytes("gather", local, parts)
        return torch.cat([p[:c] for p, c in zip(parts, self.counts)])

    def row_sizes(self, batch: int) -> list[int]:
        """|R_r| for every rank r: how many of the batch's rows each rank merges."""
        return [len(range(batch)[row_slice(r, self.world_size, batch)]) for r in range(self.world_size)]

    def exchange_rows(self, local: torch.Tensor, timer: CommTimer | None = None) -> torch.Tensor:
        """This rank's rows of every rank's member tensors: (M_r, B, ...) in, (M, |R_r|, ...) out, module-major.

        One all-to-all: rank j receives the row block R_j of every rank's
        members. Differentiable (its backward sends the gradients back the same way).
        """
        batch = local.shape[1]
        if self.world_size == 1:
            return local
        sizes = self.row_sizes(batch)
        width = max(self.counts)
        pad = width - local.shape[0]
        if pad:
            local = torch.cat([local, local.new_zeros(pad, *local.shape[1:])])
        send = local.transpose(0, 1).contiguous()  # (B, M_max, ...): row blocks R_0, R_1, ... in rank order
        mine = sizes[self.rank]
        received = send.new_empty(self.world_size * mine, *send.shape[1:])  # (W * |R_r|, M_max, ...)
        t0 = timer.sync() if timer else 0.0
        if send.requires_grad:
            received = dist_nn.all_to_all_single(received, send, [mine] * self.world_size, sizes)
            if timer:
                _time_backward(send, [received], timer)
        else:
            dist.all_to_all_single(received, send, [mine] * self.world_size, sizes)
        if timer:
            timer.add("exchange_rows", timer.sync() - t0)
            timer.add_bytes("exchange_rows", send, [received])
        blocks = received.view(self.world_size, mine, width, *send.shape[2:]).transpose(1, 2)  # (W, M_max, |R_r|, ...)
        return torch.cat([blocks[r, :c] for r, c in enumerate(self.counts)])  # (M, |R_r|, ...)

    def gather_rows(self, local: torch.Tensor, batch: int) -> torch.Tensor:
        """Stack every rank's rows R_r (|R_r|, ...) back into the whole batch (B, ...) (no gradient)."""
        if self.world_size == 1:
            return local
        sizes = self.row_sizes(batch)
        pad = max(sizes) - local.shape[0]
        if pad:
            local = torch.cat([local, local.new_zeros(pad, *local.shape[1:])])
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _time_backward(local: torch.Tensor, parts: Sequence[torch.Tensor], timer: CommTimer) -> None:
    """Time the gather's backward (a reduce-scatter / all-to-all): from the moment
    the gradients of the gathered parts are ready to the moment `local`'s is."""
    marks: dict[str, float] = {}

    def outputs_ready(grad: torch.Tensor) -> None:
        marks["start"] = timer.sync()

    def input_ready(grad: torch.Tensor) -> None:
        if "start" in marks:
            timer.add("gather_backward", timer.sync() - marks.pop("start"))

    for p in parts:
        p.register_hook(outputs_ready)
    local.register_hook(input_ready)


def rank_outputs(
    members: Sequence[Member], x: torch.Tensor, y: torch.Tensor | None, *, members_grad: bool,
    full_logprobs: bool = False,
) -> MemberOutputs:
    """This rank's members on x (B, T), through the ensemble's one member forward:
    states (M_r, B, T, D), given y target log-probs (M_r, B, T), and with full_logprobs
    the log-probs over the vocabulary (M_r, B, T, V)."""
    return run_members([m.model for m in members], [m.projection for m in members], x, y,
                       full_logprobs=full_logprobs, members_grad=members_grad)


def gather_outputs(local: MemberOutputs, exchange: Exchange, timer: CommTimer | None = None) -> MemberOutputs:
    """Every member's outputs (M, B, ...) on every rank (evaluation scores every member on
    every row): the states and the target log-probs travel."""
    target_lp = None if local.target_logprobs is None else exchange.gather(local.target_logprobs, timer)
    return MemberOutputs(states=exchange.gather(local.states, timer), target_logprobs=target_lp)


def exchange_outputs(local: MemberOutputs, exchange: Exchange, timer: CommTimer | None = None) -> MemberOutputs:
    """Every member's outputs on this rank's rows R_r only, (M, |R_r|, ...): one all-to-all
    of the states with the target log-probs as an extra channel, in the states' dtype; with
    full log-probs (the residual) those are V more channels and everything travels in float32."""
    if local.target_logprobs is None and local.logprobs is None:
        return MemberOutputs(states=exchange.exchange_rows(local.states, timer), target_logprobs=None)
    dtype = local.states.dtype if local.logprobs is None else torch.promote_types(local.states.dtype, torch.float32)
    parts = [local.states.to(dtype)]
    if local.target_logprobs is not None:
        parts.append(local.target_logprobs.to(dtype).unsqueeze(-1))
    if local.logprobs is not None:
        parts.append(local.logprobs.to(dtype))
    mine = exchange.exchange_rows(torch.cat(parts, dim=-1), timer)  # (M, |R_r|, T, D [+ 1] [+ V])
    D = local.states.shape[-1]
    target_lp = mine[..., D] if local.target_logprobs is not None else None
    logprobs = mine[..., D + (target_lp is not None):] if local.logprobs is not None else None
    return MemberOutputs(states=mine[..., :D].to(local.states.dtype), target_logprobs=target_lp, logprobs=logprobs)


def merged_loss(
    members: Sequence[Member],
    merger: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    exchange: Exchange,
    *,
    joint: bool,
    timer: CommTimer | None = None,
) -> torch.Tensor:
    """This rank's share loss_r = CE(merge on rows R_r) * |R_r| / B (sum over ranks = batch mean).
    With the merger's residual the members' full log-probs travel too (`exchange_outputs`)."""
    needs_target_lp = merger.merge_mode == "mixture" or merger.evidence
    local = rank_outputs(members, x, y if needs_target_lp else None, members_grad=joint,
                         full_logprobs=merger.residual)
    rows = exchange.rows(x.shape[0])
    out = merge_members(merger, exchange_outputs(local, exchange, timer), y[rows])
    return out.loss * (y[rows].shape[0] / x.shape[0])


def local_parameters(members: Sequence[Member], *, joint: bool) -> list[nn.Parameter]:
    """The parameters only this rank holds: its projections (and members with joint)."""
    params = [p for m in members for p in m.projection.parameters()]
    if joint:
        params += [p for m in members for p in m.model.parameters()]
    return params


def reduce_and_clip(
    merger: nn.Module,
    local_params: Iterable[nn.Parameter],
    loss_share: torch.Tensor,
    world_size: int,
    grad_clip: float,
    timer: CommTimer | None = None,
) -> tuple[float, float]:
    """Sum the merger replicas' gradients and the loss shares in one all_reduce,
    then clip every gradient (merger + all ranks' own) to the global norm.

    Returns (global mean loss, global grad norm before clipping).
    """
    merger_params = [p for p in merger.parameters() if p.requires_grad]
    for p in merger_params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    local = [p for p in local_params if p.grad is not None]
    local_sq = sum((p.grad.float().pow(2).sum() for p in local), torch.zeros((), device=loss_share.device))
    flat = torch.cat(
        [p.grad.reshape(-1).float() for p in merger_params]
        + [loss_share.detach().reshape(1).float(), local_sq.reshape(1)]
    )
    if world_size > 1:
        t0 = timer.sync() if timer else 0.0
        dist.all_reduce(flat)
        if timer:
            timer.add("all_reduce", timer.sync() - t0)
    offset = 0
    for p in merger_params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
    loss, local_sq_sum = flat[-2].item(), flat[-1]
    merger_sq = flat[:offset].pow(2).sum()
    norm = math.sqrt((merger_sq + local_sq_sum).item())
    if grad_clip > 0 and norm > grad_clip:
        scale = grad_clip / (norm + 1e-6)
        for p in merger_params + local:
            p.grad.mul_(scale)
    return loss, norm
