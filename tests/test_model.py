"""Leviathan components: parameter counts, flavours, causality, cached generation, save/load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leviathan import CheckpointError, ComponentConfig, LeviathanComponent, LeviathanComponentBase, build_component, configure_adamw
from leviathan import load as load_any

BASE_PARAMS_VOCAB_260 = 154_047_200
"""`base` (20 blocks, 20 heads, embed 800, block 256, window 4) with the byte vocabulary (260)."""


def tiny(**kw) -> LeviathanComponent:
    torch.manual_seed(kw.pop("seed", 0))
    return LeviathanComponent(ComponentConfig.preset("tiny", **kw))


def expected_params(cfg: ComponentConfig) -> int:
    """V*C + P*C + L*(4C^2 + 2rC^2 + 2C + H*w) + C: tied head, no biases."""
    r = {"gelu4": 4, "relu3": 3, "leaky6": 6}[cfg.flavour]
    lags = cfg.n_head * cfg.window if cfg.mixer == "correlation" else 0
    C = cfg.n_embd
    per_block = 4 * C * C + 2 * r * C * C + 2 * C + lags
    return cfg.vocab_size * C + cfg.block_size * C + cfg.n_layer * per_block + C


def test_base_parameter_count_is_pinned() -> None:
    cfg = ComponentConfig.preset("base", vocab_size=260)
    with torch.device("meta"):  # no memory, no init cost
        model = LeviathanComponent(cfg)
    assert model.num_params() == BASE_PARAMS_VOCAB_260 == expected_params(cfg)
    assert model.num_params(non_embedding=True) == BASE_PARAMS_VOCAB_260 - 256 * 800


@pytest.mark.parametrize("flavour", ["gelu4", "relu3", "leaky6"])
@pytest.mark.parametrize("mixer", ["correlation", "attention"])
def test_tiny_counts_match_formula_and_stay_under_1m(flavour: str, mixer: str) -> None:
    model = tiny(flavour=flavour, mixer=mixer)
    assert model.num_params() == expected_params(model.config)
    assert model.num_params() < 1_000_000


def test_attention_twin_differs_only_by_lag_weights() -> None:
    corr, att = tiny(), tiny(mixer="attention")
    cfg = corr.config
    assert corr.num_params() - att.num_params() == cfg.n_layer * cfg.n_head * cfg.window


@pytest.mark.parametrize("flavour,hidden,act", [("gelu4", 4, nn.GELU), ("relu3", 3, nn.ReLU), ("leaky6", 6, nn.LeakyReLU)])
def test_flavours_build_their_mlp(flavour: str, hidden: int, act: type) -> None:
    model = tiny(flavour=flavour)
    for block in model.blocks:
        assert block.mlp.c_fc.out_features == hidden * model.config.n_embd
        assert isinstance(block.mlp.act, act)


def test_base_class_needs_blocks() -> None:
    with pytest.raises(NotImplementedError, match="make_block"):
        LeviathanComponentBase(ComponentConfig.preset("tiny"))
    assert isinstance(build_component(ComponentConfig.preset("tiny")), LeviathanComponent)


def test_forward_shapes_and_initial_loss() -> None:
    model = tiny()
    idx, targets = torch.randint(0, 260, (2, 3, 20))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 20, 260)
    assert abs(loss.item() - math.log(260)) < 0.1, "a fresh model predicts close to uniform"
    assert model(idx)[1] is None
    h = model.hidden(idx)
    assert h.shape == (3, 20, 64)
    torch.testing.assert_close(model.logits_from_hidden(h), logits)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 257, dtype=torch.long))


@pytest.mark.parametrize("mixer", ["correlation", "attention"])
def test_model_is_causal(mixer: str) -> None:
    model = tiny(mixer=mixer)
    with torch.no_grad():
        for block in model.blocks:
            if block.mixer.lag_weight is not None:
                block.mixer.lag_weight.normal_()
    idx = torch.randint(0, 260, (2, 24))
    logits, _ = model(idx)
    p = 10
    idx2 = idx.clone()
    idx2[:, p + 1 :] = (idx2[:, p + 1 :] + 1) % 260
    logits2, _ = model(idx2)
    torch.testing.assert_close(logits2[:, : p + 1], logits[:, : p + 1])
    assert (logits2[:, p + 1 :] - logits[:, p + 1 :]).abs().max() > 1e-4


def test_cached_forward_equals_full_forward() -> None:
    model = tiny(window=3).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.lag_weight.normal_()
    idx = torch.randint(0, 260, (2, 17))
    full, _ = model(idx)
    cache = model.new_cache()
    parts = [model(idx[:, :5], cache=cache)[0]]
    parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 17)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def reference_generate(model, idx, n, temperature, top_k, generator):
    """nanoGPT's loop: a full forward over the (cropped) context for every token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size :])
        logits = logits[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, top_k)
            logits[logits < v[:, [-1]]] = -float("inf")
        idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)], dim=1)
    return idx


