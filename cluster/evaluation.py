"""Validation of a rank's members, the uniform mixture and the merged model.

Every domain's val set is `eval_batches(val shard, batch_size, seq_len,
eval_batches)`, identical on every rank; the mixed val set is all of them, so
a mixed-domain loss is the mean of the per-domain losses (domains weigh
equally). For each batch, every rank runs its members once and derives:

- member m's loss on the batch (local);
- its target log-probs log p_m(y) (B, T), gathered to every rank -> the
  uniform mixture's loss  -mean log( (1/M) sum_m p_m(y) );
- with a merger: its projected states (and mixture log-probs), gathered ->
  the merged loss on this rank's rows, summed over ranks like the training loss.

All ranks must call `evaluate` together (it runs collectives).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cluster.members import Member
from cluster.merge import Exchange

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EvalResult:
    members: dict[str, dict[str, float]]  # this rank's members: name -> domain -> loss
    uniform: dict[str, float]  # domain -> loss of the uniform mixture of all members
    merged: dict[str, float] | None  # domain -> loss of the merged model (None without a merger)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@torch.no_grad()
def evaluate(
    members: Sequence[Member],
    merger: nn.Module | None,
    val_sets: dict[str, list[Batch]],
    exchange: Exchange,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> EvalResult:
    """Per-domain val losses of this rank's members, the uniform mixture and the merger."""
    mixture = merger is not None and merger.merge_mode == "mixture"
    M = exchange.num_members
    member_loss = {m.name: {} for m in members}
    uniform: dict[str, float] = {}
    merged_share = torch.zeros(len(val_sets), device=device)
    was_training = [m.model.training for m in members]
    for m in members:
        m.model.eval()
    if merger is not None:
        merger.eval()
    try:
        for d_i, (domain, batches) in enumerate(val_sets.items()):
            sums = {m.name: 0.0 for m in members}
            uniform_sum = 0.0
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                target_lp, states, logprobs = [], [], []
                with autocast():
                    for m in members:
                        h = m.model.hidden(x)  # (B, T, C)
                        lp = F.log_softmax(m.model.logits_from_hidden(h).float(), dim=-1)  # (B, T, V)
                        t = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B, T)
                        sums[m.name] += -t.mean().item()
                        target_lp.append(t)
                        if merger is not None:
                            states.append(m.projection(h))
                            if mixture:
                                logprobs.append(lp)
                    all_t = exchange.gather(torch.stack(target_lp))  # (M, B, T)
                    uniform_sum += -(torch.logsumexp(all_t, dim=0) - math.log(M)).mean().item()
                    if merger is not None:
                        rows = exchange.rows(x.shape[0])
                        s = exchange.gather(torch.stack(states))[:, rows].permute(1, 2, 0, 3)  # (b, T, M, D)
                        lp_all = None
                        if mixture:
                            lp_all = exchange.gather(torch.stack(logprobs))[:, rows].permute(1, 2, 0, 3)
                        out = merger(s, lp_all, y[rows])
                        merged_share[d_i] += out.loss.float() * (s.shape[0] / x.shape[0])
            n = len(batches)
            for name in sums:
                member_loss[name][domain] = sums[name] / n
            uniform[domain] = uniform_sum / n
            merged_share[d_i] /= n
    finally:
        for m, t in zip(members, was_training):
            m.model.train(t)
        if merger is not None:
            merger.train()
    merged = None
    if merger is not None:
        if exchange.world_size > 1:
            dist.all_reduce(merged_share)
        merged = {d: float(v) for d, v in zip(val_sets, merged_share.tolist())}
    return EvalResult(member_loss, uniform, merged)
