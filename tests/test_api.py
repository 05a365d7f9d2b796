"""The REST API against a real uvicorn server on loopback and the session's real Ray.

Fast tests cover 404s from the real gateway, jobs from `ray job submit`, the Ray
token pass-through and the metrics reader; the API's own validation (auth, 422, 429)
runs in process in tests/test_api_validation.py. The slow ones train real tiny jobs: one to
SUCCEEDED (metrics, logs, an API restart), one stopped while it runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from api.metrics import MetricsReader, read_records
from api.settings import RayTokenSource, Settings
from tests.conftest import REPO_ROOT, free_port
from tests.test_api_support import (
    LiveServer,
    make_settings,
    submit,
    tiny_spec,
    wait_for_status,
)

@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api-runs")


@pytest.fixture(scope="module")
def server(ray_cluster, storage):
    with LiveServer(make_settings(ray_cluster, storage)) as s:
        yield s


@pytest.fixture
def api(server):
    with server.client() as c:
        yield c


# ----------------------------------------------------------------------------- app basics


def test_importing_the_app_does_not_import_torch():
    code = "import sys, api.app; bad = [m for m in ('torch', 'ray.train') if m in sys.modules]; print(bad)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_healthz_needs_no_token_and_sees_ray(server):
    with server.client(token=None) as c:
        r = c.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "ray": "ok"}


def test_openapi_docs_are_served(server):
    with server.client(token=None) as c:
        assert c.get("/docs").status_code == 200
        paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/logs",
            "/v1/jobs/{job_id}/stop", "/healthz"} <= set(paths)


@pytest.mark.parametrize("job_id", ["no-such-job", "raysubmit_XXXXXXXXXXXXXXXX", "a b", "..", "x" * 300])
def test_unknown_job_is_404(api, job_id):
    for method, suffix in [("GET", ""), ("GET", "/metrics"), ("GET", "/logs"), ("POST", "/stop")]:
        r = api.request(method, f"/v1/jobs/{job_id}{suffix}")
        assert r.status_code == 404, (method, suffix, r.text)
        assert "detail" in r.json()


# ----------------------------------------------------------------------------- Ray as the source of truth


def test_job_from_ray_job_submit_shows_with_ray_fields(api, ray_cluster):
    sid = f"plain-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
         "--submission-id", sid, "--no-wait", "--", "echo", "hello from ray job submit"],
        env=ray_cluster.cli_env(), check=True, capture_output=True, timeout=60,
    )
    body = wait_for_status(api, sid, {"SUCCEEDED"}, timeout=60)
    assert body["status"] == "SUCCEEDED", body
    assert body["leviathan"] is False and body["run_dir"] is None
    assert body["phase"] is None and body["members"] is None
    assert body["dashboard_url"].endswith(f"/#/jobs/{sid}")
    listed = api.get("/v1/jobs", params={"status": "SUCCEEDED", "limit": 500}).json()["jobs"]
    assert sid in [j["job_id"] for j in listed]
    metrics = api.get(f"/v1/jobs/{sid}/metrics").json()
    assert metrics["records"] == [] and metrics["run_dir"] is None
    full = api.get(f"/v1/jobs/{sid}/logs").text
    assert "hello from ray job submit\n" in full.splitlines(keepends=True), full  # the echo's own line
    tail = api.get(f"/v1/jobs/{sid}/logs", params={"tail": 2}).text
    assert tail == "".join(full.splitlines(keepends=True)[-2:])


def test_list_paginates_newest_first(api, ray_cluster):
    from ray.job_submission import JobSubmissionClient

    ray = JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_cluster.auth_headers())
    for _ in range(2):  # at least two jobs, whatever else the session ran
        ray.submit_job(entrypoint="true", submission_id=f"page-{uuid.uuid4().hex[:8]}")
    everything = api.get("/v1/jobs", params={"limit": 500}).json()
    jobs = everything["jobs"]
    assert everything["total"] == len(jobs) >= 2
    starts = [j["start_time"] for j in jobs]
    assert starts == sorted(starts, reverse=True)
    page = api.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()
    assert [j["job_id"] for j in page["jobs"]] == [jobs[1]["job_id"]]


def test_wrong_ray_token_is_a_502_not_a_leak(ray_cluster, storage):
    if not ray_cluster.auth_token:
        pytest.skip("the session's Ray runs without token auth")
    settings = make_settings(ray_cluster, storage, ray_auth_token="not-the-cluster-token")
    with LiveServer(settings) as s, s.client() as c:
        r = c.get("/v1/jobs")
        assert r.status_code == 502 and "Ray token" in r.json()["detail"], r.text
        assert "not-the-cluster-token" not in r.text
        assert c.get("/healthz").json()["ray"] == "unauthorized"


def test_ray_token_is_reread_only_when_the_file_changes(tmp_path):
    token_file = tmp_path / "auth_token"
    source = RayTokenSource(Settings(ray_auth_token=None, ray_auth_token_path=token_file))
    assert source.get() is None
    token_file.write_text("first\n")
    assert source.get() == "first"
    stamp = token_file.stat()
    # Same size and modification time: the cached token stands (no read per call).
    token_file.write_text("furst\n")
    os.utime(token_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert source.get() == "first"
    # A rotated token (a new modification time) is picked up without a restart.
    token_file.write_text("second")
    os.utime(token_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    assert source.get() == "second"
    explicit = RayTokenSource(Settings(ray_auth_token="explicit", ray_auth_token_path=token_file))
    assert explicit.get() == "explicit"


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LEVIATHAN_RAY_ADDRESS", "http://10.0.0.1:8265/")
    monkeypatch.setenv("LEVIATHAN_API_TOKEN", "abc")
    monkeypatch.setenv("LEVIATHAN_MAX_MODULES", "3")
    monkeypatch.setenv("LEVIATHAN_STORAGE", str(tmp_path))
    s = Settings()
    assert (s.ray_address, s.api_token.get_secret_value(), s.max_modules) == ("http://10.0.0.1:8265", "abc", 3)
    assert (s.host, s.port, s.storage) == ("127.0.0.1", 8000, str(tmp_path))
    monkeypatch.delenv("LEVIATHAN_RAY_ADDRESS")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)  # it would come before RAY_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ValueError, match="Ray Jobs server URL"):
        Settings()


# ----------------------------------------------------------------------------- metrics.jsonl


def _record(step: int, member: str, **kw) -> dict:
    rec = {"time": 1000.0 + step, "step": step, "phase": "members", "module": 0, "member": member,
           "domain": "d0", "train_loss": None, "val_loss": None, "mixed_val_loss": None, "lr": 0.001,
           "tokens_per_s": 10.0, "replayed": False}
    rec.update(kw)
    return rec


def test_metrics_reader_folds_appended_lines_and_skips_bad_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader()
    assert reader.summary(str(tmp_path)) is None
    lines = [
        json.dumps(_record(1, "m0.0", train_loss=3.0)),
        "not json",
        json.dumps(_record(2, "m0.0", val_loss=2.5)),
        json.dumps(_record(2, "m1.0", module=1, train_loss=float("nan"))),
    ]
    path.write_text("\n".join(lines) + "\n" + '{"step": 3, "member": "m0.0", "train_lo')  # torn last line
    s = reader.summary(str(tmp_path))
    assert s.records == 3 and s.step == 2 and s.phase == "members"
    # Latest value of each figure: the eval record keeps the earlier train loss.
    assert (s.members["m0.0"]["train_loss"], s.members["m0.0"]["val_loss"]) == (3.0, 2.5)
    assert s.members["m1.0"]["train_loss"] is None  # NaN cannot travel as JSON
    with open(path, "a") as f:  # the writer finishes the torn line, then more
        f.write('ss": 1.5}\n' + json.dumps(_record(5, "merged", phase="merge", module=None, train_loss=1.0)) + "\n")
        f.write(json.dumps({"phase": "done", "time": 2000.0, "step": 5}) + "\n")
    s = reader.summary(str(tmp_path))
    assert s.records == 6 and s.phase == "done" and s.step == 5
    assert s.members["m0.0"]["train_loss"] == 1.5 and s.members["m0.0"]["step"] == 3
    assert s.members["merged"]["phase"] == "merge"
    assert [r["step"] for r in read_records(str(tmp_path), since_step=2)] == [3, 5, 5]
    assert not any(isinstance(v, float) and math.isnan(v) for r in read_records(str(tmp_path)) for v in r.values())


def test_metrics_reader_reuses_its_snapshot_until_the_log_grows(tmp_path):
    """Most status polls find the log unchanged: they get the previous snapshot, and a
    snapshot handed out never changes when more lines are folded in."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_record(1, "m0.0", train_loss=3.0)) + "\n")
    reader = MetricsReader()
    first = reader.summary(str(tmp_path))
    assert reader.summary(str(tmp_path)) is first
    with open(path, "a") as f:
        f.write(json.dumps(_record(2, "m0.0", train_loss=2.0)) + "\n")
    second = reader.summary(str(tmp_path))
    assert second.records == 2 and second.members["m0.0"]["train_loss"] == 2.0
    assert first.records == 1 and first.members["m0.0"]["train_loss"] == 3.0
    path.write_text(json.dumps(_record(1, "m1.0", module=1)) + "\n")  # replaced by a shorter log
    third = reader.summary(str(tmp_path))
    assert third.records == 1 and set(third.members) == {"m1.0"}