@pytest.mark.parametrize("top_k", [None, 20])
def test_generate_is_seeded_and_equals_uncached_sampling(top_k: int | None) -> None:
    # block_size 16 < prompt + new tokens: decoding crosses the context limit.
    model = tiny(block_size=16, window=3).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.lag_weight.normal_(std=0.5)
    prompt = torch.randint(0, 260, (2, 6))
    out = model.generate(prompt, 14, temperature=0.8, top_k=top_k, generator=torch.Generator().manual_seed(7))
    assert out.shape == (2, 20)
    assert torch.equal(out[:, :6], prompt)
    again = model.generate(prompt, 14, temperature=0.8, top_k=top_k, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, again), "same seed must give the same tokens"
    with torch.no_grad():
        ref = reference_generate(model, prompt, 14, 0.8, top_k, torch.Generator().manual_seed(7))
    assert torch.equal(out, ref), "cached decoding sampled different tokens than full forwards"
    other = model.generate(prompt, 14, temperature=0.8, top_k=top_k, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(out, other)


def test_generate_rejects_bad_arguments() -> None:
    model = tiny()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="idx"):
        model.generate(torch.zeros(3, dtype=torch.long), 2)
    greedy = model.generate(prompt, 5, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 5, temperature=0))


def test_optimizer_decays_matrices_only() -> None:
    model = tiny()
    opt = configure_adamw(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    lag_ids = {id(b.mixer.lag_weight) for b in model.blocks}
    assert lag_ids <= {id(p) for p in no_decay["params"]}, "lag weights must not be decayed"
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_a_few_steps_learn_a_repeated_sequence() -> None:
    model = tiny(block_size=32)
    opt = configure_adamw(model, lr=3e-3, weight_decay=0.0)
    seq = torch.randint(0, 260, (1, 33)).repeat(4, 1)
    x, y = seq[:, :-1], seq[:, 1:]
    first = None
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = tiny(flavour="leaky6", window=2)
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.lag_weight.normal_()
    model.save(tmp_path / "m")
    loaded = LeviathanComponent.load(tmp_path / "m")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.wte.weight, "weight tying survives loading"
    idx = torch.randint(0, 260, (2, 9))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert isinstance(LeviathanComponentBase.load(tmp_path / "m"), LeviathanComponent)
    assert isinstance(load_any(tmp_path / "m"), LeviathanComponent)


def test_load_names_the_missing_or_corrupt_file(tmp_path: Path) -> None:
    folder = tiny().save(tmp_path / "m")
    weights, config = folder / "model.safetensors", folder / "config.json"
    good_weights, good_config = weights.read_bytes(), config.read_text()

    data = bytearray(good_weights)
    data[-5] ^= 0xFF  # one flipped bit pattern inside a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        LeviathanComponent.load(folder)

    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        LeviathanComponent.load(folder)

    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        LeviathanComponent.load(folder)
    weights.write_bytes(good_weights)

    config.write_text(good_config[:40])
    with pytest.raises(CheckpointError, match=r"config\.json: corrupt JSON"):
        LeviathanComponent.load(folder)

    meta = json.loads(good_config)
    meta["config"]["window"] = 0
    config.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid config: window"):
        LeviathanComponent.load(folder)

    # A config that does not describe these (intact) weights.
    meta = json.loads(good_config)
    meta["config"]["n_layer"] = 3
    config.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match"):
        LeviathanComponent.load(folder)

    config.unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        LeviathanComponent.load(folder)
    assert issubclass(CheckpointError, ValueError)
