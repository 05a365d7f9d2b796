"""Evaluation of a trained ensemble: loss, perplexity and bits per byte.

Rows of the table (what the merged model is compared with, DESIGN section 4):

- ``merged``: the ensemble itself (members -> projections -> merger).
- every member alone, ``m{module}.{slot}``, tagged with the domain its module trained on.
- ``uniform``: the probability mixture of the members with equal weights,
  ``p(y) = (1/M) * sum_m p_m(y)``.
- ``posterior``: a Branch-Train-Merge style mixture (Li et al. 2022): each eval
  window's first ``prefix_tokens`` target positions are a dev prefix; the member
  weights for that window are the Bayes posterior over members given the prefix
  with a uniform prior, ``w_m = softmax_m(sum_{t < P} log p_m(y_t | y_<t))``,
  and the rest of the window is scored with ``p(y_t) = sum_m w_m p_m(y_t)``.
- ``running posterior``: the causal per-token Bayes posterior over members with
  a uniform prior, ``w_m[t] = softmax_m(sum_{s < t} log p_m(y_s | y_<s))``,
  ``p(y_t) = sum_m w_m[t] p_m(y_t)``: no dev prefix, it updates at every token.
- ``fixed share`` and ``decayed posterior``: the classic expert-tracking mixtures
  (`leviathan.baselines`), their settings tuned on train-split windows
  (`tuning_batches`), recorded in the report's ``baselines``.
- ``merged (no state)``: the trained merger with its state term (the correlation
  of the members' projected states) zeroed, its evidence term alone
  (`no_state_weights`): what the learned correlation adds. A residual merger
  keeps its logit correction in this row (read with those weights).

"Best baseline" is, per column, the best of the training-free rows (uniform,
both posteriors, fixed share, decayed posterior); the report gives merged minus
it with a paired bootstrap 95% CI over windows (`merged_gaps`).

Columns: each domain's val split, the mixed val set, and the domain-switch
set. Every domain is scored on the same fixed number of windows k and the
mixed set is all of them, so the mixed loss is the mean of the domains'
losses. The switch set (`leviathan.data.shards.switch_batches`) holds 32
windows per ordered pair of domains that change domain at a cut drawn in
[T/4, 3T/4] (fixed seed): per-token routing matters most where the domain
changes mid-context. Its scored targets are split at the cut: ``switch`` is
the loss after it, ``switch pre`` before it.

One scoring function, `score_windows`, turns per-token log-probabilities into
every row's figures. It runs here in one process and, on the same windows,
distributed on the training workers (cluster.evaluation), so the training log,
the final table and this report give the same number for the same thing.

Which tokens are scored: every eval window has T target positions; positions
``0 .. P-1`` (P = ``prefix_tokens``) are the posterior's dev prefix and are
excluded from the scored tokens of *every* row, so all rows are measured on
exactly the same tokens. They stay in every model's context.

Metrics, per row and column, over the N scored tokens and their byte count:

    loss = (1/N) * sum_t -ln p(y_t)                  (nats per token)
    ppl  = exp(loss)
    bpb  = loss * (tokens / bytes) / ln 2             (bits per byte)

``tokens / bytes`` of a domain comes from the manifest's val split (its token
and byte counts), so byte-level and BPE runs are compared on the same scale.
For the mixed set the byte count is the sum over domains of
``scored tokens_d * bytes_per_token_d``.

Pure PyTorch: no Ray, usable from a notebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from leviathan.baselines import BaselineSettings, decayed_posterior, fixed_share, tune_baselines
from leviathan.data.shards import (
    TokenShard, dev_batches, eval_batches, switch_batches, switch_cuts, switch_pairs, train_part,
)
from leviathan.data.staging import PreparedData
from leviathan.model.ensemble import LeviathanEnsemble, MemberOutputs, input_logprobs, merge_members, run_members
from leviathan.run.names import BASELINES, MERGED, MIXED, RUNNING_POSTERIOR, SWITCH, SWITCH_PRE, row_order  # noqa: F401
from leviathan.run.report import build_report, format_report, row  # noqa: F401  (the report's API, re-exported)


class EvaluationError(ValueError):
    """Evaluation settings or data that cannot be used; the message names the problem."""


@dataclass
class _Scores:
    """Every row's log-probs of one set of windows.

    per_token: (N, T, R) float32 log p_row(y_t), R rows in `row_names` order, N windows.
    """

    per_token: torch.Tensor
    posterior_weights: torch.Tensor  # (N, M): each window's posterior over members
    running_weights: torch.Tensor  # (M,): the running posterior's mean weight per member
    merger_weights: torch.Tensor  # (M,): the merger's mean routing weight per member


def row_names(ensemble: LeviathanEnsemble, merged: bool = True) -> list[str]:
    """Row order of every table: merged, the members (module-major), uniform, the two posteriors."""
    return row_order(list(ensemble.member_names), merged)


def mix_members(member_lp: torch.Tensor, prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The uniform and the posterior mixtures from the members' target log-probs.

    member_lp: (B, T, M), log p_m(y_t | y_<t) of every member at every target.
    uniform:   log (1/M) sum_m p_m(y_t)                                   (B, T)
    posterior: log sum_m w_m p_m(y_t), with per-window weights
               log w_m = log_softmax_m sum_{t < P} log p_m(y_t)           (B, M)
    (Bayes rule on the window's first P targets, uniform prior; P = 0 gives
    uniform weights.) Returns (uniform (B, T), posterior (B, T), log_w (B, M)).
    """
    M = member_lp.shape[-1]
    uniform_lp = torch.logsumexp(member_lp, dim=-1) - math.log(M)  # (B, T)
    log_w = F.log_softmax(member_lp[:, :prefix_tokens].sum(dim=1), dim=-1)  # (B, M)
    posterior_lp = torch.logsumexp(member_lp + log_w.unsqueeze(1), dim=-1)  # (B, T)
    return uniform_lp, posterior_lp, log_w