def test_metrics_reader_follows_a_log_on_an_object_store(s3_bucket):
    """On S3 the training job writes part files; the reader resumes after the parts it
    has read, so each poll reads only what was appended since."""
    from cluster.metrics import MetricsLog

    run_dir = f"{s3_bucket}/runs/r1"
    reader = MetricsReader()
    assert reader.summary(run_dir) is None
    writer = MetricsLog(run_dir)
    writer.append([_record(1, "m0.0", train_loss=3.0), _record(1, "m1.0", module=1, train_loss=4.0)])
    s = reader.summary(run_dir)
    assert s.records == 2 and s.members["m1.0"]["train_loss"] == 4.0
    writer.append([_record(2, "m0.0", val_loss=2.5)])
    MetricsLog(run_dir).append([{"phase": "done", "time": 2000.0, "step": 2}])  # the driver's last line
    s = reader.summary(run_dir)
    assert s.records == 4 and s.phase == "done"
    assert (s.members["m0.0"]["train_loss"], s.members["m0.0"]["val_loss"]) == (3.0, 2.5)
    assert [r["step"] for r in read_records(run_dir, since_step=1)] == [2, 2]


# ----------------------------------------------------------------------------- real training jobs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_job_succeeds_with_metrics_logs_and_survives_an_api_restart(server, api, ray_cluster, storage):
    from ray.job_submission import JobSubmissionClient

    r = submit(api, tiny_spec("tiny-api", steps=4, modules=2))
    assert r.status_code == 201, r.text
    sub = r.json()
    job_id, run_dir = sub["job_id"], Path(sub["run_dir"])
    assert job_id == f"leviathan-{sub['run_name']}" and sub["run_name"].startswith("tiny-api-")
    assert run_dir.parent == storage
    written = json.loads((run_dir / "spec.json").read_text())
    assert written["name"] == sub["run_name"] and written["storage"] == str(storage)

    # It is a plain Ray job: the Jobs server (what `ray job list` reads) knows it.
    ray = JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_cluster.auth_headers())
    info = ray.get_job_info(job_id)
    assert info.entrypoint == f"python -m jobs.train --spec {run_dir / 'spec.json'}"
    assert info.metadata["leviathan_spec_name"] == "tiny-api"
    assert info.metadata["leviathan_run_dir"] == str(run_dir)
    assert job_id in [j.submission_id for j in ray.list_jobs()]

    body = wait_for_status(api, job_id, {"SUCCEEDED"}, timeout=240)
    logs = api.get(f"/v1/jobs/{job_id}/logs").text
    assert body["status"] == "SUCCEEDED", logs[-3000:]
    assert body["leviathan"] and body["spec_name"] == "tiny-api" and body["end_time"]
    assert body["phase"] == "done" and body["phase1_steps"] == 4
    members = {m["member"]: m for m in body["members"]}
    for name in ("m0.0", "m1.0"):
        assert members[name]["step"] is not None and members[name]["train_loss"] is not None, members

    # Metrics come from the run's metrics.jsonl, filtered by since_step.
    m = api.get(f"/v1/jobs/{job_id}/metrics").json()
    assert m["records"] == read_records(str(run_dir)) and m["records"]
    assert m["records"][-1]["phase"] == "done"
    later = api.get(f"/v1/jobs/{job_id}/metrics", params={"since_step": 2}).json()["records"]
    assert later and all(rec["step"] > 2 for rec in later)

    # Logs: the tail is the end of the whole log; the stream of a finished job ends.
    assert f"Running entrypoint for job {job_id}" in logs
    tail = api.get(f"/v1/jobs/{job_id}/logs", params={"tail": 3}).text
    assert tail == "".join(logs.splitlines(keepends=True)[-3:])
    with api.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": True}) as s:
        streamed = "".join(s.iter_text())
    assert s.status_code == 200 and f"Running entrypoint for job {job_id}" in streamed

    # A fresh API process knows everything the first one did: Ray holds it all.
    with LiveServer(server.settings) as again, again.client() as c2:
        assert c2.get(f"/v1/jobs/{job_id}").json() == api.get(f"/v1/jobs/{job_id}").json()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_running_job_stops_and_its_log_stream_ends(api):
    r = submit(api, tiny_spec("stop-me", steps=100_000))
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    # Stop it mid-training: once its first metrics are in, the worker group is up.
    deadline = time.monotonic() + 180
    body = wait_for_status(api, job_id, {"RUNNING"}, timeout=120)
    while body["status"] == "RUNNING" and body["step"] is None and time.monotonic() < deadline:
        time.sleep(1)
        body = api.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "RUNNING" and body["phase"] == "members", body
    assert any(m["step"] is not None for m in body["members"]), body

    streamed: list[str] = []
    streaming = threading.Event()

    def follow() -> None:
        with api.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": True}, timeout=120) as s:
            for chunk in s.iter_text():
                streamed.append(chunk)
                streaming.set()

    reader = threading.Thread(target=follow)
    reader.start()
    assert streaming.wait(timeout=60), "the log stream sent nothing"
    r = api.post(f"/v1/jobs/{job_id}/stop")
    assert r.status_code == 200 and r.json()["stopped"] is True, r.text
    body = wait_for_status(api, job_id, {"STOPPED"}, timeout=60)
    assert body["status"] == "STOPPED", body
    reader.join(timeout=60)
    assert not reader.is_alive(), "the log stream did not end with the job"
    assert f"Running entrypoint for job {job_id}" in "".join(streamed)
    again = api.post(f"/v1/jobs/{job_id}/stop").json()
    assert again == {"job_id": job_id, "stopped": False, "status": "STOPPED"}


