"""Sparse routing: the routed decode equals its teacher-forced score, k = M is the merged model,
and held members catch up exactly when they come back."""

from __future__ import annotations

import pytest
import torch

from leviathan import ComponentConfig, EnsembleConfig, LeviathanEnsemble
from leviathan.model.ensemble import EnsembleCache, merge_members, run_members
from leviathan.model.routing import RoutedDecoder, check_routing, routed_target_logprobs, top_members

V = 61


def ensemble(seed: int = 0, merge: str = "mixture", residual: bool = False) -> LeviathanEnsemble:
    """Four members (2 modules x 2) with random lags and a state term that matters; with the
    residual, its head is off its zero init so the correction changes the model."""
    torch.manual_seed(seed)
    member = ComponentConfig.preset("tiny", n_embd=32, n_head=2, n_layer=1, block_size=64, vocab_size=V, window=2)
    config = EnsembleConfig(
        members=[member], modules=4, members_per_module=1, merge=merge, merge_width=16, merge_heads=2, merge_window=3,
        residual=residual,
    )
    model = LeviathanEnsemble(config).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lag_weight") or name == "merger.key.weight":
                p.normal_(std=0.5)
        if residual:
            model.merger.res_head.weight.normal_(std=0.2)
    return model.eval()


def score(model: LeviathanEnsemble, idx: torch.Tensor, k: int, every: int, prefix: int, probe: int = 1, outputs=None):
    """routed_target_logprobs on idx (B, T+1), with the full log-probs and targets a residual merger needs."""
    out = outputs or model.member_outputs(idx[:, :-1], idx[:, 1:], full_logprobs=model.merger.residual)
    states, target_lp = out.states.permute(1, 2, 0, 3), out.target_logprobs.permute(1, 2, 0)
    extra = {"logprobs": out.logprobs.permute(1, 2, 0, 3), "targets": idx[:, 1:]} if model.merger.residual else {}
    return routed_target_logprobs(model.merger, states, target_lp, k, every, prefix, probe, **extra)


def decode_teacher_forced(model: LeviathanEnsemble, seq: torch.Tensor, k: int, every: int, prefix: int, probe: int = 1):
    """The routed decoder fed seq (1, T+1); log-probs of each next token from position prefix - 1 on."""
    decoder = RoutedDecoder(model, k, every, probe)
    logprobs = [decoder.prefill(seq[:, :prefix])]
    for t in range(prefix, seq.size(1) - 1):
        logprobs.append(decoder.step(seq[:, t : t + 1]))
    lp = torch.stack(logprobs, dim=1)  # (1, n, V)
    return lp.gather(-1, seq[:, prefix:, None]).squeeze(-1), decoder


@pytest.mark.parametrize("residual,seed", [(False, 1), (True, 3)])  # seeds where every setting re-enters a member
@pytest.mark.parametrize("k,every,probe", [(1, 3, 0), (2, 4, 1), (3, 1, 1), (2, 3, 2)])
def test_decode_equals_teacher_forced_score(k, every, probe, residual, seed):
    model = ensemble(seed=seed, residual=residual)
    seq = torch.randint(0, V, (1, 25), generator=torch.Generator().manual_seed(3))
    prefix = 5
    scored = score(model, seq, k, every, prefix, probe)
    decoded, decoder = decode_teacher_forced(model, seq, k, every, prefix, probe)
    assert decoder.entries > 0  # held members came back: their catch-up and evidence fix are in the comparison
    # Members take log_softmax in float32, where a cached decode and a full forward round apart.
    torch.testing.assert_close(decoded, scored[:, prefix - 1 :], rtol=0, atol=1e-5)
    full = score(model, seq, 4, every, prefix)
    assert (full - scored)[:, prefix:].abs().max() > 1e-3  # routing really changed the model


