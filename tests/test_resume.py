"""Resume, named and reachable: `jobs.train --resume NAME` (the CLI's `leviathan train
--resume`) and `POST /v1/runs/{name}/resume` continue a failed or stopped run from its
latest checkpoint with the run folder's own spec.

The refusals (unknown run, finished run, a different --spec) need no Ray; the API's
own (and a run a job still writes) run on the live server. One training run is stopped
in phase 1 through the API, resumed by the CLI's path in a driver process that is then
killed, and resumed through the API to the end: its final figures equal an uninterrupted
run of the same spec under another name, and each resume replayed only steps past a
checkpoint (it did not start over).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from jobs import train
from jobs.spec import SpecError
from tests.conftest import REPO_ROOT
from tests.scripts.common import (
    builtin_manifest,
    read_metric_records,
    tiny_spec,
    wait_for,
    write_spec,
)
from tests.test_api_support import LiveServer, data_root_for, make_settings, submit, wait_for_status

# Phase 1 long enough that two interruptions, each after a new checkpoint, land inside it.
TRAINING = {"phase1_steps": 300, "phase2_steps": 6, "eval_interval": 50, "checkpoint_interval": 25}


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume-runs")


@pytest.fixture(scope="module")
def manifest(storage) -> Path:
    """The built-in corpus under the API's data root, so API-submitted specs may name it."""
    return builtin_manifest(data_root_for(storage) / "builtin")


def _main(argv: list[str], capsys) -> tuple[int, str]:
    code = train.main(argv)
    return code, capsys.readouterr().err.strip()


# ----------------------------------------------------------------------------- refusals


def test_spec_differences_name_the_fields(manifest, tmp_path):
    a = tiny_spec(manifest, tmp_path, "a")
    b = tiny_spec(manifest, tmp_path / "elsewhere", "a", training={"phase1_steps": 7},
                  ensemble={"members": [{"preset": "tiny", "flavour": "relu3"}, {"preset": "tiny", "flavour": "gelu4"}]})
    assert train.spec_differences(a, a) == []
    # storage is where a run lies, not what it trains.
    assert train.spec_differences(a, b) == ["ensemble.members.0.flavour", "ensemble.members.1.flavour",
                                            "training.phase1_steps"]


def test_cli_resume_refuses_an_unknown_a_finished_and_a_different_run(manifest, tmp_path, capsys):
    code, err = _main(["--resume", "nope", "--storage", str(tmp_path)], capsys)
    assert code == 2 and err == f"leviathan train: error: resume: no run 'nope' under {tmp_path} " \
                                f"(no {tmp_path}/nope/spec.json)"

    spec = tiny_spec(manifest, tmp_path, "half")
    run = Path(spec.run_dir)
    run.mkdir()
    (run / "spec.json").write_text(spec.to_json())
    other = tiny_spec(manifest, tmp_path, "other", training={"phase2_steps": 9})
    code, err = _main(["--resume", "half", "--storage", str(tmp_path),
                       "--spec", str(write_spec(other, tmp_path / "other.json"))], capsys)
    assert code == 2 and "\n" not in err, err
    assert "--spec differs from the spec.json of run 'half' in training.phase2_steps;" in err, err
    code, err = _main(["--resume", "half", "--name", "x"], capsys)
    assert code == 2 and "leave out --name" in err, err

    (run / "train_result.json").write_text("{}")
    code, err = _main(["--resume", "half", "--storage", str(tmp_path)], capsys)
    assert code == 2 and err == f"leviathan train: error: resume: run 'half' already finished in {run}; " \
                                "nothing to resume"


def test_resume_takes_the_folders_spec_where_it_lies(manifest, tmp_path):
    spec = tiny_spec(manifest, tmp_path / "was-here", "moved")
    run = tmp_path / "now-here" / "moved"
    run.mkdir(parents=True)
    (run / "spec.json").write_text(spec.to_json())
    resumed = train.resume_spec("moved", str(tmp_path / "now-here"))
    assert resumed.run_dir == str(run)
    assert train.spec_differences(resumed, spec) == []


def test_a_different_spec_in_the_folder_is_refused_naming_the_fields(manifest, tmp_path):
    spec = tiny_spec(manifest, tmp_path, "taken")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "spec.json").write_text(spec.to_json())
    other = tiny_spec(manifest, tmp_path, "taken", training={"phase1_steps": 7}, seed=3)
    with pytest.raises(SpecError, match=r"different spec \(differs in seed, training.phase1_steps\)"):
        train.check_run_folder(other)


def test_api_resume_of_an_unknown_or_finished_run(ray_cluster, manifest, storage):
    spec = tiny_spec(manifest, storage, "api-done")
    run = Path(spec.run_dir)
    run.mkdir()
    (run / "spec.json").write_text(spec.to_json())
    (run / "train_result.json").write_text("{}")
    with LiveServer(make_settings(ray_cluster, storage)) as s, s.client() as c:
        for name in ("no-such-run", "..", "a%2Fb"):
            r = c.post(f"/v1/runs/{name}/resume")
            assert r.status_code == 404, (name, r.text)
        r = c.post("/v1/runs/api-done/resume")
        assert r.status_code == 409 and "already finished" in r.json()["detail"], r.text


