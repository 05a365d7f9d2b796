"""Admission control against a live server and the session's real Ray (4 CPUs, no GPU,
no autoscaler): a job the nodes cannot hold is refused with 422 naming the resource,
what was asked and what the cluster has; LEVIATHAN_ALLOW_UNSCHEDULABLE=1 lets it
through; the active-job limit answers 429 with Retry-After."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_api_support import LiveServer, make_settings, submit, tiny_spec, wait_for_status


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("admission-runs")


@pytest.fixture(scope="module")
def server(ray_cluster, storage):
    with LiveServer(make_settings(ray_cluster, storage)) as s:
        yield s


def _with_resources(spec: dict, **resources) -> dict:
    return {**spec, "resources": {**spec["resources"], **resources}}


def _cluster_cpus() -> float:
    import ray

    return ray.cluster_resources()["CPU"]


def _refusal(server, spec: dict) -> dict:
    with server.client() as c:
        r = submit(c, spec)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    return error


def test_a_worker_larger_than_every_node_is_422_naming_cpus(server, storage):
    cpus = _cluster_cpus()
    error = _refusal(server, _with_resources(tiny_spec("too-big"), cpus_per_worker=64))
    assert error["loc"] == ["body", "resources", "cpus_per_worker"]
    assert error["input"] == 64
    msg = error["msg"]
    assert "1 worker(s) x (64 CPU) each" in msg and "no node has 64 CPU" in msg, msg
    assert re.search(rf"the cluster has {cpus:g} CPU in total over \d+ node\(s\)", msg), (msg, cpus)
    assert "LEVIATHAN_ALLOW_UNSCHEDULABLE=1" in msg and "autoscaling" in msg
    assert not any(storage.iterdir()), "a refused job leaves no run folder"


def test_more_workers_than_the_nodes_hold_is_422_naming_workers(server):
    cpus = _cluster_cpus()
    per_worker = cpus / 2 + 0.5  # one fits on the 4-CPU head, two do not
    error = _refusal(server, _with_resources(tiny_spec("two-big", modules=2), workers=2, cpus_per_worker=per_worker))
    assert error["loc"] == ["body", "resources", "workers"]
    assert f"2 worker(s) x ({per_worker:g} CPU) each" in error["msg"]
    assert "the nodes hold only 1 such worker(s)" in error["msg"], error["msg"]


def test_a_gpu_job_on_a_cluster_without_gpus_is_422_naming_the_gpu(server):
    error = _refusal(server, _with_resources(tiny_spec("gpu"), use_gpu=True))
    assert error["loc"] == ["body", "resources", "use_gpu"]
    assert "no node has 1 GPU" in error["msg"] and "0 GPU in total" in error["msg"], error["msg"]


def test_allow_unschedulable_submits_and_tells_the_driver_to_wait(ray_cluster, tmp_path):
    """What an operator of an autoscaling cluster gets: the job is accepted (201) and its
    driver runs with LEVIATHAN_ALLOW_UNSCHEDULABLE=1, so it waits for nodes instead of
    refusing; here no node comes, so the test stops it."""
    from ray.job_submission import JobSubmissionClient

    with LiveServer(make_settings(ray_cluster, tmp_path, allow_unschedulable=True)) as s, s.client() as c:
        r = submit(c, _with_resources(tiny_spec("anyway"), cpus_per_worker=64))
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        try:
            info = JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_cluster.auth_headers()).get_job_info(job_id)
            assert info.runtime_env["env_vars"]["LEVIATHAN_ALLOW_UNSCHEDULABLE"] == "1"
        finally:
            c.post(f"/v1/jobs/{job_id}/stop")
        assert wait_for_status(c, job_id, {"STOPPED"}, timeout=60)["status"] in ("STOPPED", "FAILED")


def test_the_active_job_limit_is_429_with_retry_after(ray_cluster, tmp_path):
    with LiveServer(make_settings(ray_cluster, tmp_path, max_concurrent_jobs=0)) as s, s.client() as c:
        r = submit(c, tiny_spec("full"))
    assert r.status_code == 429, r.text
    assert r.headers["Retry-After"] == "30"
    assert "max_concurrent_jobs" in r.json()["detail"]