def test_job_upload_holds_the_code_and_stays_small():
    # What Ray would zip for a job's working_dir: the packages, not .git/.venv/caches.
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    from api.services.jobs import UPLOAD_EXCLUDES

    files: list[Path] = []
    _dir_travel(REPO_ROOT, [_get_excludes(REPO_ROOT, UPLOAD_EXCLUDES)], files.append, include_gitignore=True)
    names = {str(f.relative_to(REPO_ROOT)) for f in files if f.is_file()}
    assert {"jobs/spec.py", "api/app.py", "leviathan/__init__.py", "pyproject.toml"} <= names, names
    assert not any(n.startswith((".git/", ".venv/", ".hypothesis/")) for n in names)
    assert sum((REPO_ROOT / n).stat().st_size for n in names) < 100 * 2**20  # Ray's upload cap


# ----------------------------------------------------------------------------- jobs from `ray job submit`


def _ray_job_submit(ray_cluster, sid: str, *args: str) -> None:
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
         "--submission-id", sid, "--no-wait", *args],
        env=ray_cluster.cli_env(), check=True, capture_output=True, timeout=60,
    )


def _fake_run_folder(storage: Path, name: str) -> Path:
    """A run folder as jobs.train leaves it mid-run: its spec.json and a metrics line."""
    run_dir = storage / name
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(json.dumps({**tiny_spec(name, steps=7, modules=2), "storage": str(storage)}))
    (run_dir / "metrics.jsonl").write_text(json.dumps(_record(3, "m1.0", module=1, train_loss=2.0)) + "\n")
    return run_dir


