"""Leviathan ensembles and the correlation merger."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leviathan import CheckpointError, ComponentConfig, EnsembleConfig, LeviathanEnsemble
from leviathan import load as load_any
from leviathan.model.ensemble import merge_members

V = 260


def config(merge: str = "fusion", mixer: str = "correlation", modules: int = 2, **kw) -> EnsembleConfig:
    # Members differ in flavour and width: the projections map both to the merge width.
    members = [
        ComponentConfig.preset("tiny", flavour="gelu4", block_size=32, mixer=mixer),
        ComponentConfig.preset("tiny", flavour="leaky6", n_embd=32, n_head=2, block_size=32, window=2, mixer=mixer),
    ]
    args = dict(members=members, modules=modules, members_per_module=2, merge=merge, merge_width=32, merge_heads=4, merge_window=3, mixer=mixer)
    return EnsembleConfig(**{**args, **kw})


def ensemble(merge: str = "fusion", seed: int = 0, random_lags: bool = True, **kw) -> LeviathanEnsemble:
    torch.manual_seed(seed)
    model = LeviathanEnsemble(config(merge, **kw))
    if random_lags:  # lags that matter, so causality and caching are really exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lag_weight"):
                    p.normal_()
    return model


def tokens(B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("merge", ["fusion", "mixture"])
def test_weights_are_a_distribution_over_members(merge: str) -> None:
    model = ensemble(merge)
    out = model(tokens(), tokens(seed=2), return_details=True)
    B, T = 2, 12
    assert out.weights.shape == (B, T, 4, 4)  # (B, T, M, H)
    assert (out.weights >= 0).all()
    torch.testing.assert_close(out.weights.sum(dim=2), torch.ones(B, T, 4))
    assert out.logits.shape == (B, T, V)
    assert set(out.member_losses) == {"m0.0", "m0.1", "m1.0", "m1.1"}


@pytest.mark.parametrize("merge", ["fusion", "mixture"])
def test_whole_ensemble_is_causal(merge: str) -> None:
    model = ensemble(merge)
    idx = tokens(T=16)
    out = model(idx, return_details=True)
    p = 6
    idx2 = idx.clone()
    idx2[:, p + 1 :] = (idx2[:, p + 1 :] + 7) % V
    out2 = model(idx2, return_details=True)
    torch.testing.assert_close(out2.logits[:, : p + 1], out.logits[:, : p + 1])
    torch.testing.assert_close(out2.weights[:, : p + 1], out.weights[:, : p + 1])
    assert (out2.logits[:, p + 1 :] - out.logits[:, p + 1 :]).abs().max() > 1e-4


def member_logprobs(model: LeviathanEnsemble, idx: torch.Tensor) -> list[torch.Tensor]:
    return [F.log_softmax(m(idx)[0], dim=-1) for m in model.members]


def test_mixture_with_all_weight_on_one_member_is_that_member() -> None:
    model = ensemble("mixture")
    idx, targets = tokens(), tokens(seed=2)
    outputs = model.member_outputs(idx, targets, full_logprobs=True)
    own = member_logprobs(model, idx)
    for j in range(4):
        weights = torch.zeros(2, 12, 4, 4)
        weights[:, :, j] = 1.0
        out = merge_members(model.merger, outputs, targets, weights=weights)
        torch.testing.assert_close(out.logits, own[j], atol=1e-5, rtol=0, msg=f"member {j}")
        torch.testing.assert_close(out.loss, F.nll_loss(own[j].reshape(-1, V), targets.reshape(-1)))


def test_uniform_weights_give_the_uniform_mixture() -> None:
    model = ensemble("mixture")
    idx = tokens()
    outputs = model.member_outputs(idx, full_logprobs=True)
    out = merge_members(model.merger, outputs, weights=torch.full((2, 12, 4, 4), 0.25))
    mean_p = torch.stack([lp.exp() for lp in member_logprobs(model, idx)]).mean(0)
    torch.testing.assert_close(out.logits.exp(), mean_p, atol=1e-6, rtol=1e-5)


def naive_merge_scores(model: LeviathanEnsemble, states: torch.Tensor) -> torch.Tensor:
    """score[t,m,h] = sum_u a[h,u] dot(q[t-u,h], k_m[t-u,h]) / sqrt(d_h), loop by loop."""
    mg = model.merger
    B, T, M, D = states.shape
    H, d = mg.n_head, D // mg.n_head
    c = states.mean(2)
    q = (c @ mg.query.weight.T).view(B, T, H, d)
    k = (states @ mg.key.weight.T).view(B, T, M, H, d)
    a = mg.lag_weight
    score = torch.zeros(B, T, M, H)
    for t in range(T):
        for m in range(M):
            for u in range(a.shape[1]):
                if t - u >= 0:
                    score[:, t, m] += a[:, u] * (q[:, t - u] * k[:, t - u, m]).sum(-1) / math.sqrt(d)
    return score


def test_merge_weights_follow_the_lagged_formula() -> None:
    model = ensemble("fusion", evidence=False)
    idx = tokens(T=9)
    states = model.member_outputs(idx).states.permute(1, 2, 0, 3)  # (B, T, M, D)
    out = model.merger(states)
    expected = torch.softmax(naive_merge_scores(model, states), dim=2)
    torch.testing.assert_close(out.weights, expected, atol=1e-6, rtol=1e-5)


def naive_running_posterior(target_lp: torch.Tensor) -> torch.Tensor:
    """log sum_m w_m[t] p_m(y_t), w_m[t] = Bayes posterior given y_<t (uniform prior), loop by loop (float64)."""
    B, T, M = target_lp.shape
    out = torch.empty(B, T, dtype=torch.float64)
    for b in range(B):
        seen = [0.0] * M  # log p_m(y_0 .. y_{t-1})
        for t in range(T):
            top = max(seen)
            norm = sum(math.exp(x - top) for x in seen)
            out[b, t] = math.log(sum(math.exp(seen[m] - top) / norm * math.exp(float(target_lp[b, t, m])) for m in range(M)))
            for m in range(M):
                seen[m] += float(target_lp[b, t, m])
    return out


def test_fresh_mixture_merger_is_the_running_bayes_posterior() -> None:
    """beta = gamma = 1 and a zero key at init: the merged log-prob is the running posterior's."""
    model = ensemble("mixture", seed=4).double()
    B, T, M = 3, 40, 4
    g = torch.Generator().manual_seed(5)
    # Sharp, member-dependent log-probs, so the posterior moves far from uniform.
    target_lp = F.log_softmax(3 * torch.randn(B, T, M, 8, generator=g, dtype=torch.float64), dim=-1)[..., 0]
    states = torch.randn(B, T, M, 32, generator=g, dtype=torch.float64)
    out = model.merger(states, target_lp, targets=torch.zeros(B, T, dtype=torch.long))
    assert model.merger.gamma().tolist() == [1.0] * 4 and model.merger.beta.tolist() == [1.0] * 4
    torch.testing.assert_close(out.target_logprobs, naive_running_posterior(target_lp), atol=1e-5, rtol=0)