def running_posterior(member_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal per-token Bayes posterior mixture, uniform prior, from member_lp (B, T, M).

    log w_m[t] = log_softmax_m sum_{s < t} log p_m(y_s)        (B, T, M), uniform at t = 0
    log p(y_t) = logsumexp_m (log w_m[t] + log p_m(y_t))        (B, T)
    Returns (log p (B, T), log w (B, T, M)).
    """
    seen = F.pad(member_lp, (0, 0, 1, 0))[:, :-1].cumsum(dim=1)  # (B, T, M): sum_{s<t}
    log_w = F.log_softmax(seen, dim=-1)
    return torch.logsumexp(log_w + member_lp, dim=-1), log_w


def default_prefix_tokens(seq_len: int) -> int:
    """The dev prefix P every evaluation excludes unless told otherwise: a quarter of the window."""
    return seq_len // 4


def no_state_weights(merger: Any, member_lp: torch.Tensor) -> torch.Tensor:
    """The merger's weights (B, T, M, H) with its state term zeroed: the correlation score of the
    members' projected states (q . k, every lag) is 0, so only the evidence term is left,
    w[t, m, h] = softmax_m beta_h e_m[t, h] (without evidence: uniform). member_lp: (B, T, M)."""
    B, T, M = member_lp.shape
    if not merger.evidence:
        return member_lp.new_full((B, T, M, merger.n_head), 1.0 / M)
    return torch.softmax(merger.evidence_term(input_logprobs(member_lp)), dim=2)


def merged_logprobs(
    merger: Any, outputs: MemberOutputs, targets: torch.Tensor, rows: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged rows' target log-probs (b, T, 2): the merger, then the merger with its state
    term zeroed (`no_state_weights`, same merge otherwise: a residual merger keeps its correction,
    read with those weights); and the merger's weights (b, T, M, H). A residual merger needs
    `outputs.logprobs` (the members' full log-probs)."""
    out = merge_members(merger, outputs, targets, rows)
    member_lp = outputs.target_logprobs[:, rows].permute(1, 2, 0)  # (b, T, M)
    ablated = merge_members(merger, outputs, targets, rows, weights=no_state_weights(merger, member_lp))
    return torch.stack([out.target_logprobs, ablated.target_logprobs], dim=-1), out.weights


def row_logprobs(
    member_lp: torch.Tensor,
    merged_lp: torch.Tensor | None,
    prefix_tokens: int,
    baselines: BaselineSettings | None = None,
) -> torch.Tensor:
    """Every row's per-token log-probs (N, T, R) from the members' (N, T, M).

    merged_lp: (N, T, K) the merged rows' (`merged_logprobs`: merged, merged (no
    state)), or None when there is no merger yet. Rows, in `row_names` order: the
    merged rows, the members, then the training-free mixtures of the members
    (`mix_members`, `running_posterior`, and fixed share and the decayed posterior
    with `baselines`' settings, `leviathan.baselines`). A new row is one more (N, T)
    log-prob derived here.
    """
    b = baselines or BaselineSettings()
    member_lp = member_lp.float()
    uniform_lp, posterior_lp, _ = mix_members(member_lp, prefix_tokens)
    running_lp, _ = running_posterior(member_lp)
    rows = [member_lp, uniform_lp, posterior_lp, running_lp, fixed_share(member_lp, b.alpha),
            decayed_posterior(member_lp, b.beta, b.gamma)]
    if merged_lp is not None:
        rows.insert(0, merged_lp.float() if merged_lp.dim() == 3 else merged_lp.float().unsqueeze(-1))
    return torch.cat([r if r.dim() == 3 else r.unsqueeze(-1) for r in rows], dim=-1)


def window_nll(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(R, N) float64: -sum over the positions `mask` (N, T) of every row's log-probs (N, T, R)."""
    return -(per_token.double() * mask.to(per_token.device).unsqueeze(-1)).sum(dim=1).T.cpu()


def prefix_mask(n: int, seq_len: int, prefix_tokens: int) -> torch.Tensor:
    """(n, T) bool: the scored positions P..T-1 of every window."""
    return (torch.arange(seq_len) >= prefix_tokens).expand(n, seq_len)


def switch_masks(cuts: torch.Tensor, seq_len: int, prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(after, before) (W, T) bool: the scored targets (t >= P) of every switch window that come
    from its second domain and from its first. Target t is token t + 1 of the window, from the
    first domain when t + 1 < cut."""
    t = torch.arange(seq_len)
    scored = t >= prefix_tokens
    before = t[None, :] < (torch.as_tensor(cuts)[:, None] - 1)
    return scored & ~before, scored & before


def switch_cuts_for(num_domains: int, windows: int, seq_len: int) -> torch.Tensor:
    """The cuts of a switch set of `windows` windows (`switch_batches`, every ordered pair alike)."""
    per_pair = windows // (num_domains * (num_domains - 1))
    return torch.from_numpy(switch_cuts(num_domains, seq_len, per_pair))


def score_windows(
    member_lp: torch.Tensor, merged_lp: torch.Tensor | None, prefix_tokens: int,
    baselines: BaselineSettings | None = None,
) -> torch.Tensor:
    """Each row's NLL per window (R, N) float64 on positions P..T-1 (`row_logprobs`, `window_nll`):
    the dev prefix t < P is excluded from every row, so all rows are scored on the same tokens."""
    N, T, _ = member_lp.shape
    return window_nll(row_logprobs(member_lp, merged_lp, prefix_tokens, baselines), prefix_mask(N, T, prefix_tokens))


@dataclass
class Columns:
    """Every column's per-window figures: nll column -> (R, N_c) float64, tokens column -> (N_c,)
    scored tokens of each window. Columns: each domain (its first k windows), the mixed set
    (all of them), the switch set after its cuts (`switch`) and before them (`switch pre`)."""

    nll: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor]
    windows_per_domain: int

    def sums(self) -> dict[str, list[float]]:
        return {c: v.sum(dim=1).tolist() for c, v in self.nll.items()}

    def token_counts(self) -> dict[str, int]:
        return {c: int(v.sum()) for c, v in self.tokens.items()}

    @property
    def switch_windows(self) -> int:
        return int(self.tokens[SWITCH].shape[0]) if SWITCH in self.tokens else 0


def build_columns(
    by_domain: dict[str, torch.Tensor],
    seq_len: int,
    prefix_tokens: int,
    switch_per_token: torch.Tensor | None = None,
) -> Columns:
    """The columns from each domain's per-token row log-probs (N_d, T, R) and the switch set's.

    Every domain is scored on the same fixed number of windows k (the fewest any
    domain gave: its first k), and the mixed set is all of them, so a mixed-set
    loss is exactly the mean of the domains' losses.
    """
    k = min(v.shape[0] for v in by_domain.values())
    nll, tokens = {}, {}
    mask = prefix_mask(k, seq_len, prefix_tokens)
    for d, per_token in by_domain.items():
        nll[d], tokens[d] = window_nll(per_token[:k], mask), mask.sum(dim=1)
    nll[MIXED] = torch.cat([nll[d] for d in by_domain], dim=1)
    tokens[MIXED] = torch.cat([tokens[d] for d in by_domain])
    if switch_per_token is not None:
        cuts = switch_cuts_for(len(by_domain), switch_per_token.shape[0], seq_len)
        for column, m in zip((SWITCH, SWITCH_PRE), switch_masks(cuts, seq_len, prefix_tokens)):
            nll[column], tokens[column] = window_nll(switch_per_token, m), m.sum(dim=1)
    return Columns(nll, tokens, k)


def column_bytes(columns: Columns, bytes_per_token: dict[str, float]) -> dict[str, float]:
    """Source bytes of every column's scored tokens: a domain's tokens times its val bytes per
    token; a switch window's tokens after the cut count as its second domain's, before as its first's."""
    domains = list(bytes_per_token)
    out = {d: float(columns.tokens[d].sum()) * bytes_per_token[d] for d in domains}
    out[MIXED] = sum(out[d] for d in domains)
    if SWITCH in columns.tokens:
        pairs = switch_pairs(len(domains), columns.switch_windows // (len(domains) * (len(domains) - 1)))
        for column, side in ((SWITCH, 1), (SWITCH_PRE, 0)):
            bpt = torch.tensor([bytes_per_token[domains[p[side]]] for p in pairs], dtype=torch.float64)
            out[column] = float((columns.tokens[column].double() * bpt).sum())
    return out


BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def merged_gaps(columns: Columns, rows: list[str], resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, Any]]:
    """Per column: the merged loss minus the best training-free baseline's (`names.BASELINES`,
    the lowest loss on that column), with a paired bootstrap 95% CI over windows: `resamples`
    draws of the column's windows with replacement (seeded), the gap of each draw its summed
    NLL difference over its scored tokens, the CI the 2.5th and 97.5th percentiles.
    Empty without a merged row."""
    if MERGED not in rows:
        return {}
    merged = rows.index(MERGED)
    baselines = [rows.index(b) for b in BASELINES]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for column, nll in columns.nll.items():
        tokens = columns.tokens[column].double()
        if tokens.sum() == 0:
            continue
        best = min(baselines, key=lambda r: float(nll[r].sum()))
        diff = nll[merged] - nll[best]  # (N,)
        idx = torch.randint(0, diff.shape[0], (resamples, diff.shape[0]), generator=g)
        draws = diff[idx].sum(dim=1) / tokens[idx].sum(dim=1).clamp(min=1)
        low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=draws.dtype)).tolist()
        out[column] = {"best_baseline": rows[best], "gap": float(diff.sum() / tokens.sum()),
                       "ci95": [low, high], "windows": int(diff.shape[0])}
    return out


TUNING_SWITCH_PER_PAIR = 8


def tuning_batches(
    train_shards: list[TokenShard], batch_size: int, seq_len: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The windows the baselines are tuned on, all from the train split (never val, never its
    dev tail): every domain's `eval_batches` of its train shard's `train_part`, and with two or
    more domains the `switch_batches` cut from those parts."""
    train_shards = [train_part(s) for s in train_shards]
    # Three settings need far fewer windows than the val set: a quarter of its batches and a
    # quarter of its switch windows keep the closing evaluation cheap.
    batches = [b for shard in train_shards for b in eval_batches(shard, batch_size, seq_len, max(1, max_batches // 4))]
    if len(train_shards) > 1:
        batches += switch_batches(train_shards, batch_size, seq_len, per_pair=TUNING_SWITCH_PER_PAIR)
    return batches


@torch.no_grad()
def _batch_logprobs(
    ensemble: LeviathanEnsemble, x: torch.Tensor, y: torch.Tensor, prefix_tokens: int,
    baselines: BaselineSettings | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every row's per-token log-probs (B, T, R) of one batch, posterior weights (B, M), and
    the running posterior's and merger's weights (M,), each averaged over batch, time (and heads)."""
    # A residual merger corrects the mixture over the vocabulary: it needs the full log-probs.
    outputs = run_members(ensemble.members, ensemble.projections, x, y, full_logprobs=ensemble.merger.residual)
    merged_lp, merged_w = merged_logprobs(ensemble.merger, outputs, y)
    member_lp = outputs.target_logprobs.permute(1, 2, 0)  # (B, T, M)
    per_token = row_logprobs(member_lp, merged_lp, prefix_tokens, baselines)
    _, _, log_w = mix_members(member_lp, prefix_tokens)
    running_w = running_posterior(member_lp)[1].exp().mean(dim=(0, 1))  # (M,)
    merger_w = merged_w.float().mean(dim=(0, 1, 3))  # (M,)
    return per_token.cpu(), log_w.exp().cpu(), running_w.cpu(), merger_w.cpu()


def score_batch(
    ensemble: LeviathanEnsemble, x: torch.Tensor, y: torch.Tensor, prefix_tokens: int,
    baselines: BaselineSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score one batch of windows with every row of the table.

    x, y: (B, T) int64, y = x shifted by one. Each member runs once
    (`run_members`): its hidden states feed both its own LM head and (through
    its projection) the merger.

    Returns (nll (R, B) summed over the scored positions P..T-1 of each window,
    posterior weights (B, M), running posterior and merger weights (M,) each
    averaged over batch, time (and heads)).
    """
    per_token, *weights = _batch_logprobs(ensemble, x, y, prefix_tokens, baselines)
    B, T = y.shape
    return (window_nll(per_token, prefix_mask(B, T, prefix_tokens)), *weights)


def _score_batches(
    ensemble: LeviathanEnsemble, batches: list[tuple[torch.Tensor, torch.Tensor]], prefix_tokens: int,
    device: torch.device, baselines: BaselineSettings | None,
) -> _Scores:
    lps, post, running, merger = [], [], [], []
    for x, y in batches:
        x = torch.as_tensor(x, dtype=torch.long, device=device)  # (B, T)
        y = torch.as_tensor(y, dtype=torch.long, device=device)  # (B, T)
        lp, w, rw, mw = _batch_logprobs(ensemble, x, y, prefix_tokens, baselines)
        lps.append(lp)
        post.append(w)
        running.append(rw * x.shape[0])
        merger.append(mw * x.shape[0])
    n_windows = sum(lp.shape[0] for lp in lps)
    return _Scores(
        per_token=torch.cat(lps, dim=0),
        posterior_weights=torch.cat(post, dim=0),
        running_weights=torch.stack(running).sum(dim=0) / n_windows,
        merger_weights=torch.stack(merger).sum(dim=0) / n_windows,
    )


@torch.no_grad()
def tune_on_train(
    ensemble: LeviathanEnsemble, manifest: PreparedData, domains: list[str], batch_size: int, seq_len: int,
    max_batches: int, prefix_tokens: int, device: torch.device,
) -> BaselineSettings:
    """`tune_baselines` on the members' target log-probs of the train split's `tuning_batches`."""
    lps = []
    for x, y in tuning_batches([manifest.shard(d, "train") for d in domains], batch_size, seq_len, max_batches):
        out = run_members(ensemble.members, ensemble.projections, x.to(device), y.to(device), members_grad=False)
        lps.append(out.target_logprobs.permute(1, 2, 0).float().cpu())
    return tune_baselines(torch.cat(lps), prefix_tokens)


def evaluate_ensemble(
    ensemble: LeviathanEnsemble,
    manifest: PreparedData,
    domains: list[str] | None = None,
    *,
    merged: bool = True,
    batch_size: int = 8,
    seq_len: int = 128,
    max_batches: int = 4,
    prefix_tokens: int | None = None,
    device: str | torch.device | None = None,
    baselines: BaselineSettings | None = None,
    split: str = "val",
) -> dict[str, Any]:
    """Evaluate every row of the table on every domain's val split and the mixed set.

    domains: in module order (module i trained on domains[i]); default: the
    manifest's first `modules` domains. Each domain is evaluated on the same
    deterministic windows (`eval_batches`: at most `max_batches` batches of
    `batch_size` windows of `seq_len` targets). prefix_tokens (default
    seq_len // 4) is the posterior's dev prefix P, excluded from every row's
    scored tokens. Every column uses the first k windows of every domain,
    k = the smallest number of windows any domain gave (`build_columns`); with
    two or more domains the switch column scores `switch_batches` of the val
    splits, on the same positions.

    split: "val" (the run's figures) or "dev" (the same windows cut from the dev
    tail of every train shard, `leviathan.data.shards.dev_batches`: what recipe
    choices are made on). baselines: the settings of fixed share and the decayed posterior; None tunes
    them on the train split (`tune_on_train`, the windows a training run tunes on).

    merged=False leaves the merged row out (an ensemble whose merger never trained:
    phase2_steps = 0), and with it the merger's weights and evidence.

    Returns a JSON-safe dict (the content of report.json, `leviathan.run.report.build_report`): `columns`, `rows`
    (name, kind, domain, and loss/ppl/bpb per column), scored `tokens` and
    `bytes_per_token` per column, the mean `posterior_weights` and
    `merger_weights` per domain and member, and the `settings` used.
    """
    cfg = ensemble.config
    if domains is None:
        domains = list(manifest.domains[: cfg.modules])
    domains = list(domains)
    if len(domains) < cfg.modules:
        raise EvaluationError(
            f"domains: {len(domains)} domains for {cfg.modules} modules ({', '.join(domains)})"
        )
    unknown = [d for d in domains if d not in manifest.domains]
    if unknown:
        raise EvaluationError(f"domains: {unknown} not in manifest (has {manifest.domains})")
    if manifest.vocab_size != cfg.vocab_size:
        raise EvaluationError(
            f"manifest: vocab_size {manifest.vocab_size} does not match the ensemble's {cfg.vocab_size}"
        )
    if prefix_tokens is None:
        prefix_tokens = default_prefix_tokens(seq_len)
    if seq_len < 2 or seq_len > cfg.block_size:
        raise EvaluationError(f"seq_len: {seq_len} must be in 2..{cfg.block_size} (the members' block size)")
    if not 0 <= prefix_tokens < seq_len:
        raise EvaluationError(f"prefix_tokens: {prefix_tokens} must be in 0..{seq_len - 1}")
    if batch_size < 1 or max_batches < 1:
        raise EvaluationError(f"batch_size and max_batches must be >= 1, got {batch_size}, {max_batches}")
    if split not in ("val", "dev"):
        raise EvaluationError(f"split: must be 'val' or 'dev', got {split!r}")

    if device is None:
        device = next(ensemble.parameters()).device
    device = torch.device(device)
    was_training = ensemble.training
    ensemble.to(device).eval()
    if split == "val":
        shards = [manifest.shard(d, "val") for d in domains]
        domain_sets = [eval_batches(shard, batch_size, seq_len, max_batches) for shard in shards]
        switch_set = switch_batches(shards, batch_size, seq_len) if len(domains) > 1 else None
    else:
        domain_sets, switch_set = dev_batches([manifest.shard(d, "train") for d in domains], batch_size, seq_len,
                                              max_batches)
    try:
        if baselines is None:
            baselines = tune_on_train(ensemble, manifest, domains, batch_size, seq_len, max_batches, prefix_tokens, device)
        scores = {
            d: _score_batches(ensemble, batches, prefix_tokens, device, baselines)
            for d, batches in zip(domains, domain_sets)
        }
        switch = None if switch_set is None else _score_batches(ensemble, switch_set, prefix_tokens, device, baselines)
    finally:
        ensemble.train(was_training)

    names = row_names(ensemble, merged)
    if not merged:
        scores = {d: _drop_merged(sc) for d, sc in scores.items()}
        switch = None if switch is None else _drop_merged(switch)
    member_modules = {n: cfg.module_of(i) for i, n in enumerate(ensemble.member_names)}
    bpt = {d: manifest.bytes_per_token(d, "val" if split == "val" else "train") for d in domains}
    columns = build_columns({d: s.per_token for d, s in scores.items()}, seq_len, prefix_tokens,
                            None if switch is None else switch.per_token)
    k = columns.windows_per_domain

    members = ensemble.member_names
    weights = {
        "posterior_weights": {
            d: dict(zip(members, s.posterior_weights.mean(dim=0).tolist())) for d, s in scores.items()
        },
        "running_posterior_weights": {d: dict(zip(members, s.running_weights.tolist())) for d, s in scores.items()},
    }
    if merged:
        weights["merger_weights"] = {d: dict(zip(members, s.merger_weights.tolist())) for d, s in scores.items()}
    return build_report(
        rows=names,
        member_modules=member_modules,
        domains=domains,
        nll=columns.sums(),
        tokens=columns.token_counts(),
        nbytes=column_bytes(columns, bpt),
        weights=weights,
        evidence=evidence_settings(ensemble.merger) if merged else None,
        baselines=baselines.to_dict(),
        gaps=merged_gaps(columns, names),
        settings={
            "batch_size": batch_size,
            "seq_len": seq_len,
            "max_batches": max_batches,
            "prefix_tokens": prefix_tokens,
            "scored_tokens_per_window": seq_len - prefix_tokens,
            "windows_per_domain": k,
            "windows": {d: k for d in domains},
            "merge": cfg.merge,
            "mixer": cfg.mixer,
            "residual": cfg.residual,
            "switch_windows": columns.switch_windows,
            "split": split,
        },
    )


def _drop_merged(scores: _Scores) -> _Scores:
    """The scores without the merged rows (merged, merged (no state)): a report of an ensemble
    whose merger never trained."""
    return _Scores(scores.per_token[..., 2:], scores.posterior_weights, scores.running_weights,
                   scores.merger_weights)


def evidence_settings(merger: Any) -> dict[str, list[float]] | None:
    """The merger's learned evidence weights per head, {"beta": [...], "gamma": [...]} (None without evidence)."""
    if not merger.evidence:
        return None
    return {"beta": merger.beta.detach().cpu().tolist(), "gamma": merger.gamma().detach().cpu().tolist()}