@pytest.mark.parametrize("channel", ["entrypoint", "metadata"])
def test_training_job_from_ray_job_submit_shows_its_progress(api, ray_cluster, storage, channel):
    name = f"cli-{channel}-{uuid.uuid4().hex[:6]}"
    run_dir = _fake_run_folder(storage, name)
    sid = f"{name}-job"
    if channel == "entrypoint":  # a real jobs.train entrypoint (it stops at the missing spec file)
        _ray_job_submit(ray_cluster, sid, "--", "python", "-m", "jobs.train", "--spec", "/nonexistent.toml",
                        "--name", name, "--storage", str(storage))
    else:
        _ray_job_submit(ray_cluster, sid, "--metadata-json", json.dumps({"leviathan_run_name": name}),
                        "--", "echo", "wrapped")
    body = wait_for_status(api, sid, {"SUCCEEDED", "FAILED"}, timeout=120)
    assert body["leviathan"] is True and body["run_name"] == name and body["run_dir"] == str(run_dir), body
    assert (body["phase"], body["step"], body["phase1_steps"], body["metrics_records"]) == ("members", 3, 7, 1)
    members = {m["member"]: m for m in body["members"]}
    assert set(members) == {"m0.0", "m1.0"} and members["m1.0"]["train_loss"] == 2.0, members
    metrics = api.get(f"/v1/jobs/{sid}/metrics").json()
    assert metrics["run_dir"] == str(run_dir) and [r["step"] for r in metrics["records"]] == [3]


