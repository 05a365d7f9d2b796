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

Columns: each domain's val split, the mixed val set, and the domain-switch
set. Every domain is scored on the same fixed number of windows k and the
mixed set is all of them, so the mixed loss is the mean of the domains'
losses. The switch set (`leviathan.data.shards.switch_batches`) holds windows whose
first half comes from one domain and second half from another, for every
ordered pair of domains (fixed seed): per-token routing matters most where
the domain changes mid-context.

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

from leviathan.data.shards import eval_batches, switch_batches
from leviathan.data.staging import PreparedData
from leviathan.model.ensemble import LeviathanEnsemble, merge_members, run_members
from leviathan.run.names import MIXED, RUNNING_POSTERIOR, SWITCH, row_order
from leviathan.run.report import build_report, format_report, row  # noqa: F401  (the report's API, re-exported)


class EvaluationError(ValueError):
    """Evaluation settings or data that cannot be used; the message names the problem."""


@dataclass
class _Scores:
    """Summed negative log-likelihood per row and eval window of one domain.

    nll: (R, N) float64, R rows (merged, members..., uniform, posterior), N windows.
    """

    nll: torch.Tensor
    tokens_per_window: int
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


def score_windows(member_lp: torch.Tensor, merged_lp: torch.Tensor | None, prefix_tokens: int) -> torch.Tensor:
    """The one scoring function: per-token log-probs of a set of windows -> each row's NLL per window.

    member_lp: (N, T, M) log p_m(y_t | y_<t) of every member; merged_lp: (N, T)
    the merged model's, or None when there is no merger yet. Rows, in
    `row_names` order: merged (when given), the members, then the mixtures of
    the members (`mix_members`). A new row is one more (N, T) log-prob derived
    here; a new column is one more set of windows. Returns (R, N) float64:
    -sum_{t >= P} log p_row(y_t) for every window (the dev prefix t < P is
    excluded from every row, so all rows are scored on the same tokens).
    """
    uniform_lp, posterior_lp, _ = mix_members(member_lp, prefix_tokens)
    running_lp, _ = running_posterior(member_lp)
    rows = [member_lp, uniform_lp.unsqueeze(-1), posterior_lp.unsqueeze(-1), running_lp.unsqueeze(-1)]
    if merged_lp is not None:
        rows.insert(0, merged_lp.unsqueeze(-1))
    per_token = torch.cat(rows, dim=-1)  # (N, T, R)
    return -per_token[:, prefix_tokens:].double().sum(dim=1).T  # (R, N)


