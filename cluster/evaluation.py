"""Validation during training: every row of the evaluation table, on the workers.

Every domain's val set is `eval_batches(val shard, batch_size, seq_len,
eval_batches)` and the switch set `switch_batches(val shards, batch_size,
seq_len)`, identical on every rank and the same windows `jobs.evaluate`
scores with the same settings. For each batch every rank runs its members once
(`leviathan.model.ensemble.run_members`) and gathers:

- every member's log-probs of the targets (M, B, T), to every rank;
- with a merger, the merged model's log-probs of the targets and those of the
  merger with its state term zeroed: rank r merges its own rows R_r from the
  gathered states (`leviathan.evaluation.merged_logprobs`), then the rows are
  gathered back into (B, T, 2). A residual merger also needs the members' full
  log-probs (M, |R_r|, T, V) of its rows: one all-to-all (`rows_outputs`).

The per-token log-probs then go through the one scoring path,
`leviathan.evaluation.row_logprobs` and `build_columns` (dev prefix excluded
from every row, a fixed number of windows per domain, the switch set split at
its cuts), so the figures equal the report's.

`tune` fits the tracking baselines (`leviathan.baselines.tune_baselines`) on the
members' target log-probs of train-split windows (`tuning_set`), gathered the
same way; the closing evaluation scores them with those settings.

All ranks must call `evaluate` together (it runs collectives).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from cluster.data import rank_shards, shared_batches
from cluster.members import Member
from cluster.merge import Exchange, gather_outputs, rank_outputs
from cluster.plan import RunPlan
from leviathan.baselines import BaselineSettings, tune_baselines
from leviathan.data.staging import PreparedData
from leviathan.evaluation import (
    Columns, build_columns, column_bytes, merged_gaps, merged_logprobs, row_logprobs, tuning_batches,
)
from leviathan.model.ensemble import MemberOutputs
from leviathan.run.names import MIXED, SWITCH, SWITCH_PRE, row_order
from leviathan.run.report import build_report

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EvalResult:
    """Every row's per-window NLL on every column (each domain, MIXED, SWITCH, SWITCH_PRE) and its
    loss per scored token."""

    rows: list[str]  # merged rows (with a merger), the members in module-major order, the baselines
    columns: Columns
    seq_len: int
    prefix_tokens: int
    baselines: BaselineSettings

    @property
    def nll(self) -> dict[str, list[float]]:
        """Column -> summed NLL of each row."""
        return self.columns.sums()

    @property
    def windows_per_domain(self) -> int:
        return self.columns.windows_per_domain

    @property
    def switch_windows(self) -> int:
        return self.columns.switch_windows

    @property
    def losses(self) -> dict[str, list[float]]:
        """Column -> loss (nats per scored token) of each row."""
        tokens = self.columns.token_counts()
        return {c: [v / max(tokens[c], 1) for v in sums] for c, sums in self.nll.items()}

    def by_domain(self, row: str) -> dict[str, float]:
        """Row `row`'s loss per domain (the MIXED and SWITCH columns left out)."""
        r = self.rows.index(row)
        return {c: v[r] for c, v in self.losses.items() if c not in (MIXED, SWITCH, SWITCH_PRE)}

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
        settings = {
            "seq_len": self.seq_len,
            "prefix_tokens": self.prefix_tokens,
            "scored_tokens_per_window": self.seq_len - self.prefix_tokens,
            "windows_per_domain": self.windows_per_domain,
            "windows": {d: self.windows_per_domain for d in domains},
            "switch_windows": self.switch_windows,
            "split": "val",
            **settings,
        }
        return build_report(rows=self.rows, member_modules=member_modules, domains=domains, nll=self.nll,
                            tokens=self.columns.token_counts(), nbytes=column_bytes(self.columns, bytes_per_token),
                            settings=settings, evidence=evidence, baselines=self.baselines.to_dict(),
                            gaps=merged_gaps(self.columns, self.rows))


def tuning_set(
    manifest: PreparedData, plan: RunPlan, rank: int, world_size: int, device: torch.device
) -> list[Batch]:
    """The train-split windows the baselines are tuned on (`leviathan.evaluation.tuning_batches`),
    the same on every rank, each domain's windows read only by its owner."""
    t = plan.training
    shards = rank_shards(manifest, plan, rank, "train")
    return shared_batches(tuning_batches(shards, t.batch_size, t.seq_len, t.eval_batches), world_size, device)