@pytest.mark.parametrize("probe", [0, 1])
def test_lazy_catch_up_is_exact(probe):
    """However long a member was held, after catching up it is where a full forward would be."""
    model = ensemble(seed=2)
    seq = torch.randint(0, V, (1, 41), generator=torch.Generator().manual_seed(7))
    _, decoder = decode_teacher_forced(model, seq, k=1, every=4, prefix=6, probe=probe)
    lengths = [c.length for c in decoder.caches]
    assert min(lengths) < seq.size(1) - 1 and decoder.entries > 0  # some held now, some came back
    with torch.no_grad():
        evidence, states = decoder._catch_up(torch.ones(1, 4, dtype=torch.bool))
    full = run_members(model.members, model.projections, seq[:, :-1], full_logprobs=True)
    torch.testing.assert_close(decoder.last_logprobs[0], full.logprobs[:, 0, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(states[0].float(), full.states[:, 0, -1].float(), rtol=0, atol=1e-5)
    # the evidence a held member brings back is its true decayed log-likelihood over what it missed
    m, n = lengths.index(min(lengths)), seq.size(1) - 1 - min(lengths)
    a = full.logprobs[m, 0, -n - 1 : -1].gather(-1, seq[0, -n - 1 : -1, None]).squeeze(-1).double()  # (n,)
    ages = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    expected = (model.merger.gamma()[:, None] ** ages * a).sum(dim=-1)
    torch.testing.assert_close(evidence[0, m], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_all_members_is_the_merged_model(residual):
    model = ensemble(seed=1, residual=residual)
    seq = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(4))
    outputs = model.member_outputs(seq[:, :-1], seq[:, 1:], full_logprobs=residual)
    merged = merge_members(model.merger, outputs, seq[:, 1:]).target_logprobs
    routed = score(model, seq, k=4, every=3, prefix=2, outputs=outputs)
    # The evidence is summed in float32 (the members' log-probs): one position at a time here,
    # as one product in the full merge, so the two round apart; the residual's correction
    # reads the weights, so it carries that rounding on.
    torch.testing.assert_close(routed, merged, rtol=0, atol=1e-5 if residual else 1e-6)
    # with float64 member log-probs nothing rounds apart: the same model
    outputs.target_logprobs = outputs.target_logprobs.double()
    if residual:
        outputs.logprobs = outputs.logprobs.double()
    merged = merge_members(model.merger, outputs, seq[:, 1:]).target_logprobs
    routed = score(model, seq, k=4, every=3, prefix=2, outputs=outputs)
    torch.testing.assert_close(routed, merged, rtol=0, atol=1e-12)


@pytest.mark.parametrize("residual", [False, True])
def test_all_members_decode_is_the_merged_decode(residual):
    model = ensemble(seed=1, residual=residual)
    seq = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(4))
    decoder, cache = RoutedDecoder(model, k=4, every=3), EnsembleCache(model.members)
    routed = [decoder.prefill(seq[:, :5])]
    merged = [model._step(seq[:, :5], cache)[0]]
    for t in range(5, seq.size(1)):
        routed.append(decoder.step(seq[:, t : t + 1]))
        merged.append(model._step(seq[:, t : t + 1], cache)[0])
    torch.testing.assert_close(torch.cat(routed), torch.cat(merged).to(routed[0].dtype), rtol=0, atol=1e-9)
    assert decoder.member_steps == 4 * seq.size(1) and decoder.entries == 0


def test_held_members_do_no_work():
    model = ensemble()
    seq = torch.randint(0, V, (1, 41), generator=torch.Generator().manual_seed(5))
    _, decoder = decode_teacher_forced(model, seq, k=1, every=8, prefix=8, probe=0)
    lengths = [c.length for c in decoder.caches]
    assert decoder.member_steps == sum(lengths)  # every member-token forward is counted once
    assert lengths.count(8) == 3  # three members never came back: they read the prompt and nothing else
    assert decoder.member_steps == 4 * 8 + 32  # and the one chosen ran every step
    _, probing = decode_teacher_forced(model, seq, k=1, every=8, prefix=8, probe=1)
    assert decoder.member_steps < probing.member_steps < 4 * 40


@pytest.mark.parametrize("residual", [False, True])
def test_routing_is_causal(residual):
    """Changing a later token changes no routed log-prob before it."""
    model = ensemble(seed=2, residual=residual)
    seq = torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(6))
    other = seq.clone()
    other[0, 20] = (other[0, 20] + 1) % V
    a = score(model, seq, k=2, every=4, prefix=3)
    b = score(model, other, k=2, every=4, prefix=3)
    torch.testing.assert_close(a[:, :19], b[:, :19], rtol=0, atol=0)
    assert not torch.equal(a[:, 19:], b[:, 19:])


def test_residual_changes_the_routed_model():
    """The correction is applied: the residual's routed scores are not the plain routed mixture's."""
    model = ensemble(seed=1, residual=True)
    seq = torch.randint(0, V, (1, 25), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        corrected = score(model, seq, k=2, every=4, prefix=5)
        model.merger.res_head.weight.zero_()
        plain = score(model, seq, k=2, every=4, prefix=5)
        model.merger.residual = False
        mixture = score(model, seq, k=2, every=4, prefix=5)
    torch.testing.assert_close(plain, mixture, rtol=0, atol=1e-6)  # a zero head is the mixture
    assert (corrected - plain).abs().max() > 1e-2


@pytest.mark.parametrize("missing,field", [("logprobs", "logprobs"), ("targets", "targets")])
def test_residual_without_full_logprobs_is_refused(missing, field):
    model = ensemble(seed=1, residual=True)
    seq = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    out = model.member_outputs(seq[:, :-1], seq[:, 1:], full_logprobs=True)
    states, target_lp = out.states.permute(1, 2, 0, 3), out.target_logprobs.permute(1, 2, 0)
    extra = {"logprobs": out.logprobs.permute(1, 2, 0, 3), "targets": seq[:, 1:]}
    del extra[missing]
    with pytest.raises(ValueError, match=rf"^{field}: a residual merger needs"):
        routed_target_logprobs(model.merger, states, target_lp, 2, 4, 3, **extra)


def test_top_members_picks_the_heaviest():
    weights = torch.tensor([[[0.1, 0.1], [0.6, 0.4], [0.05, 0.15], [0.25, 0.35]]])  # (1, M=4, H=2)
    assert top_members(weights, 2).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize(
    "kw,field",
    [({"k": 0}, "k"), ({"k": 5}, "k"), ({"every": 0}, "every"), ({"prefix": 0}, "prefix"), ({"probe": -1}, "probe")],
)
def test_bad_settings_name_the_field(kw, field):
    model = ensemble()
    args = {"k": 2, "every": 4, "prefix": 3, **kw}
    with pytest.raises(ValueError, match=rf"^{field}:"):
        check_routing(model.merger, **args)


def test_fusion_merge_is_refused():
    with pytest.raises(ValueError, match="^merge:"):
        check_routing(ensemble(merge="fusion").merger, 2, 4, 3)