def column_nll(
    nll_by_domain: dict[str, torch.Tensor], switch_nll: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Summed NLL per row (R,) of every column: each domain, the mixed set, then the switch set.

    Every domain is scored on the same fixed number of windows k (the fewest
    any domain gave: its first k), and the mixed set is all of them, so a
    mixed-set loss is exactly the mean of the domains' losses. switch_nll
    (R, N_switch): every switch window (the column is left out when None).
    Returns ({column: (R,) summed NLL}, k).
    """
    k = min(n.shape[1] for n in nll_by_domain.values())
    sums = {d: n[:, :k].sum(dim=1) for d, n in nll_by_domain.items()}
    sums[MIXED] = sum(sums.values())
    if switch_nll is not None:
        sums[SWITCH] = switch_nll.sum(dim=1)
    return sums, k


@torch.no_grad()
def score_batch(
    ensemble: LeviathanEnsemble, x: torch.Tensor, y: torch.Tensor, prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score one batch of windows with every row of the table.

    x, y: (B, T) int64, y = x shifted by one. Each member runs once
    (`run_members`): its hidden states feed both its own LM head and (through
    its projection) the merger.

    Returns (nll (R, B) summed over the scored positions P..T-1 of each window,
    posterior weights (B, M), running posterior and merger weights (M,) each
    averaged over batch, time (and heads)).
    """
    outputs = run_members(ensemble.members, ensemble.projections, x, y)
    merged = merge_members(ensemble.merger, outputs, y)
    member_lp = outputs.target_logprobs.permute(1, 2, 0)  # (B, T, M)
    nll = score_windows(member_lp, merged.target_logprobs, prefix_tokens)
    _, _, log_w = mix_members(member_lp, prefix_tokens)
    running_w = running_posterior(member_lp)[1].exp().mean(dim=(0, 1))  # (M,)
    merger_w = merged.weights.float().mean(dim=(0, 1, 3))  # (M,)
    return nll.cpu(), log_w.exp().cpu(), running_w.cpu(), merger_w.cpu()


def _score_batches(
    ensemble: LeviathanEnsemble, batches: list[tuple[torch.Tensor, torch.Tensor]], prefix_tokens: int, device: torch.device
) -> _Scores:
    nlls, post, running, merger = [], [], [], []
    for x, y in batches:
        x = torch.as_tensor(x, dtype=torch.long, device=device)  # (B, T)
        y = torch.as_tensor(y, dtype=torch.long, device=device)  # (B, T)
        nll, w, rw, mw = score_batch(ensemble, x, y, prefix_tokens)
        nlls.append(nll)
        post.append(w)
        running.append(rw * x.shape[0])
        merger.append(mw * x.shape[0])
    n_windows = sum(n.shape[1] for n in nlls)
    return _Scores(
        nll=torch.cat(nlls, dim=1),
        tokens_per_window=batches[0][0].shape[1] - prefix_tokens,
        posterior_weights=torch.cat(post, dim=0),
        running_weights=torch.stack(running).sum(dim=0) / n_windows,
        merger_weights=torch.stack(merger).sum(dim=0) / n_windows,
    )


def switch_scored_tokens(seq_len: int, prefix_tokens: int) -> tuple[int, int]:
    """How many scored targets (P..T-1) of a switch window come from its first and second
    domain: target t is token t + 1 of the window, from the first domain when t + 1 < T // 2."""
    first = max(0, seq_len // 2 - 1 - prefix_tokens)
    return first, seq_len - prefix_tokens - first


def column_sizes(
    bytes_per_token: dict[str, float], windows_per_domain: int, seq_len: int, prefix_tokens: int, switch_windows: int
) -> tuple[dict[str, int], dict[str, float]]:
    """Scored tokens and their source bytes per column (each domain, mixed, and switch when
    `switch_windows` > 0): every domain is scored on `windows_per_domain` windows of
    seq_len - prefix_tokens targets; bytes are tokens times the domain's val bytes per token."""
    domains = list(bytes_per_token)
    scored = seq_len - prefix_tokens
    tokens = {d: windows_per_domain * scored for d in domains}
    nbytes = {d: tokens[d] * bytes_per_token[d] for d in domains}
    tokens[MIXED] = sum(tokens[d] for d in domains)
    nbytes[MIXED] = sum(nbytes[d] for d in domains)
    if switch_windows:
        # Every ordered pair has the same number of windows: each domain is first (and second) in D - 1 pairs.
        first, second = switch_scored_tokens(seq_len, prefix_tokens)
        per_domain = switch_windows // len(domains)
        tokens[SWITCH] = switch_windows * scored
        nbytes[SWITCH] = sum(per_domain * (first + second) * bytes_per_token[d] for d in domains)
    return tokens, nbytes


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
) -> dict[str, Any]:
    """Evaluate every row of the table on every domain's val split and the mixed set.

    domains: in module order (module i trained on domains[i]); default: the
    manifest's first `modules` domains. Each domain is evaluated on the same
    deterministic windows (`eval_batches`: at most `max_batches` batches of
    `batch_size` windows of `seq_len` targets). prefix_tokens (default
    seq_len // 4) is the posterior's dev prefix P, excluded from every row's
    scored tokens. Every column uses the first k windows of every domain,
    k = the smallest number of windows any domain gave (`column_nll`); with
    two or more domains the switch column scores `switch_batches` of the val
    splits, on the same positions.

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

    if device is None:
        device = next(ensemble.parameters()).device
    device = torch.device(device)
    was_training = ensemble.training
    ensemble.to(device).eval()
    shards = [manifest.shard(d, "val") for d in domains]
    try:
        scores = {
            d: _score_batches(ensemble, eval_batches(shard, batch_size, seq_len, max_batches), prefix_tokens, device)
            for d, shard in zip(domains, shards)
        }
        switch = None
        if len(domains) > 1:
            switch = _score_batches(ensemble, switch_batches(shards, batch_size, seq_len), prefix_tokens, device)
    finally:
        ensemble.train(was_training)

    names = row_names(ensemble, merged)
    if not merged:
        scores = {d: _drop_merged(sc) for d, sc in scores.items()}
        switch = None if switch is None else _drop_merged(switch)
    member_modules = {n: cfg.module_of(i) for i, n in enumerate(ensemble.member_names)}
    bpt = {d: manifest.bytes_per_token(d, "val") for d in domains}
    sums, k = column_nll({d: s.nll for d, s in scores.items()}, None if switch is None else switch.nll)
    switch_windows = 0 if switch is None else switch.nll.shape[1]
    tokens, nbytes = column_sizes(bpt, k, seq_len, prefix_tokens, switch_windows)

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
        nll={c: v.tolist() for c, v in sums.items()},
        tokens=tokens,
        nbytes=nbytes,
        weights=weights,
        evidence=evidence_settings(ensemble.merger) if merged else None,
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
            "switch_windows": switch_windows,
        },
    )


def _drop_merged(scores: _Scores) -> _Scores:
    """The scores without the merged row (row 0): a report of an ensemble whose merger never trained."""
    return _Scores(scores.nll[1:], scores.tokens_per_window, scores.posterior_weights, scores.running_weights,
                   scores.merger_weights)


def evidence_settings(merger: Any) -> dict[str, list[float]] | None:
    """The merger's learned evidence weights per head, {"beta": [...], "gamma": [...]} (None without evidence)."""
    if not merger.evidence:
        return None
    return {"beta": merger.beta.detach().cpu().tolist(), "gamma": merger.gamma().detach().cpu().tolist()}
