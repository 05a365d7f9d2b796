"""The API's own checks, in process: auth, 422s naming the field, the API's limits,
the storage and data roots, 429, and what a valid submission hands to Ray.

No server and no Ray: each test runs `create_app(settings, gateway)` on httpx's
ASGITransport with an in-memory `JobsGateway` (tests/test_api_support.py). The
live-server tests (tests/test_api.py, test_api_hostile.py) cover the real gateway.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api.errors import InvalidField
from api.ray_jobs import RayJob
from api.services.jobs import validate_for_submission
from api.settings import Settings
from jobs.spec import JobSpec
from leviathan.config import ComponentConfig
from leviathan.run.folder import RunFolder
from tests.test_api_support import API_TOKEN, MemoryGateway, data_root_for, in_process, memory_settings, tiny_spec

pytestmark = pytest.mark.anyio

JOB_ROUTES = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/some-job"),
    ("GET", "/v1/jobs/some-job/metrics"),
    ("GET", "/v1/jobs/some-job/logs"),
    ("POST", "/v1/jobs/some-job/stop"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def settings_for(storage: Path, **overrides: Any) -> Settings:
    return memory_settings(storage, **overrides)


async def post_422(storage: Path, body: Any, **overrides: Any) -> list[dict]:
    async with in_process(settings_for(storage, **overrides)) as api:
        r = await api.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    return r.json()["detail"]


# ----------------------------------------------------------------------------- auth


@pytest.mark.parametrize("method,path", JOB_ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Basic {API_TOKEN}", f"Bearer {API_TOKEN}x"])
async def test_every_job_endpoint_needs_the_api_token(storage, method, path, auth):
    async with in_process(settings_for(storage), token=None) as api:
        headers = {"Authorization": auth} if auth else {}
        r = await api.request(method, path, headers=headers, json=tiny_spec("noauth") if method == "POST" else None)
    assert r.status_code == 401, (method, path, auth, r.text)
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"detail": "missing or invalid API token"}


async def test_without_an_api_token_setting_no_auth_is_needed(storage):
    async with in_process(settings_for(storage, api_token=None), token=None) as api:
        assert (await api.get("/v1/jobs")).status_code == 200


async def test_healthz_needs_no_token(storage):
    async with in_process(settings_for(storage), token=None) as api:
        r = await api.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "ray": "ok"}


# ----------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "patch,loc",
    [
        ({"ensemble": {"modules": 0}}, ["body", "ensemble", "modules"]),
        ({"training": {"seq_len": "long"}}, ["body", "training", "seq_len"]),
        ({"training": {"phase1_steps": 1, "epochs": 3}}, ["body", "training", "epochs"]),
        ({"name": "Bad Name!"}, ["body", "name"]),
        ({"resources": None}, ["body", "resources"]),
        ({"command": "rm -rf /"}, ["body", "command"]),
    ],
)
async def test_invalid_spec_is_422_naming_the_field(storage, patch, loc):
    body = tiny_spec("bad")
    body.update(patch)
    errors = await post_422(storage, body)
    assert any(e["loc"] == loc for e in errors), errors


async def test_spec_that_is_not_json_is_422(storage):
    async with in_process(settings_for(storage)) as api:
        r = await api.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize("path", [("name",), ("tracking", "experiment"), ("data", "manifest"), ("storage",),
                                  ("data", "domains", 0), ("ensemble", "members", 0, "flavour")])
async def test_a_lone_surrogate_is_422_naming_the_field_and_echoed_escaped(storage, path):
    body = tiny_spec("surrogate")
    body.setdefault("tracking", {})
    body["data"] = {"domains": ["a"]}
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "a\ud800b"  # json.dumps writes it as the escape \\ud800
    async with in_process(settings_for(storage)) as api:
        r = await api.post("/v1/jobs", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    (error,) = [e for e in r.json()["detail"] if e["loc"] == ["body", *path]]
    assert error["input"] == "a\\ud800b", error


async def test_a_lone_surrogate_in_an_unknown_key_or_path_is_4xx(storage):
    async with in_process(settings_for(storage)) as api:
        r = await api.post("/v1/jobs", content=b'{"name": "x", "\\udfff": 1}', headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "\\udfff" in r.text, r.text
        r = await api.get("/v1/jobs/%ED%A0%80")
        assert r.status_code == 404, r.text


# ----------------------------------------------------------------------------- tracking servers


@pytest.mark.parametrize("uri", [
    "http://169.254.169.254/latest",
    "https://mlflow.test:5000.evil.example/",
    "https://mlflow.test:5000@169.254.169.254/",
    "http://mlflow.test:5000/../../latest",
    "HTTP://mlflow.test:5000",
    "databricks://profile",
])
async def test_a_tracking_server_the_api_does_not_list_is_422(storage, uri):
    errors = await post_422(storage, {**tiny_spec("track"), "tracking": {"mlflow_uri": uri}},
                            tracking_uris="https://mlflow.test:5000")
    (error,) = [e for e in errors if e["loc"] == ["body", "tracking", "mlflow_uri"]]
    assert "https://mlflow.test:5000" in error["msg"], error


async def test_tracking_servers_default_to_none(storage):
    errors = await post_422(storage, {**tiny_spec("track"), "tracking": {"mlflow_uri": "http://127.0.0.1:5000"}})
    (error,) = [e for e in errors if e["loc"] == ["body", "tracking", "mlflow_uri"]]
    assert "LEVIATHAN_TRACKING_URIS" in error["msg"], error


async def test_listed_tracking_servers_and_local_stores_under_the_root_are_accepted(storage, monkeypatch):
    monkeypatch.setenv("LEVIATHAN_TRACKING_URIS", "https://mlflow.test:5000/, http://10.0.0.5:5000")
    env_settings = Settings(storage=str(storage), data_root=str(data_root_for(storage)))
    assert env_settings.tracking_uris == ["https://mlflow.test:5000/", "http://10.0.0.5:5000"]
    settings = settings_for(storage, tracking_uris=env_settings.tracking_uris)
    for uri in ["https://mlflow.test:5000", "https://mlflow.test:5000/", "https://mlflow.test:5000/team-a",
                "http://10.0.0.5:5000", f"file:{storage}/mlruns", f"sqlite:///{storage}/mlflow.db"]:
        spec = JobSpec.model_validate({**tiny_spec("track"), "storage": str(storage), "tracking": {"mlflow_uri": uri}})
        validate_for_submission(spec, settings)
    for uri in [f"file:{storage.parent}/mlruns", "sqlite:///tmp/mlflow.db"]:
        spec = JobSpec.model_validate({**tiny_spec("track"), "storage": str(storage), "tracking": {"mlflow_uri": uri}})
        with pytest.raises(InvalidField) as e:
            validate_for_submission(spec, settings)
        assert e.value.errors[0]["loc"] == ("body", "tracking", "mlflow_uri")


def test_a_tracking_prefix_must_be_a_uri(storage):
    with pytest.raises(ValueError, match="tracking URI prefix"):
        settings_for(storage, tracking_uris="mlflow.test:5000")


@pytest.mark.parametrize(
    "section,field,value,limit",
    [
        ("ensemble", "modules", 17, "max_modules"),
        ("training", "phase1_steps", 1_000_001, "max_steps"),
        ("training", "phase2_steps", 1_000_001, "max_steps"),
        ("training", "seq_len", 4097, "max_seq_len"),
    ],
)
async def test_limits_are_422_naming_the_field_and_limit(storage, section, field, value, limit):
    body = tiny_spec("big")
    body[section][field] = value
    errors = await post_422(storage, body)
    match = [e for e in errors if e["loc"] == ["body", section, field]]
    assert match and limit in match[0]["msg"], errors


def test_a_member_over_the_parameter_limit_is_422_naming_it(storage):
    tiny = ComponentConfig.preset("tiny").num_params  # byte vocabulary, context 256: the default spec's
    settings = settings_for(storage, max_member_params=tiny)

    def spec(members: list[dict]) -> JobSpec:
        return JobSpec.model_validate({"storage": str(storage), "ensemble": {"members": members}})

    validate_for_submission(spec([{}, {}]), settings)  # at the limit: accepted
    with pytest.raises(InvalidField) as e:
        validate_for_submission(spec([{}, {"n_layer": 3}]), settings)
    (error,) = e.value.errors
    assert error["loc"] == ("body", "ensemble", "members", 1), error
    assert f"at most {tiny} parameters" in error["msg"] and "max_member_params" in error["msg"], error


# ----------------------------------------------------------------------------- the roots


async def test_storage_outside_the_api_root_is_422(storage, tmp_path):
    (storage / "a-file").write_text("")
    for bad in [str(tmp_path), "relative/runs", "/", f"{storage}/../elsewhere", f"{storage}/a-file/runs"]:
        errors = await post_422(storage, {**tiny_spec("s"), "storage": bad})
        assert errors[0]["loc"] == ["body", "storage"], (bad, errors)


async def test_manifest_outside_the_data_root_is_422_whether_or_not_it_exists(storage, tmp_path):
    real = tmp_path / "prepared"
    real.mkdir()
    (real / "manifest.json").write_text(json.dumps({"domains": [{"name": "d0"}]}))
    answers = []
    for outside in [str(real), str(tmp_path / "nowhere"), "/etc/passwd", "relative/data", "s3://bucket/data"]:
        errors = await post_422(storage, {**tiny_spec("m"), "data": {"manifest": outside}})
        assert errors[0]["loc"] == ["body", "data", "manifest"], (outside, errors)
        answers.append(errors[0]["msg"])
    assert len(set(answers)) == 1 and "data root" in answers[0], answers


async def test_manifest_under_the_data_root_is_checked(storage, tmp_path):
    root = data_root_for(storage)
    root.mkdir(exist_ok=True)
    errors = await post_422(storage, {**tiny_spec("m"), "data": {"manifest": str(root / "nowhere")}})
    assert errors[0]["loc"] == ["body", "data", "manifest"] and "no manifest" in errors[0]["msg"], errors
    # A link inside the root to a folder outside it is outside.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "manifest.json").write_text(json.dumps({"domains": [{"name": "d0"}]}))
    (root / "link").symlink_to(outside)
    errors = await post_422(storage, {**tiny_spec("m"), "data": {"manifest": str(root / "link")}})
    assert "data root" in errors[0]["msg"], errors


async def test_list_rejects_bad_pagination_and_status(storage):
    async with in_process(settings_for(storage)) as api:
        for params in ({"limit": 0}, {"offset": -1}, {"status": "DONE"}):
            assert (await api.get("/v1/jobs", params=params)).status_code == 422, params


# ----------------------------------------------------------------------------- submission


async def test_concurrency_limit_is_429_and_submits_nothing(tmp_path):
    gateway = MemoryGateway()
    async with in_process(settings_for(tmp_path, max_concurrent_jobs=0), gateway) as api:
        r = await api.post("/v1/jobs", json=tiny_spec("toomany"))
        assert r.status_code == 429, r.text
        assert "max_concurrent_jobs" in r.json()["detail"]
        # A storage folder under the API's root passes validation too.
        r = await api.post("/v1/jobs", json={**tiny_spec("toomany"), "storage": str(tmp_path / "team-a")})
        assert r.status_code == 429, r.text
    assert gateway.submitted == []
    # No run folder: only the (empty) storage folder the spec named.
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] == ["team-a"]


async def test_a_valid_spec_becomes_one_ray_job_with_its_run_folder(storage):
    gateway = MemoryGateway()
    async with in_process(settings_for(storage, max_concurrent_jobs=1), gateway) as api:
        r = await api.post("/v1/jobs", json=tiny_spec("ok"))
        assert r.status_code == 201, r.text
        body = r.json()
        # The job it made counts against the limit now.
        assert (await api.post("/v1/jobs", json=tiny_spec("ok"))).status_code == 429
        detail = (await api.get(f"/v1/jobs/{body['job_id']}")).json()
        listed = (await api.get("/v1/jobs")).json()
    (submitted,) = gateway.submitted
    assert submitted["submission_id"] == body["job_id"] == f"leviathan-{body['run_name']}"
    assert submitted["entrypoint"] == f"python -m jobs.train --spec {RunFolder(body['run_dir']).spec}"
    assert submitted["metadata"]["leviathan_run_dir"] == body["run_dir"] == str(storage / body["run_name"])
    assert json.loads(Path(RunFolder(body["run_dir"]).spec).read_text())["name"] == body["run_name"]
    assert detail["leviathan"] and detail["run_dir"] == body["run_dir"] and detail["status"] == "PENDING"
    assert [m["member"] for m in detail["members"]] == ["m0.0"]
    assert listed["total"] == 1 and listed["jobs"][0]["job_id"] == body["job_id"]


async def test_a_refused_submission_leaves_no_run_folder(storage):
    from api.errors import RayUnavailable

    class Refusing(MemoryGateway):
        def submit(self, **kwargs: Any) -> None:
            raise RayUnavailable("Ray Jobs server unreachable: test")

    async with in_process(settings_for(storage), Refusing()) as api:
        r = await api.post("/v1/jobs", json=tiny_spec("refused"))
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    assert r.json() == {"detail": "Ray Jobs server unreachable: test"}
    assert list(storage.iterdir()) == []


async def test_unknown_job_is_404_on_every_route(storage):
    async with in_process(settings_for(storage)) as api:
        for method, suffix in [("GET", ""), ("GET", "/metrics"), ("GET", "/logs"), ("POST", "/stop")]:
            r = await api.request(method, f"/v1/jobs/no-such-job{suffix}")
            assert r.status_code == 404 and r.json() == {"detail": "no job 'no-such-job'"}, (method, suffix, r.text)


async def test_logs_tail_and_stop(storage):
    gateway = MemoryGateway()
    gateway.add(RayJob(submission_id="j1", type="SUBMISSION", status="RUNNING", entrypoint="echo"), "a\nb\nc\n")
    async with in_process(settings_for(storage), gateway) as api:
        assert (await api.get("/v1/jobs/j1/logs", params={"tail": 2})).text == "b\nc\n"
        assert (await api.get("/v1/jobs/j1/logs", params={"tail": 1, "follow": True})).text == "c\n"
        assert (await api.post("/v1/jobs/j1/stop")).json() == {"job_id": "j1", "stopped": True, "status": "STOPPED"}
        assert (await api.post("/v1/jobs/j1/stop")).json()["stopped"] is False


async def test_following_a_log_on_an_unreachable_cluster_is_503_not_an_empty_stream(storage):
    from api.errors import RayUnavailable

    class Unreachable(MemoryGateway):
        async def follow_logs(self, job_id: str):
            raise RayUnavailable("Ray Jobs server unreachable: test")

    gateway = Unreachable()
    gateway.add(RayJob(submission_id="j1", type="SUBMISSION", status="RUNNING", entrypoint="echo"), "a\n")
    async with in_process(settings_for(storage), gateway) as api:
        r = await api.get("/v1/jobs/j1/logs", params={"follow": True})
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
