"""Configs fail where they are written, naming the field and what is allowed, and round-trip."""

from __future__ import annotations

import json

import pytest

from leviathan.config import (
    CONFIG_FORMAT_VERSION, FLAVOURS, MERGE_MODES, MIXERS, PRESETS, ComponentConfig, EnsembleConfig, TrainingConfig,
)


@pytest.mark.parametrize(
    "overrides,field,allowed",
    [
        ({"n_embd": 66, "n_head": 4}, "n_embd", "n_head=4"),
        ({"window": 0}, "window", ">= 1"),
        ({"flavour": "swish8"}, "flavour", ", ".join(FLAVOURS)),
        ({"mixer": "conv"}, "mixer", ", ".join(MIXERS)),
        ({"n_layer": 0}, "n_layer", ">= 1"),
        ({"n_head": 2.0}, "n_head", "integer"),
        ({"vocab_size": True}, "vocab_size", "integer"),
        ({"block_size": -1}, "block_size", ">= 1"),
        ({"dropout": 1.0}, "dropout", "[0, 1)"),
        ({"bias": "yes"}, "bias", "true or false"),
    ],
)
def test_component_config_rejects_bad_values(overrides: dict, field: str, allowed: str) -> None:
    with pytest.raises(ValueError) as err:
        ComponentConfig(**overrides)
    msg = str(err.value)
    assert msg.startswith(f"{field}:"), msg
    assert allowed in msg, msg


def test_presets_and_overrides() -> None:
    assert set(PRESETS) == {"tiny", "small", "base"}
    base = ComponentConfig.preset("base")
    assert (base.n_layer, base.n_head, base.n_embd) == (20, 20, 800)
    tiny = ComponentConfig.preset("tiny", block_size=128, vocab_size=4096, flavour="leaky6")
    assert (tiny.block_size, tiny.vocab_size, tiny.flavour) == (128, 4096, "leaky6")
    assert tiny.n_embd == PRESETS["tiny"]["n_embd"]
    with pytest.raises(ValueError, match="preset: 'huge' is not one of tiny, small, base"):
        ComponentConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown field"):
        ComponentConfig.preset("tiny", n_embed=64)
    with pytest.raises(ValueError, match="window"):
        ComponentConfig.preset("tiny", window=0)


def test_component_config_round_trips_through_json() -> None:
    cfg = ComponentConfig.preset("small", flavour="relu3", mixer="attention", window=2, dropout=0.1)
    again = ComponentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['heads'\]"):
        ComponentConfig.from_dict({**cfg.to_dict(), "heads": 3})


def tiny(**kw) -> ComponentConfig:
    return ComponentConfig.preset("tiny", **kw)


def test_ensemble_names_are_module_major() -> None:
    cfg = EnsembleConfig(members=[tiny(), tiny(flavour="relu3")], modules=3, members_per_module=2)
    assert cfg.num_members == 6
    assert cfg.member_names == ["m0.0", "m0.1", "m1.0", "m1.1", "m2.0", "m2.1"]
    assert [cfg.module_of(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    # A per-slot list is repeated for every module.
    assert [m.flavour for m in cfg.members] == ["gelu4", "relu3"] * 3
    assert cfg.vocab_size == 260
    with pytest.raises(ValueError, match="out of range"):
        cfg.module_of(6)


@pytest.mark.parametrize(
    "kwargs,field,allowed",
    [
        ({"merge": "stack"}, "merge", ", ".join(MERGE_MODES)),
        ({"mixer": "conv"}, "mixer", ", ".join(MIXERS)),
        ({"merge_width": 30, "merge_heads": 4}, "merge_width", "merge_heads=4"),
        ({"merge_window": 0}, "merge_window", ">= 1"),
        ({"modules": 0}, "modules", ">= 1"),
        ({"members": [tiny()] * 3}, "members", "expected 2 (one per slot) or 4"),
        ({"members": [tiny(), tiny(vocab_size=300)]}, "members", "vocab_size"),
        ({"members": []}, "members", "non-empty"),
    ],
)
def test_ensemble_config_rejects_bad_values(kwargs: dict, field: str, allowed: str) -> None:
    args = {"members": [tiny(), tiny()], "modules": 2, "members_per_module": 2, **kwargs}
    with pytest.raises(ValueError) as err:
        EnsembleConfig(**args)
    msg = str(err.value)
    assert msg.startswith(f"{field}:"), msg
    assert allowed in msg, msg


def test_ensemble_config_round_trips_through_json() -> None:
    members = [tiny(), tiny(flavour="leaky6", n_embd=32), tiny(mixer="attention"), tiny(window=2)]
    cfg = EnsembleConfig(members=members, modules=2, members_per_module=2, merge="mixture", merge_width=32)
    again = EnsembleConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.members[1].n_embd == 32
    assert again.block_size == 256


def test_saved_configs_carry_a_format_version_and_old_ones_keep_their_defaults() -> None:
    cfg = EnsembleConfig(members=[tiny(), tiny()], modules=1, members_per_module=2)
    saved = cfg.to_dict()
    assert saved["format_version"] == CONFIG_FORMAT_VERSION
    # A current dict that leaves a field out takes today's default, as the dataclass does.
    current = {k: v for k, v in saved.items() if k not in ("merge", "evidence")}
    assert EnsembleConfig.from_dict(current) == cfg
    assert (cfg.merge, cfg.evidence) == ("mixture", True)
    # A dict written before the version existed was a fusion merger without evidence.
    old = {k: v for k, v in current.items() if k != "format_version"}
    again = EnsembleConfig.from_dict(old)
    assert (again.merge, again.evidence) == ("fusion", False)
    assert EnsembleConfig.from_dict({**old, "merge": "mixture"}).merge == "mixture"
    with pytest.raises(ValueError, match="format_version: 3"):
        EnsembleConfig.from_dict({**saved, "format_version": 3})


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"lr": 0}, "lr: must be > 0"),
        ({"seq_len": 1}, "seq_len: must be >= 2"),
        ({"switch_fraction": 1.0}, "switch_fraction: must be < 1"),
        ({"batch_size": 2.5}, "batch_size: must be an integer"),
        ({"joint": "yes"}, "joint: must be true or false"),
        ({"dtype": "float16"}, "dtype: 'float16' is not one of float32, bfloat16"),
    ],
)
def test_training_config_checks_its_bounds(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**overrides)


def test_training_config_round_trips_and_refuses_unknown_keys() -> None:
    cfg = TrainingConfig(phase1_steps=3, lr=1e-3, joint=True, dtype="bfloat16")
    assert TrainingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['steps'\]"):
        TrainingConfig.from_dict({"steps": 3})