@pytest.mark.parametrize(
    "metadata,entrypoint,run_dir",
    [
        ({}, "python -m jobs.train --spec s.toml --name a1", "{root}/a1"),
        ({}, "leviathan train --name=a1 --storage {root}/team", "{root}/team/a1"),
        ({}, "/venv/bin/leviathan train --spec s.toml --name a1", "{root}/a1"),
        ({}, "env A=1 /venv/bin/python3.11 -u -m jobs.train --name a1", "{root}/a1"),
        ({"leviathan_run_name": "a1"}, "bash wrapper.sh", "{root}/a1"),
        ({"leviathan_run_dir": "{root}/a1-0f0f0f"}, "python -m jobs.train --spec x", "{root}/a1-0f0f0f"),
        # Outside the storage root, or no usable name: a Leviathan job whose folder is not read.
        ({}, "python -m jobs.train --spec s.toml", None),
        ({}, "python -m jobs.train --name a1 --storage /etc", None),
        ({}, "python -m jobs.train --name a1 --storage {root}/../x", None),
        ({}, "python -m jobs.train --name a1 --storage relative", None),
        ({}, "python -m jobs.train --name ../../etc", None),
        ({"leviathan_run_dir": "/etc"}, "python -m jobs.train", None),
        ({"leviathan_run_name": "../etc"}, "echo", None),
    ],
)
def test_run_folder_of_a_job_stays_under_the_storage_root(metadata, entrypoint, run_dir):
    from api.ray_jobs import RayJob
    from api.services.runs import run_of

    root = "/srv/runs"
    job = RayJob(submission_id="s", type="SUBMISSION", status="RUNNING",
                 entrypoint=entrypoint.format(root=root),
                 metadata={k: v.format(root=root) for k, v in metadata.items()})
    run = run_of(job, root)
    assert run is not None
    assert run.run_dir == (run_dir.format(root=root) if run_dir else None), run


