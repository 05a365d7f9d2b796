"""Validation during training: every row of the evaluation table, on the workers.

Every domain's val set is `eval_batches(val shard, batch_size, seq_len,
eval_batches)` and the switch set `switch_batches(val shards, batch_size,
seq_len)`, identical on every rank and the same windows `jobs.evaluate`
scores with the same settings. For each batch every rank runs its members once
(`leviathan.model.ensemble.run_members`) and gathers:

- every member's log-probs of the targets (M, B, T), to every rank;
- with a merger, the merged model's log-probs of the targets: rank r merges
  its own rows R_r from the gathered states (`merge_members`), then the rows
  are gathered back into (B, T).

The per-token log-probs then go through the one scoring function,
`leviathan.evaluation.score_windows` (dev prefix excluded from every row, a
fixed number of windows per domain), so the figures equal the report's.

All ranks must call `evaluate` together (it runs collectives).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from cluster.members import Member
from cluster.merge import Exchange, gather_outputs, rank_outputs
from leviathan.model.ensemble import merge_members
from leviathan.evaluation import column_nll, column_sizes, score_windows
from leviathan.run.names import MIXED, SWITCH, row_order
from leviathan.run.report import build_report

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EvalResult:
    """Every row's summed NLL on every column (each domain, MIXED, SWITCH) and its loss per scored token."""

    rows: list[str]  # merged (with a merger), the members in module-major order, uniform, the posteriors
    nll: dict[str, list[float]]  # column -> summed NLL of each row
    windows_per_domain: int
    switch_windows: int
    seq_len: int
    prefix_tokens: int

    @property
    def losses(self) -> dict[str, list[float]]:
        """Column -> loss (nats per scored token) of each row."""
        scored = self.seq_len - self.prefix_tokens
        domains = [c for c in self.nll if c not in (MIXED, SWITCH)]
        windows = {c: self.windows_per_domain for c in domains} | {MIXED: self.windows_per_domain * len(domains)}
        windows[SWITCH] = self.switch_windows
        return {c: [v / (windows[c] * scored) for v in sums] for c, sums in self.nll.items()}

    def by_domain(self, row: str) -> dict[str, float]:
        """Row `row`'s loss per domain (the MIXED and SWITCH columns left out)."""
        r = self.rows.index(row)
        return {c: v[r] for c, v in self.losses.items() if c not in (MIXED, SWITCH)}

    def mixed(self, row: str) -> float:
        return self.losses[MIXED][self.rows.index(row)]

    def switch(self, row: str) -> float | None:
        return self.losses[SWITCH][self.rows.index(row)] if SWITCH in self.losses else None

    def report(
        self,
        member_modules: dict[str, int],
        bytes_per_token: dict[str, float],
        settings: dict[str, Any],
        evidence: dict[str, list[float]] | None = None,
    ) -> dict[str, Any]:
        """The report dict `leviathan.evaluation.evaluate_ensemble` gives for the same windows
        (`leviathan.run.report.build_report`); bytes_per_token: each domain's val split, in
        module order."""
        domains = list(bytes_per_token)
        tokens, nbytes = column_sizes(
            bytes_per_token, self.windows_per_domain, self.seq_len, self.prefix_tokens, self.switch_windows
        )
        settings = {
            "seq_len": self.seq_len,
            "prefix_tokens": self.prefix_tokens,
            "scored_tokens_per_window": self.seq_len - self.prefix_tokens,
            "windows_per_domain": self.windows_per_domain,
            "windows": {d: self.windows_per_domain for d in domains},
            "switch_windows": self.switch_windows,
            **settings,
        }
        return build_report(rows=self.rows, member_modules=member_modules, domains=domains, nll=self.nll,
                            tokens=tokens, nbytes=nbytes, settings=settings, evidence=evidence)


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (`all_gather_object`; no call at world size 1)."""
    if world_size == 1:
        return [obj]
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, obj)
    return everyone


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@torch.no_grad()
def evaluate(
    members: Sequence[Member],
    member_names: Sequence[str],
    merger: nn.Module | None,
    val_sets: dict[str, list[Batch]],
    prefix_tokens: int,
    exchange: Exchange,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    switch_set: list[Batch] | None = None,
) -> EvalResult:
    """Every row's loss on every domain, the mixed set and (given switch_set) the switch
    set (member_names: all members, module-major)."""
    was_training = [m.model.training for m in members]
    for m in members:
        m.model.eval()
    if merger is not None:
        merger.eval()
    try:
        score = lambda batches: _score(members, merger, batches, prefix_tokens, exchange, device, autocast)  # noqa: E731
        nll = {domain: score(batches) for domain, batches in val_sets.items()}
        switch_nll = score(switch_set) if switch_set else None
    finally:
        for m, t in zip(members, was_training):
            m.model.train(t)
        if merger is not None:
            merger.train()
    seq_len = next(iter(val_sets.values()))[0][1].shape[1]
    sums, k = column_nll(nll, switch_nll)
    return EvalResult(
        rows=row_order(list(member_names), merger is not None),
        nll={c: v.tolist() for c, v in sums.items()},
        windows_per_domain=k,
        switch_windows=0 if switch_nll is None else switch_nll.shape[1],
        seq_len=seq_len,
        prefix_tokens=prefix_tokens,
    )


def _score(
    members: Sequence[Member],
    merger: nn.Module | None,
    batches: list[Batch],
    prefix_tokens: int,
    exchange: Exchange,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> torch.Tensor:
    """Every row's summed NLL (R, N) on the N windows of `batches`."""
    parts = []
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            outputs = gather_outputs(rank_outputs(members, x, y, members_grad=False), exchange)
            merged_lp = None
            if merger is not None:
                rows = exchange.rows(x.shape[0])
                mine = merge_members(merger, outputs, y[rows], rows).target_logprobs  # (b, T)
                merged_lp = exchange.gather_rows(mine, x.shape[0])  # (B, T)
        member_lp = outputs.target_logprobs.float().permute(1, 2, 0)  # (B, T, M)
        parts.append(score_windows(member_lp, merged_lp, prefix_tokens))  # (R, B)
    return torch.cat(parts, dim=1)
