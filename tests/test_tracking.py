"""Experiment tracking (cluster.tracking) with a real MLflow store and real TensorBoard
event files, read back with MLflow's client and TensorBoard's EventAccumulator.

The fast tests drive rank 0's `Tracker` with metrics records as the worker writes
them, a restart included; the slow ones read the session's trained run and its
faulted twin (workers killed in both phases), both tracked, and find one MLflow
run each with no step logged twice.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cluster.plan import Tracking
from cluster.tracking import RUN_DIR_TAG, TENSORBOARD_DIR, Tracker, check_tracking, end_run, global_step
from jobs.plan import tracking_of
from leviathan.run.progress import RunProgress
from leviathan.run.records import record
from tests.scripts.common import MERGED

P1, P2 = 20, 8  # the schedule of the fast tests' run


def _report(phase: str, step: int, replayed: bool = False) -> list[dict]:
    """One report's records: two members, the uniform mixture and (phase 2) the merger."""
    out = [
        record(step=step, phase=phase, module=i, member=f"m{i}.0", domain=f"d{i}", train_loss=3.0 - step / 100,
               val_loss=3.1, mixed_val_loss=3.2, lr=1e-3, tokens_per_s=500.0, replayed=replayed)
        for i in range(2) if phase == "members"
    ]
    out.append(record(step=step, phase=phase, member="uniform", mixed_val_loss=3.0, replayed=replayed))
    if phase == "merge":
        out.append(record(step=step, phase=phase, member=MERGED, train_loss=2.0, mixed_val_loss=2.1,
                          tokens_per_s=900.0, replayed=replayed))
    return out


def _log(tracker: Tracker, progress: RunProgress, lines: list[dict]) -> None:
    for r in lines:
        progress.fold(r)
    tracker.log(lines, progress)


def _tracking(tmp_path: Path, **kw) -> Tracking:
    from jobs.spec import JobSpec

    spec = JobSpec.model_validate({"name": "tracked", "storage": str(tmp_path), "tracking": kw})
    return tracking_of(spec)


def _mlflow_runs(uri: str, experiment: str = "leviathan") -> tuple:
    """(an MlflowClient of the store, the experiment's runs)."""
    from cluster.tracking import mlflow_client

    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def _tensorboard_steps(folder: Path) -> dict[str, list[int]]:
    """Every scalar tag's steps, duplicates kept (no purge of out-of-order events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), purge_orphaned_data=False, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_restarted_run_continues_one_mlflow_run_and_one_tensorboard_log_without_repeats(tmp_path):
    run_dir = str(tmp_path / "tracked")
    tracking = _tracking(tmp_path, mlflow_uri=(tmp_path / "mlruns").as_uri(), tensorboard=True)
    progress = RunProgress()
    first = Tracker(tracking, run_dir, P1, P2)
    for step in (5, 10):
        _log(first, progress, _report("members", step))
    assert first.drain()
    # A worker dies while step 15 is being tracked: MLflow got it, TensorBoard did not;
    # step 20 reached metrics.jsonl but no sink.
    first.couriers = [c for c in first.couriers if c.name.startswith("MLflow")]
    _log(first, progress, _report("members", 15))
    assert first.drain()

    # The group restarts from the step-10 checkpoint and runs 15 and 20 again.
    progress = RunProgress()
    again = Tracker(tracking, run_dir, P1, P2)
    for step in (15, 20):
        _log(again, progress, _report("members", step, replayed=True))
    for step in (4, 8):
        _log(again, progress, _report("merge", step))
    again.log_text("final_table.json", json.dumps({"rows": []}))
    again.finish()

    client, runs = _mlflow_runs(tracking.mlflow_uri)
    assert len(runs) == 1, "the restart continued the run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags[RUN_DIR_TAG] == run_dir
    assert run.data.params["training.phase1_steps"] == "200" and run.data.params["ensemble.members.1.flavour"] == "relu3"
    history = {k: [m.step for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    assert history["m0.0/train_loss"] == [5, 10, 15, 20], "every step once: 15 not again, 20 filled in"
    assert history[f"{MERGED}/mixed_val_loss"] == [P1 + 4, P1 + 8], "phase-2 steps follow phase 1's"
    assert history["uniform/mixed_val_loss"] == [5, 10, 15, 20, P1 + 4, P1 + 8]
    assert history["progress/tokens_per_s_members"] == [5, 10, 15, 20]
    assert history["progress/eta_s"][-1] == P1 + 8 and run.data.metrics["progress/eta_s"] == 0.0
    assert run.data.metrics["progress/tokens_per_s_merge"] == 900.0
    assert run.data.metrics["progress/tokens_per_s_members"] == 1000.0, "the job's: both modules"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["final_table.json"]

    tb = tmp_path / "tracked" / TENSORBOARD_DIR
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2, "one event file per worker-group start"
    steps = _tensorboard_steps(tb)
    assert steps["m1.0/val_loss"] == [5, 10, 15, 20], "15 and 20 filled in by the replay"
    assert steps[f"{MERGED}/train_loss"] == [P1 + 4, P1 + 8]
    repeated = {tag: s for tag, s in steps.items() if len(set(s)) != len(s)}
    assert not repeated, f"steps logged twice: {repeated}"


def test_driver_attaches_the_report_to_the_run_rank_0_opened(tmp_path):
    run_dir = str(tmp_path / "tracked")
    uri = (tmp_path / "mlruns").as_uri()
    tracking = _tracking(tmp_path, mlflow_uri=uri, experiment="reports")
    check_tracking(tracking)
    tracker = Tracker(tracking, run_dir, P1, P2)
    tracker.log(_report("members", 5), RunProgress())
    tracker.finish()  # rank 0 ends its part before the driver attaches the report
    end_run(tracking, run_dir, "FINISHED", {"report.md": "# Evaluation\n"})
    client, runs = _mlflow_runs(uri, "reports")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    local = client.download_artifacts(runs[0].info.run_id, "report.md", str(tmp_path))
    assert Path(local).read_text() == "# Evaluation\n"


def test_unusable_mlflow_uri_is_a_one_line_error_naming_the_field(tmp_path):
    from pydantic import ValidationError

    from jobs.spec import JobSpec

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^tracking\.mlflow_uri: cannot use sqlite:///") as e:
        check_tracking(_tracking(tmp_path, mlflow_uri=f"sqlite:///{blocker}/sub/mlflow.db"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValidationError, match=r"tracking\.mlflow_uri"):
        JobSpec.model_validate({"tracking": {"mlflow_uri": "no-scheme-here"}})
    with pytest.raises(ValidationError, match=r"tracking\.tensorbord"):
        JobSpec.model_validate({"tracking": {"tensorbord": True}})


def test_api_refuses_a_local_mlflow_store_outside_its_storage_root(ray_cluster, tmp_path):
    """The job writes a file:/sqlite: store like its run folder: only under the API's root.
    `max_concurrent_jobs = 0`: a spec that passed validation answers 429 and trains nothing."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.test_api_support import API_TOKEN, make_settings, tiny_spec

    root = tmp_path / "runs"
    settings = make_settings(ray_cluster, root, max_concurrent_jobs=0, tracking_uris=["http://mlflow.example:5000"])
    app = create_app(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {API_TOKEN}"}) as client:
        def post(uri: str):
            return client.post("/v1/jobs", json={**tiny_spec("tracked"), "tracking": {"mlflow_uri": uri}})

        for outside in (f"sqlite:///{tmp_path / 'elsewhere.db'}", "sqlite:///relative.db", f"file:{root}/../x"):
            r = post(outside)
            assert r.status_code == 422, (outside, r.text)
            assert r.json()["detail"][0]["loc"] == ["body", "tracking", "mlflow_uri"], r.text
        assert post(f"sqlite:///{root / 'mlflow.db'}").status_code == 429
        assert post("http://mlflow.example:5000").status_code == 429  # a server the API is configured for
        r = post("http://169.254.169.254/latest")  # any other server is refused
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "tracking", "mlflow_uri"], r.text


