"""`RAY_ADDRESS` is read in one place: the Jobs URL for the API, the cluster for a driver."""

from __future__ import annotations

import pytest

from leviathan.run.ray_address import ray_address


@pytest.mark.parametrize(
    "env,jobs",
    [
        ({}, None),
        ({"RAY_ADDRESS": "http://head:8265"}, "http://head:8265"),
        ({"RAY_ADDRESS": "http://a:8265", "RAY_API_SERVER_ADDRESS": "http://b:8265"}, "http://b:8265"),
        ({"RAY_API_SERVER_ADDRESS": "http://b:8265", "LEVIATHAN_RAY_ADDRESS": "http://c:8265"}, "http://c:8265"),
        ({"RAY_ADDRESS": "head:6379"}, "head:6379"),  # returned as given: the API's settings refuse it
    ],
)
def test_the_jobs_url_follows_ray_jobs_order(env, jobs):
    assert ray_address("jobs", env) == jobs


def test_the_cluster_is_ray_address_and_never_a_jobs_url():
    assert ray_address("cluster", {}) is None
    assert ray_address("cluster", {"RAY_ADDRESS": "head:6379", "LEVIATHAN_RAY_ADDRESS": "http://x:1"}) == "head:6379"
    with pytest.raises(ValueError, match="Jobs server URL.*ray job submit.*host:6379"):
        ray_address("cluster", {"RAY_ADDRESS": "http://head:8265"})


def test_the_api_refuses_a_gcs_address_as_its_jobs_url(monkeypatch):
    from api.settings import Settings

    for name in ("LEVIATHAN_RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    with pytest.raises(ValueError, match="Ray Jobs server URL"):
        Settings()
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert Settings().ray_address == "http://head:8265"


def test_a_driver_pointed_at_a_jobs_url_fails_with_the_fix(monkeypatch):
    import ray

    from cluster.session import init_ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh driver, whatever this session started
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    with pytest.raises(ValueError, match="ray job submit"):
        init_ray()
