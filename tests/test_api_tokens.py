"""Per-user API tokens and job ownership: every route against every role.

Callers: `reader` (alice's read token), `alice` and `bob` (submit tokens), `admin`
(an admin line of the token file), `single` (LEVIATHAN_API_TOKEN, one more admin)
and `none` (no token). Jobs: alice's, bob's, and one submitted to Ray directly
(no owner). MATRIX is the expected status of each route for each caller; it runs
twice: in process on an in-memory gateway (fast, every cell), and against a live
uvicorn server on the session's real Ray, where alice and bob each train one tiny
job and the submit row posts a spec that is refused after the role check (422
where the role may submit), so no caller starts more training than the two jobs.

The token file is written with `leviathan token` (cli.token) and edited while
the server runs: it is re-read when it changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.auth import META_OWNER, TokenEntry, hash_token, parse_tokens, read_token_file, write_token_file
from api.ray_jobs import RayJob
from api.settings import Settings
from cli.token import issue, revoke
from tests.conftest import REPO_ROOT
from tests.test_api_support import (
    API_TOKEN, LiveServer, MemoryGateway, data_root_for, make_settings, memory_settings, submit, tiny_spec,
)

CALLERS = ["reader", "alice", "bob", "admin", "single", "none"]
# route  job    then the status for each caller, in CALLERS order. "-": the route names no job.
MATRIX_TEXT = """
list     -      200 200 200 200 200 401
submit   -      403 201 201 201 201 401
detail   alice  200 200 404 200 200 401
detail   bob    404 404 200 200 200 401
detail   ray    404 404 404 200 200 401
metrics  alice  200 200 404 200 200 401
metrics  bob    404 404 200 200 200 401
metrics  ray    404 404 404 200 200 401
logs     alice  200 200 404 200 200 401
logs     bob    404 404 200 200 200 401
logs     ray    404 404 404 200 200 401
stop     alice  403 200 404 200 200 401
stop     bob    403 404 200 200 200 401
stop     ray    403 404 404 200 200 401
healthz  -      200 200 200 200 200 200
"""
ROUTES = {
    "list": ("GET", "/v1/jobs"),
    "submit": ("POST", "/v1/jobs"),
    "detail": ("GET", "/v1/jobs/{job}"),
    "metrics": ("GET", "/v1/jobs/{job}/metrics"),
    "logs": ("GET", "/v1/jobs/{job}/logs"),
    "stop": ("POST", "/v1/jobs/{job}/stop"),
    "healthz": ("GET", "/healthz"),
}


def _matrix() -> list[tuple[str, str, str, int]]:
    cells = []
    for line in MATRIX_TEXT.strip().splitlines():
        route, job, *codes = line.split()
        assert len(codes) == len(CALLERS), line
        cells += [(route, job, caller, int(code)) for caller, code in zip(CALLERS, codes)]
    return cells


MATRIX = _matrix()
CELL_IDS = [f"{route}-{job}-{caller}" for route, job, caller, _ in MATRIX]
VISIBLE = {"reader": {"alice"}, "alice": {"alice"}, "bob": {"bob"}, "admin": {"alice", "bob", "ray"},
           "single": {"alice", "bob", "ray"}}


def issue_tokens(path: Path) -> dict[str, str | None]:
    """The callers' tokens, issued into `path` through the CLI's functions."""
    return {
        "reader": issue(path, "alice", "read"),
        "alice": issue(path, "alice", "submit"),
        "bob": issue(path, "bob", "submit"),
        "admin": issue(path, "root", "admin"),
        "single": API_TOKEN,
        "none": None,
    }


def headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_cell(response: httpx.Response, route: str, caller: str, expected: int, job_ids: dict[str, str]) -> None:
    assert response.status_code == expected, (route, caller, response.status_code, response.text[:300])
    if expected == 403:
        assert "'read'" in response.json()["detail"], response.text
    if expected == 404:  # the same answer as for a job that does not exist
        assert response.json()["detail"].startswith("no job "), response.text
    if route == "list" and expected == 200:
        listed = {j["job_id"] for j in response.json()["jobs"]}
        mine = {job_ids[o] for o in VISIBLE[caller]}
        others = set(job_ids.values()) - mine
        assert mine <= listed and not (others & listed), (caller, listed, job_ids)


# ----------------------------------------------------------------------------- the token file


def test_the_token_file_stores_hashes_only_and_checks_every_line(tmp_path):
    path = tmp_path / "tokens.jsonl"
    token = issue(path, "alice", "submit")
    text = path.read_text()
    assert token not in text and hash_token(token) in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert read_token_file(path) == [TokenEntry(hash_token(token), "alice", "submit")]
    for bad, why in [
        ('{"sha256": "00", "user": "a", "role": "read"}', "sha256"),
        (json.dumps({"sha256": "0" * 64, "user": "a b", "role": "read"}), "user"),
        (json.dumps({"sha256": "0" * 64, "user": "a", "role": "root"}), "role"),
        (json.dumps({"sha256": "0" * 64, "user": "a", "role": "read", "token": "x"}), "keys"),
        ("not json", "JSON"),
    ]:
        with pytest.raises(ValueError, match=why) as e:
            parse_tokens(f"# a comment\n\n{bad}\n", "f")
        assert str(e.value).startswith("f:3: "), e.value
    with pytest.raises(ValueError, match="role"):
        issue(path, "bob", "owner")
    assert [e.user for e in read_token_file(path)] == ["alice"]


def test_token_cli_issues_lists_and_revokes(tmp_path):
    path = tmp_path / "tokens.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LEVIATHAN_API_TOKENS": str(path)}

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", "token", *args], env=env, input=stdin,
                              capture_output=True, text=True, cwd=tmp_path)

    first = cli("issue", "--user", "alice", "--role", "submit")
    second = cli("issue", "--user", "alice", "--role", "read")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    token = first.stdout.strip()
    assert len(token) >= 40 and "not shown again" in first.stderr
    listed = cli("list")
    assert listed.stdout.splitlines() == [f"alice\tsubmit\t{hash_token(token)[:12]}",
                                          f"alice\tread\t{hash_token(second.stdout.strip())[:12]}"]
    assert token not in listed.stdout
    assert cli("revoke", "--token", "-", stdin=token + "\n").returncode == 0
    assert [e.role for e in read_token_file(path)] == ["read"]
    assert cli("revoke", "--user", "alice").returncode == 0 and read_token_file(path) == []
    gone = cli("revoke", "--user", "alice")
    assert gone.returncode == 1 and "no such token" in gone.stderr
    bad = cli("issue", "--user", "bob", "--role", "root")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_an_app_with_a_missing_or_malformed_token_file_does_not_start(tmp_path):
    storage = tmp_path / "runs"
    base = dict(ray_address="http://ray.test:8265", storage=str(storage), data_root=str(data_root_for(storage)))
    with pytest.raises(OSError):
        create_app(Settings(**base, api_tokens=tmp_path / "missing"), MemoryGateway())
    (tmp_path / "bad").write_text('{"user": "x"}\n')
    with pytest.raises(ValueError, match="bad:1"):
        create_app(Settings(**base, api_tokens=tmp_path / "bad"), MemoryGateway())


# ----------------------------------------------------------------------------- in process


@pytest.fixture
def memory_api(tmp_path):
    """An in-process app on a MemoryGateway with alice's, bob's and an unowned job."""
    storage = tmp_path / "runs"
    storage.mkdir()
    token_file = tmp_path / "tokens.jsonl"
    tokens = issue_tokens(token_file)
    gateway = MemoryGateway()
    job_ids = {}
    for owner in ("alice", "bob", "ray"):
        job_id = f"job-of-{owner}"
        metadata = {} if owner == "ray" else {META_OWNER: owner}
        gateway.add(RayJob(submission_id=job_id, type="SUBMISSION", status="RUNNING", entrypoint="echo hi",
                           start_time=1, metadata=metadata), logs="hi\n")
        job_ids[owner] = job_id
    settings = make_memory_settings(storage, token_file)
    app = create_app(settings, gateway)
    return app, gateway, tokens, job_ids, token_file


def make_memory_settings(storage: Path, token_file: Path) -> Settings:
    return memory_settings(storage, api_tokens=token_file, max_concurrent_jobs=100)


def memory_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test")


@pytest.mark.anyio
@pytest.mark.parametrize("route,job,caller,expected", MATRIX, ids=CELL_IDS)
async def test_route_role_matrix_in_process(memory_api, route, job, caller, expected):
    app, gateway, tokens, job_ids, _ = memory_api
    method, path = ROUTES[route]
    async with memory_client(app) as api:
        r = await api.request(method, path.format(job=job_ids.get(job, "")), headers=headers(tokens[caller]),
                              json=tiny_spec(f"by-{caller}") if route == "submit" else None)
    check_cell(r, route, caller, expected, job_ids)
    if route == "submit" and expected == 201:
        owner = {"admin": "root", "single": "admin"}.get(caller, caller)
        assert gateway.submitted[-1]["metadata"][META_OWNER] == owner
    if route == "stop":
        stopped = gateway.records[job_ids[job]].status == "STOPPED"
        assert stopped == (expected == 200), (caller, job)


@pytest.mark.anyio
async def test_the_token_file_is_reread_when_it_changes(memory_api):
    app, _, tokens, job_ids, token_file = memory_api
    async with memory_client(app) as api:
        async def status(token: str | None) -> int:
            return (await api.get(f"/v1/jobs/{job_ids['bob']}", headers=headers(token))).status_code

        assert await status(tokens["bob"]) == 200
        carol = issue(token_file, "carol", "admin")  # a new line: no restart needed
        assert await status(carol) == 200
        assert revoke(token_file, user="bob") == 1
        assert await status(tokens["bob"]) == 401
        token_file.write_text(token_file.read_text() + "{half a line\n")  # a broken file accepts no file token
        r = await api.get("/v1/jobs", headers=headers(carol))
        assert r.status_code == 503 and "token file" in r.json()["detail"], r.text
        assert await status(API_TOKEN) == 200  # the single admin token does not depend on the file
        token_file.unlink()
        assert await status(carol) == 503
        write_token_file(token_file, [TokenEntry(hash_token(carol), "carol", "read")])
        assert await status(carol) == 404  # back, as a reader now: bob's job is not hers


# ----------------------------------------------------------------------------- live server, real Ray


@pytest.fixture(scope="module")
def live(ray_cluster, tmp_path_factory):
    """A uvicorn server on the session's Ray with per-user tokens; alice and bob each
    submit one tiny job through it, and one job is submitted to Ray directly."""
    from ray.job_submission import JobSubmissionClient

    root = tmp_path_factory.mktemp("tokens")
    storage = root / "runs"
    storage.mkdir()
    token_file = root / "tokens.jsonl"
    tokens = issue_tokens(token_file)
    ray = JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_cluster.auth_headers())
    settings = make_settings(ray_cluster, storage, api_tokens=token_file)
    with LiveServer(settings) as server:
        job_ids = {}
        for owner in ("alice", "bob"):
            with server.client(token=tokens[owner]) as c:
                r = submit(c, tiny_spec(f"owned-{owner}", steps=200))
            assert r.status_code == 201, r.text
            job_ids[owner] = r.json()["job_id"]
        job_ids["ray"] = ray.submit_job(entrypoint="true", submission_id=f"unowned-{uuid.uuid4().hex[:8]}")
        try:
            yield server, tokens, job_ids, ray
        finally:
            for owner in ("alice", "bob"):
                try:
                    ray.stop_job(job_ids[owner])
                except Exception:  # already ended
                    pass


def test_a_submitted_job_records_its_owner_in_ray(live):
    _, _, job_ids, ray = live
    assert ray.get_job_info(job_ids["alice"]).metadata[META_OWNER] == "alice"
    assert ray.get_job_info(job_ids["bob"]).metadata[META_OWNER] == "bob"
    assert META_OWNER not in (ray.get_job_info(job_ids["ray"]).metadata or {})


@pytest.mark.parametrize("route,job,caller,expected", MATRIX, ids=CELL_IDS)
def test_route_role_matrix_live(live, route, job, caller, expected):
    server, tokens, job_ids, _ = live
    method, path = ROUTES[route]
    # Past the role check a valid spec would train: post one the API refuses instead (422).
    body = {**tiny_spec(f"by-{caller}"), "command": "true"} if route == "submit" else None
    expected = 422 if route == "submit" and expected == 201 else expected
    with server.client(token=tokens[caller]) as c:
        r = c.request(method, path.format(job=job_ids.get(job, "")), json=body,
                      params={"tail": 5} if route == "logs" else None)
    check_cell(r, route, caller, expected, job_ids)


def test_ownership_survives_an_api_restart(live, ray_cluster):
    server, tokens, job_ids, _ = live
    with LiveServer(server.settings) as again, again.client(token=tokens["bob"]) as c:
        listed = {j["job_id"] for j in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        assert job_ids["bob"] in listed and job_ids["alice"] not in listed
        assert c.get(f"/v1/jobs/{job_ids['alice']}").status_code == 404


def test_serve_refuses_a_token_file_it_cannot_read(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LEVIATHAN_API_TOKENS": str(tmp_path / "missing")}
    env.pop("LEVIATHAN_API_TOKEN", None)
    r = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--port", "1"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "LEVIATHAN_API_TOKENS" in r.stderr and "missing" in r.stderr, r.stderr