# ----------------------------------------------------------------------------- resumed runs


def _figures(result: dict) -> dict:
    return {(r["kind"], r["name"]): (r["own_val_loss"], r["mixed_val_loss"], r.get("switch_val_loss"))
            for r in result["rows"]}


def _registered_phase_1_step(run: Path) -> int:
    """The step of Ray's latest registered checkpoint if it is of phase 1 (-1: none yet). A
    checkpoint folder on disk may still lack a rank's files; the snapshot names only whole ones."""
    try:
        snapshot = json.loads((run / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
        metrics = snapshot["latest_checkpoint_result"]["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return -1
    return int(metrics["step"]) if metrics.get("phase") == "members" else -1


def _checkpointed_in_phase_1(run: Path) -> int:
    """Wait for a registered phase-1 checkpoint past step 0; returns its step."""
    wait_for(lambda: _registered_phase_1_step(run) > 0, 300, "a registered phase-1 checkpoint")
    return _registered_phase_1_step(run)


def _assert_interrupted_in_phase_1(run: Path) -> None:
    records = read_metric_records(run)
    assert not (run / "train_result.json").exists()
    assert {r["phase"] for r in records} == {"members"}, "the interruption landed past phase 1; make it longer"


def _break_latest_checkpoint(run: Path, how: str) -> int:
    """Damage Ray's latest registered checkpoint of the interrupted run ("truncate": a module
    file loses its bytes; "unseal": rank 0's seal is deleted); returns its step. The resume must
    see it is not intact and restore the one before (cluster.checkpointing.newest_intact)."""
    from cluster.checkpointing import module_file, seal_file

    snapshot = json.loads((run / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    latest = snapshot["latest_checkpoint_result"]
    folder = run / "checkpoints" / latest["checkpoint_dir_name"]
    if how == "truncate":
        (folder / module_file(1)).write_bytes(b"\0" * 10)
    else:
        (folder / seal_file(0)).unlink()
    return int(latest["metrics"]["step"])


def _assert_resumed_before(run: Path, broken_step: int) -> None:
    """The second attempt restored a checkpoint before the broken one: it ran the broken
    checkpoint's step again (a resume from it would not), and it ran to the end."""
    records = read_metric_records(run)
    replayed = {r["step"] for r in records if r["replayed"] and r["phase"] == "members"}
    assert broken_step in replayed, (broken_step, sorted(replayed))
    assert records[-1]["phase"] == "done"


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, manifest, storage) -> dict:
    return train.run(tiny_spec(manifest, storage / "clean", "clean", training=TRAINING), progress=False)


def test_a_run_stopped_through_the_api_and_its_driver_killed_resumes_to_the_uninterrupted_figures(
    ray_cluster, manifest, storage, uninterrupted
):
    """One run interrupted twice in phase 1, each time its latest checkpoint broken:
    1. submitted through the API and stopped there, leaving an unsealed checkpoint;
    2. resumed by `python -m jobs.train --resume NAME --storage S` (the CLI's path) in a driver
       process of its own, which is SIGKILLed (not a Train worker: Ray cleans the workers up),
       leaving a truncated module file;
    3. resumed through `POST /v1/runs/{name}/resume` to the end.
    Its figures equal an uninterrupted run's, and each resume restored the checkpoint before
    the broken one."""
    body = tiny_spec(manifest, storage, "api-stop", training=TRAINING).model_dump(mode="json")
    del body["storage"]  # the API's root
    with LiveServer(make_settings(ray_cluster, storage)) as s, s.client() as c:
        r = submit(c, body)
        assert r.status_code == 201, r.text
        first, name = r.json()["job_id"], r.json()["run_name"]
        run = storage / name
        _checkpointed_in_phase_1(run)

        r = c.post(f"/v1/runs/{name}/resume")
        assert r.status_code == 409 and first in r.json()["detail"], r.text  # its job still writes it

        assert c.post(f"/v1/jobs/{first}/stop").json()["stopped"] is True
        assert wait_for_status(c, first, {"STOPPED"}, timeout=60)["status"] == "STOPPED"
        _assert_interrupted_in_phase_1(run)
        unsealed = _break_latest_checkpoint(run, "unseal")

        env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONUNBUFFERED": "1"}
        with open(storage / "driver.out", "w") as out:
            driver = subprocess.Popen(
                [sys.executable, "-m", "jobs.train", "--resume", name, "--storage", str(storage), "--no-progress"],
                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            wait_for(lambda: _registered_phase_1_step(run) > unsealed or driver.poll() is not None, 300,
                     "a phase-1 checkpoint of the CLI's resume")
        finally:
            if driver.poll() is None:
                os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        assert driver.returncode == -signal.SIGKILL, (storage / "driver.out").read_text()[-3000:]
        assert f"resuming run '{name}' in {run}" in (storage / "driver.out").read_text()
        _assert_interrupted_in_phase_1(run)
        truncated = _break_latest_checkpoint(run, "truncate")

        r = c.post(f"/v1/runs/{name}/resume")
        assert r.status_code == 201, r.text
        resumed = r.json()
        assert resumed["run_name"] == name and resumed["run_dir"] == str(run) and resumed["job_id"] != first
        job = wait_for_status(c, resumed["job_id"], {"SUCCEEDED"}, timeout=400)
        logs = c.get(f"/v1/jobs/{resumed['job_id']}/logs").text
        assert job["status"] == "SUCCEEDED", logs[-3000:]
        assert f"resuming run '{name}'" in logs
        assert job["run_dir"] == str(run)

        assert c.post(f"/v1/runs/{name}/resume").status_code == 409  # finished now

    # Ray's Train state API names every attempt's Train run after the run.
    r = httpx.get(f"{ray_cluster.dashboard_url}/api/train/v2/runs/v1", headers=ray_cluster.auth_headers(), timeout=30)
    assert [t["name"] for t in r.json()["train_runs"]].count(f"{name}/checkpoints") == 3, r.text[:2000]

    _assert_resumed_before(run, unsealed)
    _assert_resumed_before(run, truncated)
    result = json.loads((run / "train_result.json").read_text())
    assert _figures(result) == _figures(uninterrupted)


# ----------------------------------------------------------------------------- who may resume


@pytest.mark.anyio
async def test_only_a_submitter_who_may_see_the_runs_jobs_resumes_it(tmp_path):
    """In process on the in-memory gateway: a `read` token gets 403, another user the 404 an
    unknown run gets, the owner 201 (the new job is theirs and runs `--resume`), and then
    409 while that job is pending."""
    from api.app import create_app
    from api.auth import META_OWNER
    from api.ray_jobs import RayJob
    from api.services.runs import job_metadata
    from jobs.spec import JobSpec
    from tests.test_api_support import MemoryGateway
    from tests.test_api_support import tiny_spec as api_spec
    from tests.test_api_tokens import headers, issue_tokens, make_memory_settings, memory_client

    storage = tmp_path / "runs"
    spec = JobSpec.model_validate({**api_spec("alices-run"), "storage": str(storage)})
    Path(spec.run_dir).mkdir(parents=True)
    Path(spec.run_dir, "spec.json").write_text(spec.to_json())
    gateway = MemoryGateway()
    gateway.add(RayJob(submission_id="leviathan-alices-run", type="SUBMISSION", status="FAILED",
                       entrypoint="python -m jobs.train --spec x", start_time=1,
                       metadata={**job_metadata(spec, "alices-run"), META_OWNER: "alice"}))
    tokens = issue_tokens(tmp_path / "tokens.jsonl")
    app = create_app(make_memory_settings(storage, tmp_path / "tokens.jsonl"), gateway)
    async with memory_client(app) as api:
        async def resume(caller: str):
            return await api.post("/v1/runs/alices-run/resume", headers=headers(tokens[caller]))

        assert (await resume("none")).status_code == 401
        r = await resume("reader")
        assert r.status_code == 403 and "'read'" in r.json()["detail"], r.text
        r = await resume("bob")
        assert r.status_code == 404 and r.json()["detail"] == "no run 'alices-run' under the storage root", r.text
        r = await resume("alice")
        assert r.status_code == 201, r.text
        submitted = gateway.submitted[-1]
        assert submitted["metadata"][META_OWNER] == "alice"
        assert submitted["entrypoint"] == f"python -m jobs.train --resume alices-run --storage {storage}"
        assert r.json()["run_dir"] == spec.run_dir and r.json()["job_id"].startswith("leviathan-alices-run-resume-")
        r = await resume("admin")
        assert r.status_code == 409 and "still being written" in r.json()["detail"], r.text


@pytest.mark.anyio
async def test_a_run_whose_jobs_ray_forgot_stays_its_owners(tmp_path):
    """owner.json answers when Ray no longer lists the run's jobs: another submitter gets the
    404 of an unknown run, the owner may resume."""
    from api.app import create_app
    from jobs.spec import JobSpec
    from leviathan.run.folder import RunFolder
    from tests.test_api_support import MemoryGateway
    from tests.test_api_support import tiny_spec as api_spec
    from tests.test_api_tokens import headers, issue_tokens, make_memory_settings, memory_client

    storage = tmp_path / "runs"
    spec = JobSpec.model_validate({**api_spec("alices-run"), "storage": str(storage)})
    Path(spec.run_dir).mkdir(parents=True)
    Path(spec.run_dir, "spec.json").write_text(spec.to_json())
    Path(RunFolder.of(str(storage), "alices-run").owner).write_text('{"user": "alice"}')
    tokens = issue_tokens(tmp_path / "tokens.jsonl")
    app = create_app(make_memory_settings(storage, tmp_path / "tokens.jsonl"), MemoryGateway())
    async with memory_client(app) as api:
        r = await api.post("/v1/runs/alices-run/resume", headers=headers(tokens["bob"]))
        assert r.status_code == 404, r.text
        r = await api.post("/v1/runs/alices-run/resume", headers=headers(tokens["alice"]))
        assert r.status_code == 201, r.text
