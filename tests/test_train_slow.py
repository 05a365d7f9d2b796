"""End-to-end training runs that take tens of seconds each: the merged model beats
its members, workers killed in both phases (the session's faulted run, compared with
its trained run), a lost node, and a run on an object store (`ray job submit` runs in
test_deploy.py, with the RayJob's entrypoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jobs import train
from tests.scripts.common import MERGED, logged_steps, read_metric_records, tiny_spec, wait_for

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def manifest(builtin_corpus) -> Path:
    return builtin_corpus


def test_merged_model_beats_every_member_and_the_uniform_mixture(ray_cluster, manifest, tmp_path):
    """The demo's claim on a smaller run: 2 domains far apart, one tiny member each, fusion merge."""
    spec = tiny_spec(
        manifest, tmp_path, "merge-wins",
        data={"domains": ["python", "unicode"]},
        ensemble={"members_per_module": 1, "members": [{"preset": "tiny"}], "merge_width": 64, "merge_heads": 4},
        training={"phase1_steps": 150, "phase2_steps": 80, "batch_size": 8, "seq_len": 64, "warmup_steps": 10,
                  "eval_interval": 50, "eval_batches": 2, "checkpoint_interval": 100},
    )
    result = train.run(spec, progress=False)
    rows = {r["name"]: r["mixed_val_loss"] for r in result["rows"] if r["kind"] in ("member", MERGED, "uniform")}
    merged, uniform = rows.pop(MERGED), rows.pop("uniform")
    assert merged < uniform, f"merged {merged:.4f} vs uniform mixture {uniform:.4f}"
    assert all(merged < v for v in rows.values()), f"merged {merged:.4f} vs members {rows}"
    assert result["merged_beats_every_member"] and result["merged_beats_uniform"]


def test_workers_killed_in_both_phases_resume_to_the_uninterrupted_runs_figures(trained_run, faulted_run):
    """The session's faulted run (a worker SIGKILLed in phase 1, another in phase 2) replays the
    steps after each checkpoint, trains exactly the spec's steps, and ends with the trained run's
    figures bit for bit: the members' phase 1 and the evidence merger's phase 2 (beta, gamma,
    switch rows, all-to-all) resume exactly."""
    import torch

    from cluster.checkpointing import MERGER_FILE, module_file

    replayed = [r for r in read_metric_records(faulted_run.run) if r["replayed"]]
    assert {r["phase"] for r in replayed} == {"members", "merge"}, "a kill landed in each phase"
    training = faulted_run.spec.training
    checkpoint = Path(faulted_run.result["checkpoint"])
    for i in range(2):
        drawn = torch.load(checkpoint / module_file(i), weights_only=False)["sampler"]["batches_drawn"]
        assert drawn == training.phase1_steps, f"module {i} trained {drawn} steps"
    merger = torch.load(checkpoint / MERGER_FILE, weights_only=False)["mixed_sampler"]["batches_drawn"]
    assert merger == training.phase2_steps

    figures = ("kind", "name", "mixed_val_loss", "switch_val_loss", "val_by_domain")
    faulted = [{k: r.get(k) for k in figures} for r in faulted_run.result["rows"]]
    clean = [{k: r.get(k) for k in figures} for r in trained_run.result["rows"]]
    assert faulted == clean
    assert faulted_run.result["evidence"] == trained_run.result["evidence"]


def test_lost_node_is_replaced_and_the_run_finishes(tmp_path, manifest):
    """Its own 3-node `ray.cluster_utils.Cluster` (head + 2 worker nodes) in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "scripts" / "node_failure.py"),
         "--manifest", str(manifest), "--storage", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["removed_node_hosted_worker"], report
    assert report["module_steps"] == [report["phase1_steps"]] * 2, report
    assert report["merged_mixed_val_loss"] is not None


def test_run_on_an_object_store_stages_its_data_and_appends_part_files(ray_cluster, manifest, s3_bucket, s3_server,
                                                                        tmp_path, monkeypatch):
    """Data and run folder on S3 (moto). Workers stage the shards from the remote
    manifest (sha256-checked) and memory-map the copies; the API's spec.json is the
    only copy (the driver does not write it again); metrics are part files the API's
    reader follows; final/ and the report land in the bucket. The store is cut off for
    2 s twice while checkpoints are uploaded: the writes retry, and no line is lost."""
    import hashlib

    import pyarrow.fs as pafs

    from api.metrics import MetricsReader, read_records
    from api.services.jobs import write_spec as api_write_spec
    from leviathan.run import storage
    from leviathan.data.staging import load_manifest
    from leviathan.model.ensemble import LeviathanEnsemble

    monkeypatch.setenv("LEVIATHAN_STAGING_DIR", str(tmp_path / "driver-staged"))
    storage.upload_dir(manifest.parent, f"{s3_bucket}/data")
    spec = tiny_spec(f"{s3_bucket}/data/manifest.json", f"{s3_bucket}/runs", "s3-run")
    spec_uri = api_write_spec(spec)
    fs = s3_server.filesystem()
    key = lambda uri: uri.removeprefix("s3://")  # noqa: E731
    written = fs.get_file_info(key(spec_uri)).mtime

    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=train.run(spec, progress=False)), daemon=True)
    thread.start()

    def checkpoints() -> int:
        try:
            infos = fs.get_file_info(pafs.FileSelector(f"{key(spec.run_dir)}/checkpoints", allow_not_found=True))
        except OSError:  # the store is cut off for this process too
            return 0
        return sum(1 for i in infos if i.base_name.startswith("checkpoint_"))

    for seen in (1, 2):
        wait_for(lambda: checkpoints() >= seen or not thread.is_alive(), 300, f"checkpoint {seen}", poll_s=0.1)
        s3_server.pause(2)
    thread.join(timeout=600)
    assert "result" in out, "the run did not finish"
    result = out["result"]

    remote = load_manifest(spec.data.manifest)
    staged = ray_cluster.staging_dir / remote.root.name
    for domain in result["domains"]:
        entry = remote.manifest.split(domain, "train")
        assert hashlib.sha256((staged / entry.file).read_bytes()).hexdigest() == entry.sha256

    run_dir = spec.run_dir
    assert fs.get_file_info(key(spec_uri)).mtime == written, "spec.json was written again"
    names = {i.path.removeprefix(key(run_dir) + "/")
             for i in fs.get_file_info(pafs.FileSelector(key(run_dir), recursive=True))
             if i.type == pafs.FileType.File}
    parts = sorted(n for n in names if n.startswith("metrics/"))
    assert "metrics.jsonl" not in names and parts == [f"metrics/part-{i:06d}.jsonl" for i in range(len(parts))]
    assert {"train_result.json", "report.md", "final/spec.json"} <= names

    records = read_records(run_dir)
    assert records[-1]["phase"] == "done" and len(parts) > 3
    t = spec.training
    for phase, last in (("members", t.phase1_steps), ("merge", t.phase2_steps)):
        steps = {r["step"] for r in records if r["phase"] == phase}
        assert steps == logged_steps(last, t.eval_interval, t.checkpoint_interval), (phase, steps)
    summary = MetricsReader().summary(run_dir)
    assert summary.phase == "done" and summary.records == len(records)
    assert json.loads(storage.read_text(f"{run_dir}/train_result.json"))["rows"] == result["rows"]
    storage.download(f"{run_dir}/final", tmp_path / "final")
    assert LeviathanEnsemble.load(tmp_path / "final").member_names == ["m0.0", "m0.1", "m1.0", "m1.1"]
