"""The merger's residual option: starts as the mixture, stays causal, round-trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leviathan import ComponentConfig, EnsembleConfig, LeviathanEnsemble
from leviathan.model.ensemble import EnsembleCache

V = 260


def config(**kw) -> EnsembleConfig:
    members = [
        ComponentConfig.preset("tiny", flavour="gelu4", block_size=32),
        ComponentConfig.preset("tiny", flavour="leaky6", n_embd=32, n_head=2, block_size=32, window=2),
    ]
    args = dict(members=members, modules=2, members_per_module=2, merge="mixture", merge_width=32, merge_heads=4,
                merge_window=3)
    return EnsembleConfig(**{**args, **kw})


def tokens(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def learned(model: LeviathanEnsemble) -> LeviathanEnsemble:
    """Every merger weight non-trivial (lags, state term, evidence, residual head), so the checks bite."""
    torch.manual_seed(5)
    with torch.no_grad():
        m = model.merger
        m.lag_weight.normal_()
        m.key.weight.normal_()
        m.gamma_raw.copy_(torch.tensor([0.0, 0.2, 0.5, 1.0]))
        m.beta.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        if m.residual:
            m.res_head.weight.normal_()
    return model.eval()


def test_zero_initialised_residual_is_exactly_the_mixture() -> None:
    torch.manual_seed(0)
    plain = LeviathanEnsemble(config())
    torch.manual_seed(0)
    residual = LeviathanEnsemble(config(residual=True))
    missing, unexpected = residual.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("merger.res_") for k in missing)
    assert (residual.merger.res_head.weight == 0).all()
    idx, y = tokens(), tokens(seed=2)
    logits_p, loss_p = plain(idx, y)
    logits_r, loss_r = residual(idx, y)
    torch.testing.assert_close(logits_r, logits_p, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_r, loss_p, atol=1e-6, rtol=0)


def test_learned_residual_leaves_the_mixture_and_is_a_distribution() -> None:
    torch.manual_seed(0)
    model = learned(LeviathanEnsemble(config(residual=True)))
    logits, _ = model(tokens())
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2, 16))
    model.merger.residual = False  # the same merger without the correction
    mixture, _ = model(tokens())
    assert (logits - mixture).abs().max() > 1e-2


def test_residual_is_causal_in_inputs_and_targets() -> None:
    torch.manual_seed(0)
    model = learned(LeviathanEnsemble(config(residual=True)))
    idx, y = tokens(), tokens(seed=2)
    t = 6
    with torch.no_grad():
        out = model(idx, y, return_details=True)
        y2 = y.clone()
        y2[:, t] = (y2[:, t] + 11) % V  # changing the target y_t must not move the distribution at t
        out_y = model(idx, y2, return_details=True)
        idx2 = idx.clone()
        idx2[:, t + 1 :] = (idx2[:, t + 1 :] + 7) % V
        out_x = model(idx2, return_details=True)  # no targets: the evidence reads the input tokens
        out_0 = model(idx, return_details=True)
    torch.testing.assert_close(out_y.logits[:, : t + 1], out.logits[:, : t + 1])
    torch.testing.assert_close(out_y.weights[:, : t + 1], out.weights[:, : t + 1])
    torch.testing.assert_close(out_x.logits[:, : t + 1], out_0.logits[:, : t + 1])
    assert (out_y.logits[:, t + 1 :] - out.logits[:, t + 1 :]).abs().max() > 1e-4


def test_residual_decode_cache_equals_the_full_forward() -> None:
    torch.manual_seed(0)
    model = learned(LeviathanEnsemble(config(residual=True)))
    idx = tokens(T=20)
    with torch.no_grad():
        full, _ = model(idx)
        cache = None
        steps = []
        for t in range(idx.shape[1]):
            last, cache = model._step(idx[:, t : t + 1], cache)
            steps.append(last)
    assert isinstance(cache, EnsembleCache)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_residual_needs_full_logprobs_and_a_mixture() -> None:
    torch.manual_seed(0)
    model = LeviathanEnsemble(config(residual=True))
    states = torch.randn(2, 8, 4, 32)
    target_lp = F.log_softmax(torch.randn(2, 8, 4, V), -1)[..., 0]
    with pytest.raises(ValueError, match="residual needs the members' full log-probs"):
        model.merger(states, target_lp, None, tokens(T=8))
    with pytest.raises(ValueError, match="residual: corrects a mixture"):
        config(residual=True, merge="fusion")
    with pytest.raises(ValueError, match="residual: must be true or false"):
        config(residual="yes")


def test_residual_config_round_trips_and_old_configs_load_without_it() -> None:
    c = config(residual=True)
    d = c.to_dict()
    assert d["residual"] is True
    assert EnsembleConfig.from_dict(d) == c
    d.pop("residual")
    assert EnsembleConfig.from_dict(d).residual is False


def test_residual_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = learned(LeviathanEnsemble(config(residual=True)))
    model.save(tmp_path / "ens")
    again = LeviathanEnsemble.load(tmp_path / "ens").eval()
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model(idx)[0])