def test_tensorboard_event_files_reach_a_run_folder_on_an_object_store(s3_bucket, tmp_path):
    from leviathan.run import storage

    run_dir = f"{s3_bucket}/runs/tracked"
    tracker = Tracker(Tracking(tensorboard=True), run_dir, P1, P2)
    progress = RunProgress()
    for step in (5, 10):
        _log(tracker, progress, _report("members", step))
    tracker.finish()
    storage.download(f"{run_dir}/{TENSORBOARD_DIR}", tmp_path / "tb")
    assert _tensorboard_steps(tmp_path / "tb")["m0.0/val_loss"] == [5, 10]


def test_global_steps_run_on_across_the_phases():
    assert [global_step("members", 7, P1), global_step("merge", 3, P1), global_step("final", P2, P1)] == [7, 23, 28]


# ----------------------------------------------------------------------------- the session's runs


def _check_tracked(run: Path, spec) -> None:
    """One finished MLflow run per run folder and one TensorBoard log, every report's point once."""
    from tests.scripts.common import logged_steps

    t = spec.training
    p1, p2 = t.phase1_steps, t.phase2_steps
    client, runs = _mlflow_runs(spec.tracking.mlflow_uri)
    assert len(runs) == 1, f"{len(runs)} MLflow runs for one run folder"
    mlrun = runs[0]
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["training.phase1_steps"] == str(p1)
    assert mlrun.data.tags[RUN_DIR_TAG] == spec.run_dir
    history = {k: [m.step for m in client.get_metric_history(mlrun.info.run_id, k)] for k in mlrun.data.metrics}
    repeated = {k: sorted(s for s, n in Counter(steps).items() if n > 1) for k, steps in history.items()}
    assert not {k: s for k, s in repeated.items() if s}, f"steps logged twice: {repeated}"
    # Every report's step, once; the members are evaluated again at the end of phase 2.
    reports = logged_steps(p1, t.eval_interval, t.checkpoint_interval) | {p1 + p2}
    assert set(history["m0.0/val_loss"]) == reports
    assert max(history[f"{MERGED}/mixed_val_loss"]) == p1 + p2
    assert f"final/{MERGED}/mixed_val_loss" in mlrun.data.metrics
    assert {"progress/tokens_per_s_members", "progress/tokens_per_s_merge", "progress/eta_s"} <= set(mlrun.data.metrics)
    assert {a.path for a in client.list_artifacts(mlrun.info.run_id)} >= {"final_table.json", "report.md"}

    tb_steps = _tensorboard_steps(run / TENSORBOARD_DIR)
    assert set(tb_steps["m0.0/val_loss"]) == reports
    repeated_tb = {tag: s for tag, s in tb_steps.items() if len(set(s)) != len(s)}
    assert not repeated_tb, f"TensorBoard steps logged twice: {repeated_tb}"


def test_a_trained_run_tracks_every_report_once_in_mlflow_and_tensorboard(trained_run):
    _check_tracked(trained_run.run, trained_run.spec)


def test_a_faulted_run_continues_one_mlflow_run_and_tracks_every_point_once(faulted_run):
    """Workers SIGKILLed in both phases: the restarted groups continue the same MLflow run and
    TensorBoard log, and the replayed steps log nothing twice."""
    _check_tracked(faulted_run.run, faulted_run.spec)