@pytest.mark.parametrize("entrypoint", ["python train.py --name a1", "echo -m jobs.train", "python -m jobs.evaluate --run x"])
def test_other_jobs_are_not_leviathan_jobs(entrypoint):
    from api.ray_jobs import RayJob
    from api.services.runs import run_of

    job = RayJob(submission_id="s", type="SUBMISSION", status="RUNNING", entrypoint=entrypoint)
    assert run_of(job, "/srv/runs") is None


# ----------------------------------------------------------------------------- leviathan serve


def _serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LEVIATHAN_API_TOKEN"}
    env["LEVIATHAN_RAY_ADDRESS"] = "http://127.0.0.1:9"  # no Ray needed to bind
    return env


def test_serve_refuses_an_open_bind_without_a_token():
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=REPO_ROOT, env=_serve_env(), capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "LEVIATHAN_API_TOKEN" in r.stderr and "--insecure" in r.stderr


def test_serve_insecure_binds_openly_and_says_so():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--host", "0.0.0.0", "--port", str(port), "--insecure"],
        cwd=REPO_ROOT, env=_serve_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # Open: the job routes need no token.
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs", timeout=10).status_code == 503  # no Ray there
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "--insecure" in err and "without an API token" in err, err


# ----------------------------------------------------------------------------- the Ray gateway


@pytest.mark.parametrize("cache_s", [0.0, 0.4])
def test_status_calls_share_one_ray_request_and_its_answer_for_at_most_the_cache_time(ray_cluster, storage, cache_s):
    import asyncio

    from ray.job_submission import JobSubmissionClient

    from api.errors import NotFound
    from api.ray_jobs import RayGateway

    sid = f"share-{uuid.uuid4().hex[:8]}"
    JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_cluster.auth_headers()).submit_job(
        entrypoint="true", submission_id=sid)
    missing = f"raysubmit_{uuid.uuid4().hex[:16]}"

    async def scenario() -> dict[str, int]:
        gateway = RayGateway(make_settings(ray_cluster, storage, status_cache_s=cache_s))
        await gateway.start()
        asked: list[str] = []
        ask_ray = gateway._call

        async def counted(method: str, path: str, job_id: str | None = None):  # still asks the real Ray
            asked.append(path)
            return await ask_ray(method, path, job_id)

        def asks_for(job_id: str) -> int:
            return asked.count(f"/api/jobs/{job_id}")

        gateway._call = counted
        counts = {}
        try:
            jobs = await asyncio.gather(*(gateway.job(sid) for _ in range(20)))
            assert {j.submission_id for j in jobs} == {sid}
            counts["together"] = asks_for(sid)
            for _ in range(3):  # one after another, within the cache time
                await gateway.job(sid)
            counts["one_by_one"] = asks_for(sid) - counts["together"]
            await asyncio.sleep(cache_s + 0.1)
            await gateway.job(sid)
            counts["after_the_cache_time"] = asks_for(sid) - counts["together"] - counts["one_by_one"]
            await gateway.stop(sid)
            before = asks_for(sid)
            await gateway.job(sid)
            counts["after_a_stop"] = asks_for(sid) - before
            for _ in range(2):
                with pytest.raises(NotFound):
                    await gateway.job(missing)
            counts["errors"] = asks_for(missing)
        finally:
            await gateway.aclose()
        return counts

    counts = asyncio.run(scenario())
    assert counts == {"together": 1, "one_by_one": 0 if cache_s else 3, "after_the_cache_time": 1,
                      "after_a_stop": 1, "errors": 2}, counts
