"""Sparse routing: the routed decode equals its teacher-forced score, k = M is the merged model."""

from __future__ import annotations

import pytest
import torch

from leviathan import ComponentConfig, EnsembleConfig, LeviathanEnsemble
from leviathan.model.ensemble import merge_members
from leviathan.model.routing import RoutedDecoder, check_routing, routed_target_logprobs, top_members

V = 61


def ensemble(seed: int = 0, merge: str = "mixture") -> LeviathanEnsemble:
    """Four members (2 modules x 2) with random lags and a state term that matters."""
    torch.manual_seed(seed)
    member = ComponentConfig.preset("tiny", n_embd=32, n_head=2, n_layer=1, block_size=64, vocab_size=V, window=2)
    model = LeviathanEnsemble(
        EnsembleConfig(members=[member], modules=4, members_per_module=1, merge=merge, merge_width=16, merge_heads=2, merge_window=3)
    ).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lag_weight") or name == "merger.key.weight":
                p.normal_(std=0.5)
    return model.eval()


def member_outputs(model: LeviathanEnsemble, idx: torch.Tensor):
    out = model.member_outputs(idx[:, :-1], idx[:, 1:])
    return out.states.permute(1, 2, 0, 3), out.target_logprobs.permute(1, 2, 0)  # (B, T, M, D), (B, T, M)


def decode_teacher_forced(model: LeviathanEnsemble, seq: torch.Tensor, k: int, every: int, prefix: int):
    """The routed decoder fed seq (1, T+1); log-probs of each next token from position prefix - 1 on."""
    decoder = RoutedDecoder(model, k, every)
    logprobs = [decoder.prefill(seq[:, :prefix])]
    for t in range(prefix, seq.size(1) - 1):
        logprobs.append(decoder.step(seq[:, t : t + 1]))
    lp = torch.stack(logprobs, dim=1)  # (1, n, V)
    return lp.gather(-1, seq[:, prefix:, None]).squeeze(-1), decoder


@pytest.mark.parametrize("k,every", [(1, 3), (2, 4), (3, 1)])
def test_decode_equals_teacher_forced_score(k, every):
    model = ensemble()
    seq = torch.randint(0, V, (1, 25), generator=torch.Generator().manual_seed(3))
    prefix = 5
    states, target_lp = member_outputs(model, seq)
    scored = routed_target_logprobs(model.merger, states, target_lp, k, every, prefix)
    decoded, _ = decode_teacher_forced(model, seq, k, every, prefix)
    # Members take log_softmax in float32, where a cached decode and a full forward round apart.
    torch.testing.assert_close(decoded, scored[:, prefix - 1 :], rtol=0, atol=1e-5)
    full = routed_target_logprobs(model.merger, states, target_lp, 4, every, prefix)
    assert (full - scored)[:, prefix:].abs().max() > 1e-3  # routing really changed the model


def test_all_members_is_the_merged_model():
    model = ensemble(seed=1)
    seq = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(4))
    states, target_lp = member_outputs(model, seq)
    merged = merge_members(model.merger, model.member_outputs(seq[:, :-1], seq[:, 1:]), seq[:, 1:]).target_logprobs
    routed = routed_target_logprobs(model.merger, states, target_lp, k=4, every=3, prefix=2)
    torch.testing.assert_close(routed, merged, rtol=0, atol=1e-9)


def test_routing_does_less_member_work():
    model = ensemble()
    seq = torch.randint(0, V, (1, 41), generator=torch.Generator().manual_seed(5))
    _, decoder = decode_teacher_forced(model, seq, k=1, every=8, prefix=8)
    # prompt: 4 x 8; 32 steps: 1 member each, plus 3 x 8 catch-up tokens at each of the 3 later block starts
    assert decoder.member_steps == 4 * 8 + 32 + 3 * 3 * 8


def test_routing_is_causal():
    """Changing a later token changes no routed log-prob before it."""
    model = ensemble(seed=2)
    seq = torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(6))
    other = seq.clone()
    other[0, 20] = (other[0, 20] + 1) % V
    a = routed_target_logprobs(model.merger, *member_outputs(model, seq), k=2, every=4, prefix=3)
    b = routed_target_logprobs(model.merger, *member_outputs(model, other), k=2, every=4, prefix=3)
    torch.testing.assert_close(a[:, :19], b[:, :19], rtol=0, atol=0)
    assert not torch.equal(a[:, 19:], b[:, 19:])


def test_top_members_picks_the_heaviest():
    weights = torch.tensor([[[0.1, 0.1], [0.6, 0.4], [0.05, 0.15], [0.25, 0.35]]])  # (1, M=4, H=2)
    assert top_members(weights, 2).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize(
    "kw,field", [({"k": 0}, "k"), ({"k": 5}, "k"), ({"every": 0}, "every"), ({"prefix": 0}, "prefix")]
)
def test_bad_settings_name_the_field(kw, field):
    model = ensemble()
    args = {"k": 2, "every": 4, "prefix": 3, **kw}
    with pytest.raises(ValueError, match=rf"^{field}:"):
        check_routing(model.merger, **args)


def test_fusion_merge_is_refused():
    with pytest.raises(ValueError, match="^merge:"):
        check_routing(ensemble(merge="fusion").merger, 2, 4, 3)
