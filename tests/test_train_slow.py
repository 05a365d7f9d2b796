"""End-to-end training runs that take tens of seconds each: the merged model
beats its members, a worker killed in phase 2, a lost node, and `ray job submit`
(a worker killed in phase 1 is in test_tracking.py, which also checks its tracking)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import train
from tests.scripts.common import builtin_manifest, read_metric_records, tiny_spec, train_killing_one_worker, write_spec

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return builtin_manifest(tmp_path_factory.getbasetemp() / "leviathan-builtin")


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
    rows = {r["name"]: r["mixed_val_loss"] for r in result["rows"] if r["kind"] in ("member", "merged", "uniform")}
    merged, uniform = rows.pop("merged"), rows.pop("uniform")
    assert merged < uniform, f"merged {merged:.4f} vs uniform mixture {uniform:.4f}"
    assert all(merged < v for v in rows.values()), f"merged {merged:.4f} vs members {rows}"
    assert result["merged_beats_every_member"] and result["merged_beats_uniform"]


def test_worker_killed_in_phase_2_resumes_to_the_uninterrupted_runs_final_loss(ray_cluster, manifest, tmp_path):
    """The evidence merger's phase 2 (beta, gamma, switch rows, all-to-all) resumes exactly: a run whose
    worker dies mid phase 2 ends with the same merged figures as the same spec run without a failure."""
    training = {"phase1_steps": 10, "phase2_steps": 60, "batch_size": 8, "seq_len": 64,
                "eval_interval": 5, "checkpoint_interval": 10}
    clean = train.run(tiny_spec(manifest, tmp_path, "p2-clean", training=training), progress=False)
    spec = tiny_spec(manifest, tmp_path, "p2-fault", training=training, resources={"max_failures": 3})
    faulted = train_killing_one_worker(spec, ray_cluster.dashboard_url, phase="merge")

    replayed = [r for r in read_metric_records(Path(spec.run_dir)) if r["replayed"]]
    assert replayed and {r["phase"] for r in replayed} == {"merge"}, "the kill landed in phase 2"

    def merged(result: dict) -> dict:
        return next(r for r in result["rows"] if r["kind"] == "merged")
    assert merged(faulted)["mixed_val_loss"] == merged(clean)["mixed_val_loss"], (merged(faulted), merged(clean))
    assert merged(faulted)["val_by_domain"] == merged(clean)["val_by_domain"]


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


def test_ray_job_submit_runs_the_training_entrypoint(ray_cluster, manifest, tmp_path):
    spec = tiny_spec(manifest, tmp_path, "submitted")
    spec_file = write_spec(spec, tmp_path / "submitted.json")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
         "--working-dir", ".", "--", "python", "-m", "jobs.train", "--spec", str(spec_file), "--no-progress"],
        cwd=REPO_ROOT, env=ray_cluster.cli_env(), capture_output=True, text=True, timeout=400,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "succeeded" in output and "merged (mixture)" in output, output[-4000:]
    result = json.loads((Path(spec.run_dir) / "train_result.json").read_text())
    assert [r["kind"] for r in result["rows"]][-3:] == ["uniform", "posterior", "running posterior"]
    assert result["rows"][0]["kind"] == "merged"
    assert (Path(spec.run_dir) / "final" / "model.safetensors").is_file()


def test_run_on_an_object_store_stages_its_data_and_appends_part_files(ray_cluster, manifest, s3_bucket, s3_server,
                                                                        tmp_path, monkeypatch):
    """Data and run folder on S3 (moto). Workers stage the shards from the remote
    manifest (sha256-checked) and memory-map the copies; the API's spec.json is the
    only copy (the driver does not write it again); metrics are part files the API's
    reader follows; final/ and the report land in the bucket."""
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

    result = train.run(spec, progress=False)

    remote = load_manifest(spec.data.manifest)
    staged = ray_cluster.staging_dir / remote.root.name
    for domain in result["domains"]:
        entry = remote.split(domain, "train")
        assert hashlib.sha256((staged / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]

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
    summary = MetricsReader().summary(run_dir)
    assert summary.phase == "done" and summary.records == len(records)
    assert json.loads(storage.read_text(f"{run_dir}/train_result.json"))["rows"] == result["rows"]
    storage.download(f"{run_dir}/final", tmp_path / "final")
    assert LeviathanEnsemble.load(tmp_path / "final").member_names == ["m0.0", "m0.1", "m1.0", "m1.1"]
