"""What `leviathan train` prints: the job's own lines and its final table last; Ray
Train's per-report INFO lines only with `--verbose`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.scripts.common import builtin_manifest, tiny_spec, write_spec

pytestmark = pytest.mark.slow

RAY_REPORT_LINES = ("Reporting training result", "Checkpoint successfully created")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return builtin_manifest(tmp_path_factory.getbasetemp() / "leviathan-builtin")


def _train(ray_cluster, manifest: Path, tmp_path: Path, *flags: str) -> tuple[str, str]:
    spec = tiny_spec(
        manifest, tmp_path, "printed",
        training={"phase1_steps": 2, "phase2_steps": 2, "eval_interval": 1, "checkpoint_interval": 2},
    )
    env = dict(ray_cluster.cli_env(), RAY_ADDRESS=ray_cluster.address)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--spec", str(write_spec(spec, tmp_path / "spec.json")), "--no-progress", *flags],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return proc.stdout, output


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_train_report_lines_show_only_when_verbose(ray_cluster, manifest, tmp_path, verbose):
    stdout, output = _train(ray_cluster, manifest, tmp_path, *(["--verbose"] if verbose else []))
    assert "[leviathan printed rank 0]" in output, "the job's own progress lines show"
    for line in RAY_REPORT_LINES:
        assert (line in output) == verbose, (line, output[-4000:])
    lines = stdout.strip().splitlines()
    assert lines[-1].startswith("run folder:"), lines[-4:]
    assert any(line.startswith("| merged (mixture)") for line in lines), "the final table shows the merged row"
