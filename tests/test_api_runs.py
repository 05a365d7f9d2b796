"""`/v1/runs`: run folders as resources.

In process (no server, no Ray) on hand-built run folders in a tmp storage root: state,
figures, ownership, report negotiation, artifact listing, path checks and byte ranges,
delete and its 409. Live (real uvicorn and Ray, slow): the session's finished tiny run
copied into the API's storage root, listed, its report and a ranged artifact download
read, and deleted; a `ray job submit` claiming a run makes its delete a 409 until it ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import META_OWNER
from api.ray_jobs import RayJob
from api.services.run_resources import RangeNotSatisfiable, byte_range
from api.settings import Settings
from cli.token import issue
from leviathan.run.names import MERGED
from tests.test_api_support import LiveServer, MemoryGateway, in_process, make_settings, memory_settings, tiny_spec

MODEL_BYTES = bytes(range(256)) * 40  # 10240 bytes, each offset's byte known


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


def make_run(storage: Path, name: str, state: str = "finished", owner: str | None = None) -> Path:
    """A run folder as training leaves it: finished (result, report, final/), stopped
    (checkpoints, no result) or failed (spec and a metrics line only)."""
    run = storage / name
    run.mkdir()
    (run / "spec.json").write_text(json.dumps({"name": name, "ensemble": {"modules": 1}}))
    if owner is not None:
        (run / "owner.json").write_text(json.dumps({"user": owner}))
    records = [{"time": 1.7e9, "step": 3, "phase": "members", "member": "m0.0", "train_loss": 2.5}]
    if state in ("finished", "stopped"):
        (run / "checkpoints" / "checkpoint_000001").mkdir(parents=True)
    if state == "finished":
        records.append({"time": 1.7e9 + 5, "step": 8, "phase": "done"})
        rows = [{"name": "m0.0", "mixed_val_loss": 3.0, "switch_val_loss": 3.5},
                {"name": MERGED, "mixed_val_loss": 2.0, "switch_val_loss": float("nan")}]
        (run / "train_result.json").write_text(json.dumps(
            {"name": name, "wall_time_s": 12.5, "rows": rows, "merged_beats_every_member": True}))
        (run / "report.json").write_text(json.dumps({"format_version": 1, "rows": rows}))
        (run / "report.md").write_text(f"# Report of {name}\n")
        (run / "final").mkdir()
        (run / "final" / "model.safetensors").write_bytes(MODEL_BYTES)
        (run / "final" / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def writing_job(storage: Path, name: str, status: str = "RUNNING", owner: str | None = None) -> RayJob:
    """A Ray job of this API writing run `name`."""
    meta = {"leviathan_run_dir": str(storage / name), "leviathan_run_name": name}
    if owner is not None:
        meta[META_OWNER] = owner
    return RayJob(submission_id=f"leviathan-{name}", type="SUBMISSION", status=status,
                  entrypoint="python -m jobs.train --spec x", start_time=1, metadata=meta)


# ----------------------------------------------------------------------------- list and detail


@pytest.mark.anyio
@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/runs"), ("GET", "/v1/runs/done"), ("GET", "/v1/runs/done/report"),
    ("GET", "/v1/runs/done/artifacts"), ("GET", "/v1/runs/done/artifacts/config.json"), ("DELETE", "/v1/runs/done"),
])
async def test_every_run_endpoint_needs_the_api_token(storage, method, path):
    make_run(storage, "done")
    async with in_process(settings_for(storage), token=None) as api:
        r = await api.request(method, path)
    assert r.status_code == 401, r.text
    assert (storage / "done").is_dir()


@pytest.mark.anyio
async def test_list_reads_state_phase_and_figures_from_the_storage(storage):
    for name, state in [("done", "finished"), ("halted", "stopped"), ("broken", "failed"), ("live", "stopped")]:
        make_run(storage, name, state)
    (storage / "not-a-run").mkdir()  # no spec.json
    (storage / "Upper").mkdir()
    (storage / "Upper" / "spec.json").write_text("{}")  # not a run name
    gateway = MemoryGateway()
    gateway.add(writing_job(storage, "live"))
    gateway.add(writing_job(storage, "done", status="SUCCEEDED"))
    async with in_process(settings_for(storage), gateway) as api:
        listed = (await api.get("/v1/runs")).json()
        only_stopped = (await api.get("/v1/runs", params={"state": "stopped"})).json()
        bad_state = await api.get("/v1/runs", params={"state": "gone"})
    runs = {r["name"]: r for r in listed["runs"]}
    assert listed["total"] == 4 and set(runs) == {"done", "halted", "broken", "live"}
    assert {n: r["state"] for n, r in runs.items()} == {
        "done": "finished", "halted": "stopped", "broken": "failed", "live": "running"}
    assert runs["live"]["job_id"] == "leviathan-live" and runs["done"]["job_id"] is None
    assert runs["done"]["phase"] == "done" and runs["done"]["step"] == 8
    assert runs["broken"]["phase"] == "members" and runs["broken"]["step"] == 3
    figures = runs["done"]["figures"]
    assert figures["mixed_val_loss"] == {"m0.0": 3.0, MERGED: 2.0}
    assert figures["switch_val_loss"] == {"m0.0": 3.5}  # NaN left out
    assert figures["wall_time_s"] == 12.5 and figures["merged_beats_every_member"] is True
    assert runs["halted"]["figures"] is None
    assert [r["name"] for r in only_stopped["runs"]] == ["halted"]
    assert bad_state.status_code == 422


@pytest.mark.anyio
async def test_detail_has_spec_checkpoints_and_report_flags(storage):
    make_run(storage, "done")
    async with in_process(settings_for(storage)) as api:
        r = await api.get("/v1/runs/done")
        missing = await api.get("/v1/runs/nothing-here")
        bad = await api.get("/v1/runs/Not.A.Name")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["spec"]["name"] == "done" and body["checkpoints"] == ["checkpoint_000001"]
    assert body["has_report"] and body["has_final"] and body["metrics_records"] == 2
    assert missing.status_code == 404
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["path", "name"]


# ----------------------------------------------------------------------------- ownership


@pytest.mark.anyio
async def test_a_run_is_its_owners(storage, tmp_path):
    tokens = tmp_path / "tokens"
    reader, alice, bob, admin = (issue(tokens, "alice", "read"), issue(tokens, "alice", "submit"),
                                 issue(tokens, "bob", "submit"), issue(tokens, "root", "admin"))
    make_run(storage, "alices", owner="alice")
    make_run(storage, "bobs", owner="bob")
    make_run(storage, "nobodys")  # started outside the API: an admin's
    make_run(storage, "old-alices")  # no owner.json: Ray's record of its job names the owner
    gateway = MemoryGateway()
    gateway.add(writing_job(storage, "old-alices", status="SUCCEEDED", owner="alice"))
    settings = settings_for(storage, api_token=None, api_tokens=tokens)

    async def names(token: str) -> set[str]:
        async with in_process(settings, gateway, token=token) as api:
            return {r["name"] for r in (await api.get("/v1/runs")).json()["runs"]}

    assert await names(alice) == await names(reader) == {"alices", "old-alices"}
    assert await names(bob) == {"bobs"}
    assert await names(admin) == {"alices", "bobs", "nobodys", "old-alices"}
    async with in_process(settings, gateway, token=bob) as api:
        for path in ["/v1/runs/alices", "/v1/runs/alices/report", "/v1/runs/alices/artifacts",
                     "/v1/runs/alices/artifacts/config.json", "/v1/runs/nobodys"]:
            assert (await api.get(path)).status_code == 404, path
        assert (await api.delete("/v1/runs/alices")).status_code == 404
    async with in_process(settings, gateway, token=reader) as api:
        assert (await api.get("/v1/runs/alices/artifacts/config.json")).status_code == 200
        assert (await api.delete("/v1/runs/alices")).status_code == 403
    assert (storage / "alices").is_dir()


@pytest.mark.anyio
async def test_submission_records_the_owner_in_the_run_folder(storage, tmp_path):
    tokens = tmp_path / "tokens"
    alice = issue(tokens, "alice", "submit")
    async with in_process(settings_for(storage, api_token=None, api_tokens=tokens), token=alice) as api:
        r = await api.post("/v1/jobs", json=tiny_spec("owned"))
        assert r.status_code == 201, r.text
        listed = (await api.get("/v1/runs")).json()["runs"]
    run = Path(r.json()["run_dir"])
    assert json.loads((run / "owner.json").read_text()) == {"user": "alice"}
    assert [(x["name"], x["owner"], x["state"]) for x in listed] == [(run.name, "alice", "running")]


# ----------------------------------------------------------------------------- report


@pytest.mark.anyio
async def test_report_is_json_or_markdown_by_accept(storage):
    make_run(storage, "done")
    make_run(storage, "halted", "stopped")
    async with in_process(settings_for(storage)) as api:
        as_json = await api.get("/v1/runs/done/report")
        as_md = await api.get("/v1/runs/done/report", headers={"Accept": "text/markdown"})
        prefers_json = await api.get("/v1/runs/done/report",
                                     headers={"Accept": "text/markdown;q=0.5, application/json"})
        none_yet = await api.get("/v1/runs/halted/report")
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_json.json()["rows"][1]["switch_val_loss"] is None  # NaN in the file: null in the answer
    assert as_md.headers["content-type"].startswith("text/markdown") and as_md.text == "# Report of done\n"
    assert prefers_json.headers["content-type"].startswith("application/json")
    assert none_yet.status_code == 404


# ----------------------------------------------------------------------------- artifacts


@pytest.mark.anyio
async def test_artifacts_list_sizes_and_sha256(storage):
    run = make_run(storage, "done")
    (run / "final" / "sub").mkdir()
    (run / "final" / "sub" / "notes.txt").write_text("hi")
    os.symlink(run / "spec.json", run / "final" / "spec-link.json")  # inside the run folder: listed
    os.symlink("/etc/hostname", run / "final" / "escape")  # outside: never listed nor served
    async with in_process(settings_for(storage)) as api:
        body = (await api.get("/v1/runs/done/artifacts")).json()
        escape = await api.get("/v1/runs/done/artifacts/escape")
        inside = await api.get("/v1/runs/done/artifacts/spec-link.json")
        nested = await api.get("/v1/runs/done/artifacts/sub/notes.txt")
    got = {a["path"]: (a["size"], a["sha256"]) for a in body["artifacts"]}
    assert got == {
        "config.json": (2, hashlib.sha256(b"{}").hexdigest()),
        "model.safetensors": (len(MODEL_BYTES), hashlib.sha256(MODEL_BYTES).hexdigest()),
        "spec-link.json": ((run / "spec.json").stat().st_size, hashlib.sha256((run / "spec.json").read_bytes()).hexdigest()),
        "sub/notes.txt": (2, hashlib.sha256(b"hi").hexdigest()),
    }
    assert escape.status_code == 404
    assert inside.status_code == 200 and inside.content == (run / "spec.json").read_bytes()
    assert nested.text == "hi"


@pytest.mark.anyio
@pytest.mark.parametrize("path", [
    "%2E%2E/spec.json", "..%2Fspec.json", "sub/%2E%2E/%2E%2E/spec.json", "/etc/passwd", "%2Fetc%2Fpasswd",
    "%2E/config.json", "a//b", "%5C..%5Cspec.json", "config.json%00",
])
async def test_artifact_paths_never_leave_final(storage, path):
    """Dots percent-encoded, as a client that does not normalise the path sends them."""
    make_run(storage, "done")
    async with in_process(settings_for(storage)) as api:
        r = await api.get(httpx.URL(f"http://api.test/v1/runs/done/artifacts/{path}"))
    assert r.status_code == 422, (path, r.status_code, r.text)
    assert r.json()["detail"][0]["loc"] == ["path", "path"]


@pytest.mark.anyio
async def test_unknown_artifact_is_404(storage):
    make_run(storage, "done")
    make_run(storage, "halted", "stopped")
    async with in_process(settings_for(storage)) as api:
        assert (await api.get("/v1/runs/done/artifacts/nope.bin")).status_code == 404
        assert (await api.get("/v1/runs/done/artifacts/sub")).status_code == 404
        assert (await api.get("/v1/runs/halted/artifacts")).json()["artifacts"] == []


@pytest.mark.anyio
async def test_artifact_download_honours_single_byte_ranges(storage):
    make_run(storage, "done")
    url = "/v1/runs/done/artifacts/model.safetensors"
    n = len(MODEL_BYTES)
    async with in_process(settings_for(storage)) as api:
        whole = await api.get(url)
        part = await api.get(url, headers={"Range": "bytes=100-199"})
        tail = await api.get(url, headers={"Range": "bytes=-10"})
        rest = await api.get(url, headers={"Range": "bytes=10000-"})
        clamped = await api.get(url, headers={"Range": f"bytes=10200-{n * 2}"})
        past = await api.get(url, headers={"Range": f"bytes={n}-"})
        several = await api.get(url, headers={"Range": "bytes=0-1,5-6"})
        nonsense = await api.get(url, headers={"Range": "pages=1-2"})
    assert whole.status_code == 200 and whole.content == MODEL_BYTES
    assert whole.headers["accept-ranges"] == "bytes" and whole.headers["content-length"] == str(n)
    assert part.status_code == 206 and part.content == MODEL_BYTES[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{n}"
    assert tail.status_code == 206 and tail.content == MODEL_BYTES[-10:]
    assert rest.status_code == 206 and rest.content == MODEL_BYTES[10000:]
    assert clamped.status_code == 206 and clamped.content == MODEL_BYTES[10200:]
    assert clamped.headers["content-range"] == f"bytes 10200-{n - 1}/{n}"
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{n}"
    assert several.status_code == nonsense.status_code == 200 and several.content == MODEL_BYTES


@pytest.mark.parametrize("header,size,expected", [
    (None, 10, None), ("bytes=0-0", 10, (0, 0)), ("bytes=3-", 10, (3, 9)), ("bytes=-3", 10, (7, 9)),
    ("bytes=-30", 10, (0, 9)), ("bytes=5-2", 10, None), ("bytes=-", 10, None), ("bytes= 1-2", 10, None),
    ("bytes=+1-2", 10, None), ("bytes=1_0-", 10, None),
])
def test_byte_range_parsing(header, size, expected):
    assert byte_range(header, size) == expected


@pytest.mark.parametrize("header,size", [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=0-", 0), ("bytes=-1", 0)])
def test_unsatisfiable_ranges(header, size):
    with pytest.raises(RangeNotSatisfiable):
        byte_range(header, size)


# ----------------------------------------------------------------------------- delete


@pytest.mark.anyio
async def test_delete_removes_the_folder_and_refuses_while_a_job_writes_it(storage):
    make_run(storage, "done")
    make_run(storage, "live", "stopped")
    gateway = MemoryGateway()
    gateway.add(writing_job(storage, "live", status="PENDING"))
    async with in_process(settings_for(storage), gateway) as api:
        gone = await api.delete("/v1/runs/done")
        again = await api.delete("/v1/runs/done")
        busy = await api.delete("/v1/runs/live")
        assert (await api.post("/v1/jobs/leviathan-live/stop")).status_code == 200
        after_stop = await api.delete("/v1/runs/live")
    assert gone.status_code == 204 and not (storage / "done").exists()
    assert again.status_code == 404
    assert busy.status_code == 409 and "leviathan-live" in busy.json()["detail"]
    assert after_stop.status_code == 204 and not (storage / "live").exists()


@pytest.mark.anyio
async def test_openapi_documents_the_run_routes(storage):
    async with in_process(settings_for(storage)) as api:
        paths = (await api.get("/openapi.json")).json()["paths"]
    assert {"/v1/runs", "/v1/runs/{name}", "/v1/runs/{name}/report", "/v1/runs/{name}/artifacts",
            "/v1/runs/{name}/artifacts/{path}"} <= set(paths)
    assert "delete" in paths["/v1/runs/{name}"]
    assert {"206", "416"} <= set(paths["/v1/runs/{name}/artifacts/{path}"]["get"]["responses"])
    assert set(paths["/v1/runs/{name}/report"]["get"]["responses"]["200"]["content"]) == {
        "application/json", "text/markdown"}


# ----------------------------------------------------------------------------- the CLI twin


def test_cli_lists_shows_and_deletes_runs_from_the_storage_root(storage, monkeypatch, capsys):
    from cli.main import main
    from tests.conftest import free_port

    make_run(storage, "done", owner="alice")
    make_run(storage, "halted", "stopped")
    monkeypatch.setenv("LEVIATHAN_RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")  # nothing listens
    assert main(["runs", "list", "--storage", str(storage)]) == 0
    out, err = capsys.readouterr()
    assert sorted(line.split("\t")[:2] for line in out.splitlines()) == [["done", "finished"], ["halted", "stopped"]]
    assert "cannot ask Ray" in err
    assert main(["runs", "list", "--storage", str(storage), "--state", "finished", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["figures"]["mixed_val_loss"][MERGED] == 2.0
    assert main(["runs", "show", "done", "--storage", str(storage)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["owner"] == "alice" and shown["checkpoints"] == ["checkpoint_000001"]
    assert main(["runs", "show", "nope", "--storage", str(storage)]) == 1
    assert "no run 'nope'" in capsys.readouterr().err
    # Without Ray's word that no job writes it, delete needs --force.
    assert main(["runs", "delete", "done", "--storage", str(storage)]) == 1
    assert "--force" in capsys.readouterr().err and (storage / "done").is_dir()
    assert main(["runs", "delete", "done", "--storage", str(storage), "--force"]) == 0
    assert not (storage / "done").exists()


# ----------------------------------------------------------------------------- live: real server, real Ray

COPY = "finished-copy"


@pytest.fixture(scope="module")
def live(ray_cluster, trained_run, tmp_path_factory):
    """The API on the session's Ray, its storage root holding a copy of the session's finished run."""
    storage = tmp_path_factory.mktemp("api-run-resources")
    shutil.copytree(trained_run.run, storage / COPY, symlinks=True)
    with LiveServer(make_settings(ray_cluster, storage)) as server:
        yield server, storage


def test_live_finished_run_lists_reports_and_downloads_with_a_range(live, trained_run):
    server, storage = live
    run = storage / COPY
    with server.client() as api:
        listed = {r["name"]: r for r in api.get("/v1/runs").json()["runs"]}
        detail = api.get(f"/v1/runs/{COPY}").json()
        report = api.get(f"/v1/runs/{COPY}/report")
        markdown = api.get(f"/v1/runs/{COPY}/report", headers={"Accept": "text/markdown"})
        artifacts = api.get(f"/v1/runs/{COPY}/artifacts").json()["artifacts"]
        model = next(a for a in artifacts if a["path"].endswith(".safetensors"))
        url = f"/v1/runs/{COPY}/artifacts/{model['path']}"
        part = api.get(url, headers={"Range": "bytes=10-1033"})
        past = api.get(url, headers={"Range": f"bytes={model['size']}-"})
        with api.stream("GET", url) as whole:
            digest = hashlib.sha256()
            for chunk in whole.iter_bytes():
                digest.update(chunk)
        climb = api.get(f"/v1/runs/{COPY}/artifacts/%2E%2E/spec.json")
    merged = next(r for r in trained_run.result["rows"] if r["name"] == MERGED)
    summary = listed[COPY]
    assert summary["state"] == "finished" and summary["phase"] == "done" and summary["job_id"] is None
    assert summary["figures"]["mixed_val_loss"][MERGED] == pytest.approx(merged["mixed_val_loss"])
    assert detail["checkpoints"] and detail["has_report"] and detail["spec"]["name"] == trained_run.spec.name
    assert report.json() == json.loads((run / "report.json").read_text())
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert markdown.text == (run / "report.md").read_text()
    on_disk = {str(p.relative_to(run / "final")): p for p in (run / "final").rglob("*") if p.is_file()}
    assert {a["path"] for a in artifacts} == set(on_disk)
    for a in artifacts:
        data = on_disk[a["path"]].read_bytes()
        assert (a["size"], a["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    data = on_disk[model["path"]].read_bytes()
    assert part.status_code == 206 and part.content == data[10:1034]
    assert part.headers["content-range"] == f"bytes 10-1033/{len(data)}"
    assert past.status_code == 416
    assert whole.status_code == 200 and digest.hexdigest() == model["sha256"]
    assert climb.status_code == 422


def test_live_delete_is_409_while_a_ray_job_writes_the_run(live, ray_cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    server, storage = live
    claimed = f"claimed-{uuid.uuid4().hex[:6]}"
    shutil.copytree(storage / COPY, storage / claimed, symlinks=True)
    ray = JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_cluster.auth_headers())
    sid = ray.submit_job(entrypoint="sleep 120", metadata={"leviathan_run_name": claimed})
    try:
        with server.client() as api:
            listed = {r["name"]: r for r in api.get("/v1/runs").json()["runs"]}
            busy = api.delete(f"/v1/runs/{claimed}")
            ray.stop_job(sid)
            deadline = time.monotonic() + 60
            while ray.get_job_status(sid) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
                assert time.monotonic() < deadline, "the claiming job did not stop"
                time.sleep(0.5)
            freed = api.delete(f"/v1/runs/{claimed}")
            copy_gone = api.delete(f"/v1/runs/{COPY}")
            after = {r["name"] for r in api.get("/v1/runs").json()["runs"]}
    finally:
        ray.stop_job(sid)
    assert listed[claimed]["state"] == "running" and listed[claimed]["job_id"] == sid
    assert busy.status_code == 409 and sid in busy.json()["detail"]
    assert freed.status_code == 204 and not (storage / claimed).exists()
    assert copy_gone.status_code == 204 and not (storage / COPY).exists()
    assert claimed not in after and COPY not in after
