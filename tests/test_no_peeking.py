"""No row of the table peeks: the weights a row uses at position t depend on y_<t only.

For the merger (full forward and the decode cache), its no-state ablation and every
training-free baseline, changing the target y_t must leave the weights at position t
(and before it) unchanged; for the merger (with and without the mixture's residual,
a logit correction over the vocabulary) the whole predicted distribution at t too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leviathan.baselines import decayed_log_weights, fixed_share_log_weights
from leviathan.config import ComponentConfig, EnsembleConfig
from leviathan.evaluation import mix_members, no_state_weights, row_logprobs, running_posterior
from leviathan.model.ensemble import LeviathanEnsemble, MergeCache, merge_members, run_members

B, T, V, P = 2, 12, 50, 3


MERGERS = ["mixture", "fusion", "residual"]  # residual: the mixture with its logit correction


def _ensemble(merge: str) -> LeviathanEnsemble:
    torch.manual_seed(0)
    member = ComponentConfig.preset("tiny", vocab_size=V, block_size=32, n_layer=1)
    residual = merge == "residual"
    config = EnsembleConfig(members=[member] * 2, modules=2, members_per_module=2,
                            merge="mixture" if residual else merge, merge_width=32, evidence=True, residual=residual)
    ens = LeviathanEnsemble(config).eval()
    with torch.no_grad():  # a state term, a decay, a lag window (and a correction) that all matter
        ens.merger.key.weight.normal_(std=0.3)
        if residual:
            ens.merger.res_head.weight.normal_(std=0.3)
        ens.merger.gamma_raw.copy_(torch.linspace(0.0, 1.0, ens.merger.n_head))
        if ens.merger.lag_weight is not None:
            ens.merger.lag_weight.normal_()
    return ens


def _change(y: torch.Tensor, t: int) -> torch.Tensor:
    y2 = y.clone()
    y2[:, t] = (y2[:, t] + 1 + torch.arange(y.shape[0])) % V
    return y2


def _tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    return x, torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("merge", MERGERS)
@torch.no_grad()
def test_merger_weights_at_t_ignore_y_t(merge):
    """The full forward: the merger (its weights and its predicted distribution) and its no-state ablation."""
    ens = _ensemble(merge)
    x, y = _tokens()
    base_out = ens(x, y, return_details=True)
    base = base_out.weights
    base_lp = run_members(ens.members, ens.projections, x, y).target_logprobs.permute(1, 2, 0)
    for t in range(T):
        y2 = _change(y, t)
        out = ens(x, y2, return_details=True)
        got = out.weights
        assert torch.equal(got[:, : t + 1], base[:, : t + 1]), f"merger weights at {t} read y_{t}"
        assert torch.equal(out.logits[:, : t + 1], base_out.logits[:, : t + 1]), f"merged logits at {t} read y_{t}"
        assert not torch.equal(got, base) or t == T - 1, "the evidence must read the earlier targets"
        lp2 = run_members(ens.members, ens.projections, x, y2).target_logprobs.permute(1, 2, 0)
        ablated, ablated2 = no_state_weights(ens.merger, base_lp), no_state_weights(ens.merger, lp2)
        assert torch.equal(ablated[:, : t + 1], ablated2[:, : t + 1]), f"no-state weights at {t} read y_{t}"


@pytest.mark.parametrize("merge", MERGERS)
@torch.no_grad()
def test_decode_cache_weights_at_t_ignore_the_next_token(merge):
    """Decoding one token at a time through MergeCache: the weights and the predicted distribution
    at step t equal the full forward's and do not change when the next token (y_t = x_{t+1}) does."""
    ens = _ensemble(merge)
    seq, _ = _tokens(2)

    def decoded(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        caches = [m.new_cache() for m in ens.members]
        merge_cache = MergeCache()
        weights, logits = [], []
        for t in range(tokens.shape[1]):
            step = tokens[:, t : t + 1]
            outputs = run_members(ens.members, ens.projections, step, full_logprobs=True, caches=caches)
            out = merge_members(ens.merger, outputs, cache=merge_cache, tokens=step)
            weights.append(out.weights)
            logits.append(out.logits)
        return torch.cat(weights, dim=1), torch.cat(logits, dim=1)  # (B, T, M, H), (B, T, V)

    base, base_logits = decoded(seq)
    full = ens(seq[:, :-1], seq[:, 1:], return_details=True)
    torch.testing.assert_close(base[:, :-1], full.weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base_logits[:, :-1], full.logits, atol=1e-4, rtol=1e-4)
    for t in range(T - 1):
        changed = seq.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % V  # y_t
        got, got_logits = decoded(changed)
        assert torch.equal(got[:, : t + 1], base[:, : t + 1]), f"decode weights at {t} read y_{t}"
        assert torch.equal(got_logits[:, : t + 1], base_logits[:, : t + 1]), f"decoded logits at {t} read y_{t}"


def _member_lp(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(2 * torch.randn(B, T, 3, 7, generator=g, dtype=torch.float64), dim=-1)[..., 0]


BASELINE_WEIGHTS = {
    "running posterior": lambda lp: running_posterior(lp)[1],
    "posterior": lambda lp: mix_members(lp, P)[2].unsqueeze(1).expand(-1, T, -1),
    "fixed share": lambda lp: fixed_share_log_weights(lp, 0.05),
    "decayed posterior": lambda lp: decayed_log_weights(lp, 1.25, 0.8),
}


@pytest.mark.parametrize("name", list(BASELINE_WEIGHTS))
def test_baseline_weights_at_t_ignore_y_t(name):
    """Every training-free row's weights at a scored position t >= P (the posterior's are fixed
    by the dev prefix, never scored) do not change with log p_m(y_t)."""
    weights = BASELINE_WEIGHTS[name]
    lp = _member_lp()
    base = weights(lp)
    for t in range(P, T):
        lp2 = lp.clone()
        lp2[:, t] = _member_lp(seed=10 + t)[:, t]
        got = weights(lp2)
        assert torch.equal(got[:, : t + 1], base[:, : t + 1]), f"{name} weights at {t} read y_{t}"


def test_rows_at_t_are_their_weights_mixing_p_of_y_t():
    """Every row of `row_logprobs` before t is unchanged by y_t, and at t it changes only by
    mixing the new p_m(y_t) with the same weights (checked for fixed share and the decayed posterior)."""
    lp = _member_lp().float()
    base = row_logprobs(lp, None, P)
    t = 7
    lp2 = lp.clone()
    lp2[:, t] = _member_lp(seed=99)[:, t].float()
    got = row_logprobs(lp2, None, P)
    assert torch.equal(got[:, :t], base[:, :t])
    for col, log_w in ((-2, fixed_share_log_weights(lp, 0.01)), (-1, decayed_log_weights(lp, 1.0, 0.9))):
        torch.testing.assert_close(got[:, t, col], torch.logsumexp(log_w[:, t] + lp2[:, t], dim=-1))
