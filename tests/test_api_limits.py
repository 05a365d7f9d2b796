"""The API's per-member parameter limit (`LEVIATHAN_MAX_MEMBER_PARAMS`): a 422 naming the member."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError

from api.services.jobs import validate_for_submission
from api.settings import Settings
from jobs.spec import JobSpec
from leviathan.config import ComponentConfig


def _spec(storage, members) -> JobSpec:
    return JobSpec.model_validate({"storage": str(storage), "ensemble": {"members": members}})


def test_a_member_over_the_parameter_limit_is_422_naming_it(tmp_path, monkeypatch):
    tiny = ComponentConfig.preset("tiny").num_params  # byte vocabulary, context 256: the default spec's
    monkeypatch.setenv("LEVIATHAN_MAX_MEMBER_PARAMS", str(tiny))
    settings = Settings(storage=str(tmp_path))
    validate_for_submission(_spec(tmp_path, [{}, {}]), settings)  # at the limit: accepted

    with pytest.raises(RequestValidationError) as e:
        validate_for_submission(_spec(tmp_path, [{}, {"n_layer": 3}]), settings)
    (error,) = e.value.errors()
    assert error["loc"] == ("body", "ensemble", "members", 1), error
    assert f"at most {tiny} parameters" in error["msg"] and "max_member_params" in error["msg"], error