def test_evidence_follows_the_decayed_sum() -> None:
    """score = beta_h * sum_{s<=t} gamma_h^(t-s) a_m[s] + state term, a = target log-probs shifted by one."""
    model = ensemble("mixture")
    mg = model.merger
    with torch.no_grad():
        mg.gamma_raw.copy_(torch.tensor([0.0, 0.1, 0.7, 2.0]))
        mg.beta.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))
        mg.key.weight.normal_()
    B, T, M = 2, 7, 4
    target_lp = -torch.rand(B, T, M, generator=torch.Generator().manual_seed(2)) * 3
    states = model.member_outputs(tokens(T=T)).states.permute(1, 2, 0, 3)
    gamma = torch.exp(-mg.gamma_raw.detach())
    expected = torch.zeros(B, T, M, 4)
    for t in range(T):
        for s in range(1, t + 1):  # a[s] = log p(y_{s-1}); a[0] = 0
            expected[:, t] += gamma ** (t - s) * target_lp[:, s - 1, :, None]
    expected = mg.beta.detach() * expected + naive_merge_scores(model, states)
    out = mg(states, target_lp, targets=torch.zeros(B, T, dtype=torch.long))
    torch.testing.assert_close(out.weights, torch.softmax(expected, dim=2), atol=1e-6, rtol=1e-5)


def test_gamma_starts_at_one_stays_in_range_and_learns_both_ways() -> None:
    mg = ensemble("mixture").merger
    for r in (-3.0, 0.0, 0.5, 50.0):
        with torch.no_grad():
            mg.gamma_raw.fill_(r)
        gamma = mg.gamma()
        assert ((gamma > 0) & (gamma <= 1)).all(), r
        mg.zero_grad()
        gamma.sum().backward()
        assert (mg.gamma_raw.grad != 0).all(), f"no gradient at r = {r}"


def test_evidence_off_is_the_state_only_merger_and_old_configs_load_without_it() -> None:
    off = ensemble("mixture", evidence=False)
    assert not hasattr(off.merger, "beta") and off.merger.key.weight.abs().sum() > 0
    on = ensemble("mixture")
    assert on.merger.key.weight.abs().sum() == 0
    old = on.config.to_dict()
    del old["evidence"], old["format_version"]  # a config saved before either existed
    assert EnsembleConfig.from_dict(old).evidence is False


@pytest.mark.parametrize("merge", ["fusion", "mixture"])
def test_loss_from_target_logprobs_equals_the_full_logits_loss(merge: str) -> None:
    """The loss and merged target log-probs from (M, B, T) target log-probs alone (what the
    distributed trainer sends) equal the NLL of the full merged logits."""
    model = ensemble(merge)
    idx, targets = tokens(), tokens(seed=2)
    logits, loss = model(idx, targets)
    lean = model.member_outputs(idx, targets)
    assert lean.logprobs is None and lean.target_logprobs.shape == (4, 2, 12)
    out = merge_members(model.merger, lean, targets)
    expected = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.target_logprobs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)))