@torch.no_grad()
def tune(
    members: Sequence[Member],
    batches: list[Batch],
    prefix_tokens: int,
    exchange: Exchange,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> BaselineSettings:
    """Fixed share's alpha and the decayed posterior's (beta, gamma) tuned on `batches`
    (`tuning_set`), the same settings on every rank (all ranks must call it together)."""
    was_training = [m.model.training for m in members]
    for m in members:
        m.model.eval()
    try:
        lps = []
        for x, y in batches:
            with autocast():
                outputs = gather_outputs(rank_outputs(members, x.to(device), y.to(device), members_grad=False), exchange)
            lps.append(outputs.target_logprobs.float().permute(1, 2, 0).cpu())  # (B, T, M)
    finally:
        for m, t in zip(members, was_training):
            m.model.train(t)
    return tune_baselines(torch.cat(lps), prefix_tokens)


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
    baselines: BaselineSettings | None = None,
) -> EvalResult:
    """Every row's loss on every domain, the mixed set and (given switch_set) the switch
    set (member_names: all members, module-major); baselines: the tracking baselines'
    settings (`tune`; None: their untuned defaults)."""
    baselines = baselines or BaselineSettings()
    was_training = [m.model.training for m in members]
    for m in members:
        m.model.eval()
    if merger is not None:
        merger.eval()
    try:
        score = lambda batches: _score(members, merger, batches, prefix_tokens, exchange, device, autocast,  # noqa: E731
                                       baselines)
        per_token = {domain: score(batches) for domain, batches in val_sets.items()}
        switch = score(switch_set) if switch_set else None
    finally:
        for m, t in zip(members, was_training):
            m.model.train(t)
        if merger is not None:
            merger.train()
    seq_len = next(iter(val_sets.values()))[0][1].shape[1]
    return EvalResult(
        rows=row_order(list(member_names), merger is not None),
        columns=build_columns(per_token, seq_len, prefix_tokens, switch),
        seq_len=seq_len,
        prefix_tokens=prefix_tokens,
        baselines=baselines,
    )


def _score(
    members: Sequence[Member],
    merger: nn.Module | None,
    batches: list[Batch],
    prefix_tokens: int,
    exchange: Exchange,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    baselines: BaselineSettings,
) -> torch.Tensor:
    """Every row's per-token log-probs (N, T, R) on the N windows of `batches` (on the CPU)."""
    parts = []
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        residual = merger is not None and merger.residual
        with autocast():
            local = rank_outputs(members, x, y, members_grad=False, full_logprobs=residual)
            outputs = gather_outputs(local, exchange)
            merged_lp = None
            if merger is not None:
                rows = exchange.rows(x.shape[0])
                mine, _ = merged_logprobs(merger, rows_outputs(outputs, local, rows, exchange), y[rows])  # (b, T, 2)
                merged_lp = exchange.gather_rows(mine.contiguous(), x.shape[0])  # (B, T, 2)
        member_lp = outputs.target_logprobs.float().permute(1, 2, 0)  # (B, T, M)
        parts.append(row_logprobs(member_lp, merged_lp, prefix_tokens, baselines).cpu())  # (B, T, R)
    return torch.cat(parts, dim=0)


def rows_outputs(outputs: MemberOutputs, local: MemberOutputs, rows: slice, exchange: Exchange) -> MemberOutputs:
    """Every member's outputs on this rank's rows R_r, (M, |R_r|, ...), from the gathered ones
    (`gather_outputs`); with the residual, the full log-probs (only these rows: (M, |R_r|, T, V),
    not every row's) come by one all-to-all of the rank's own (`Exchange.exchange_rows`)."""
    target_lp = None if outputs.target_logprobs is None else outputs.target_logprobs[:, rows]
    logprobs = None if local.logprobs is None else exchange.exchange_rows(local.logprobs)
    return MemberOutputs(states=outputs.states[:, rows], target_logprobs=target_lp, logprobs=logprobs)
