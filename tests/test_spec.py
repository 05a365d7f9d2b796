"""The JobSpec reuses the model library's choices and checks (torch-free `leviathan.config`)."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest
from pydantic import ValidationError

from jobs.plan import ensemble_config
from jobs.spec import Flavour, JobSpec, MergeMode, Mixer, Preset, TrainingSpec
from leviathan.config import FLAVOURS, MERGE_MODES, MIXERS, PRESETS, ComponentConfig, EnsembleConfig, TrainingConfig


def _errors(body: dict) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(body)
    return [(".".join(str(x) for x in err["loc"]), err["msg"]) for err in e.value.errors()]


def test_spec_choices_are_the_model_librarys():
    assert get_args(Preset) == tuple(PRESETS)
    assert get_args(Flavour) == FLAVOURS
    assert get_args(Mixer) == MIXERS
    assert get_args(MergeMode) == MERGE_MODES


def test_member_sizes_override_a_preset_or_replace_it():
    spec = JobSpec.model_validate({"ensemble": {"members": [
        {"preset": "small", "n_layer": 2, "dropout": 0.1},
        {"preset": None, "n_layer": 3, "n_head": 3, "n_embd": 48, "flavour": "relu3"},
    ]}})
    config = ensemble_config(spec, vocab_size=300)
    small, custom = config.members[:2]
    assert (small.n_layer, small.n_head, small.n_embd, small.dropout) == (2, 6, 384, 0.1)
    assert (custom.n_layer, custom.n_head, custom.n_embd, custom.flavour) == (3, 3, 48, "relu3")
    assert custom.vocab_size == 300 and custom.block_size == spec.block_size
    assert spec.ensemble.member_params(300, spec.block_size) == [small.num_params, custom.num_params]


@pytest.mark.parametrize(
    "member,loc,message",
    [
        ({"n_head": 3}, "ensemble.members.0", "n_embd: 64 is not divisible by n_head=3"),
        ({"n_layer": 0}, "ensemble.members.0", "n_layer: must be an integer >= 1"),
        ({"dropout": 1.0}, "ensemble.members.0", "dropout: must be a number in [0, 1)"),
        ({"preset": None, "n_layer": 2, "n_embd": 64}, "ensemble.members.0", "n_head: required when no preset"),
        ({"n_embd": 64, "width": 3}, "ensemble.members.0.width", "Extra inputs are not permitted"),
    ],
)
def test_bad_member_sizes_name_the_field(member, loc, message):
    errors = _errors({"ensemble": {"members": [member, {}]}})
    assert any(l == loc and message in m for l, m in errors), errors


def test_ensemble_rules_are_the_ensemble_configs():
    errors = _errors({"ensemble": {"merge_width": 30, "merge_heads": 4}})
    assert any("merge_width: 30 is not divisible by merge_heads=4" in m for _, m in errors), errors
    errors = _errors({"ensemble": {"members": [{}, {}, {}]}})
    assert any("members: expected 2" in m for _, m in errors), errors


def test_residual_is_the_ensemble_configs_option():
    """`ensemble.residual` defaults to EnsembleConfig's, reaches the config, and keeps its rule
    (it corrects a mixture) with the field named."""
    assert JobSpec().ensemble.residual is EnsembleConfig.__dataclass_fields__["residual"].default
    spec = JobSpec.model_validate({"ensemble": {"residual": True}})
    assert spec.ensemble.to_config().residual is True
    assert ensemble_config(spec, 300).residual is True
    errors = _errors({"ensemble": {"residual": True, "merge": "fusion"}})
    assert any("residual: corrects a mixture" in m for _, m in errors), errors
    errors = _errors({"ensemble": {"residual": "maybe"}})
    assert [loc for loc, _ in errors] == ["ensemble.residual"], errors


@pytest.mark.parametrize("gpus", [0.5, 2.0])
def test_gpus_per_worker_must_be_one_with_use_gpu(gpus):
    errors = _errors({"resources": {"use_gpu": True, "gpus_per_worker": gpus}})
    assert any("gpus_per_worker: must be 1 with use_gpu" in m for _, m in errors), errors
    JobSpec.model_validate({"resources": {"use_gpu": True, "gpus_per_worker": 1}})
    JobSpec.model_validate({"resources": {"use_gpu": False, "gpus_per_worker": gpus}})


@pytest.mark.parametrize(
    "config",
    [
        ComponentConfig.preset("tiny"),
        ComponentConfig.preset("small", flavour="relu3", vocab_size=4096),
        ComponentConfig.preset("tiny", mixer="attention", flavour="leaky6", bias=True),
        ComponentConfig(n_layer=3, n_head=3, n_embd=48, window=7, block_size=100, bias=True),
    ],
)
def test_parameter_count_without_torch_matches_the_model(config):
    from leviathan.model.component import LeviathanComponent

    assert config.num_params == LeviathanComponent(config).num_params()


def test_base_preset_parameter_count_matches_the_model():
    import torch

    from leviathan.model.component import LeviathanComponent

    config = ComponentConfig.preset("base")
    with torch.device("meta"):
        model = LeviathanComponent(config)
    assert config.num_params == model.num_params()


def test_a_notebook_config_equals_a_specs():
    """Defaults live once, in leviathan.config: the same members built by hand and by a
    default spec give the same ensemble and training configs."""
    spec = JobSpec()
    members = [ComponentConfig.preset("tiny", flavour="gelu4"), ComponentConfig.preset("tiny", flavour="relu3")]
    notebook = EnsembleConfig(members=members, modules=4, members_per_module=2)
    assert spec.ensemble.to_config() == notebook
    assert spec.training.to_config() == TrainingConfig()


def test_the_training_table_is_derived_from_training_config():
    fields = dataclasses.fields(TrainingConfig)
    assert list(TrainingSpec.model_fields) == [f.name for f in fields]
    for f in fields:
        spec_field = TrainingSpec.model_fields[f.name]
        assert spec_field.default == f.default, f.name
        assert spec_field.description == f.metadata["description"], f.name
    errors = _errors({"training": {"lr": 0, "dtype": "float16", "switch_fraction": 1}})
    assert {loc for loc, _ in errors} == {"training.lr", "training.dtype", "training.switch_fraction"}
    assert JobSpec.model_validate({"training": {"lr": 0.01}}).training.to_config().lr == 0.01