def test_merge_of_selected_rows_equals_those_rows_of_the_whole_batch() -> None:
    model = ensemble("mixture")
    idx, targets = tokens(B=3), tokens(B=3, seed=2)
    outputs = model.member_outputs(idx, targets)
    whole = merge_members(model.merger, outputs, targets)
    part = merge_members(model.merger, outputs, targets[1:], rows=slice(1, 3))
    torch.testing.assert_close(part.target_logprobs, whole.target_logprobs[1:])


def test_member_losses_are_each_members_own_loss() -> None:
    model = ensemble("fusion")
    idx, targets = tokens(), tokens(seed=2)
    out = model(idx, targets, return_details=True)
    for name, member in zip(model.member_names, model.members):
        torch.testing.assert_close(out.member_losses[name], member(idx, targets)[1])
    assert model(idx, return_details=True).member_losses is None


@pytest.mark.parametrize("merge", ["fusion", "mixture"])
@pytest.mark.parametrize("evidence", [True, False])
def test_4x2_forward_backward_reaches_every_parameter(merge: str, evidence: bool) -> None:
    model = ensemble(merge, modules=4, evidence=evidence)
    if evidence:  # the zero key of a fresh evidence merger stops W_q's and the lags' gradient until W_k moves
        with torch.no_grad():
            model.merger.key.weight.normal_()
    assert len(model.members) == 8 and model.member_names[-1] == "m3.1"
    _, loss = model(tokens(), tokens(seed=2))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_attention_twin_merger_has_no_lags() -> None:
    corr, att = ensemble(), ensemble(mixer="attention")
    assert att.merger.lag_weight is None and att.merger.window == 1
    assert corr.num_params() - att.num_params() == 4 * 3 + 2 * (2 * 4 * 4 + 2 * 2 * 2)  # merger + member lags


@pytest.mark.parametrize("merge", ["fusion", "mixture"])
@pytest.mark.parametrize("evidence", [True, False])
def test_generate_cached_equals_full_forward_sampling(merge: str, evidence: bool) -> None:
    model = ensemble(merge, evidence=evidence).eval()
    if evidence:  # a learned evidence path, so the cached recurrence is really exercised
        with torch.no_grad():
            model.merger.gamma_raw.copy_(torch.tensor([0.0, 0.2, 0.5, 1.0]))
            model.merger.beta.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
            model.merger.key.weight.normal_()
    prompt = tokens(T=5)
    out = model.generate(prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert out.shape == (2, 35)  # crosses block_size 32
    idx, g = prompt, torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(idx[:, -32:])
            probs = F.softmax(logits[:, -1].float(), dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)
    assert torch.equal(out, idx)


def test_merge_rejects_wrong_shapes() -> None:
    model = ensemble("mixture")
    merger = model.merger
    with pytest.raises(ValueError, match="states"):
        merger(torch.zeros(1, 3, 5, 32))
    with pytest.raises(ValueError, match="logprobs"):
        merger(torch.zeros(1, 3, 4, 32))
    with pytest.raises(ValueError, match="target_logprobs"):
        merger(torch.zeros(1, 3, 4, 32), targets=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="weights"):
        merger(torch.zeros(1, 3, 4, 32), logprobs=torch.zeros(1, 3, 4, V), weights=torch.zeros(1, 3, 4, 2))


@pytest.mark.parametrize("merge", ["fusion", "mixture"])
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, merge: str) -> None:
    model = ensemble(merge)
    model.save(tmp_path / "e")
    loaded = LeviathanEnsemble.load(tmp_path / "e")
    assert loaded.config == model.config
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    idx = tokens()
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert isinstance(load_any(tmp_path / "e"), LeviathanEnsemble)


def test_members_state_dicts_assemble_an_ensemble(tmp_path: Path) -> None:
    """The trainer's path to final/: members trained apart, loaded into one ensemble, saved."""
    source = ensemble()
    target = LeviathanEnsemble(source.config)
    for i in range(4):
        target.members[i].load_state_dict(source.members[i].state_dict())
        target.projections[i].load_state_dict(source.projections[i].state_dict())
    target.merger.load_state_dict(source.merger.state_dict())
    target.save(tmp_path / "final")
    idx = tokens()
    assert torch.equal(LeviathanEnsemble.load(tmp_path / "final")(idx)[0], source(idx)[0])


def test_load_refuses_damage_and_the_wrong_kind(tmp_path: Path) -> None:
    folder = ensemble().save(tmp_path / "e")
    with pytest.raises(CheckpointError, match=r"config\.json: holds a 'ensemble', not a 'component'"):
        from leviathan import LeviathanComponent

        LeviathanComponent.load(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        LeviathanEnsemble.load(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        LeviathanEnsemble.load(folder)
