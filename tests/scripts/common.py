"""Helpers shared by the training tests and their subprocess scripts."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from jobs.spec import JobSpec
from leviathan.run import names


def builtin_manifest(folder: Path) -> Path:
    """The built-in corpus prepared into `folder` (reused when already there)."""
    from jobs.prepare import builtin_sources, prepare_sources

    manifest = folder / "manifest.json"
    if not manifest.is_file():
        prepare_sources(builtin_sources(), folder)
    return manifest


def tiny_spec(manifest: Path | str, storage: Path | str, name: str, **sections: dict[str, Any]) -> JobSpec:
    """A spec small enough for a test: 2 modules x 2 tiny members on 2 CPU workers."""
    spec: dict[str, Any] = {
        "name": name,
        "storage": str(storage),
        "data": {"manifest": str(manifest)},
        "ensemble": {
            "modules": 2, "members_per_module": 2, "merge_width": 32, "merge_heads": 2,
            "members": [{"preset": "tiny", "flavour": "gelu4"}, {"preset": "tiny", "flavour": "relu3"}],
        },
        "training": {
            "phase1_steps": 6, "phase2_steps": 4, "batch_size": 4, "seq_len": 32, "warmup_steps": 1,
            "eval_interval": 3, "eval_batches": 1, "checkpoint_interval": 4,
        },
        "resources": {"workers": 2, "cpus_per_worker": 1, "max_failures": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            spec[key] = {**spec.get(key, {}), **value}
        else:
            spec[key] = value
    return JobSpec.model_validate(spec)


def write_spec(spec: JobSpec, path: Path) -> Path:
    path.write_text(spec.to_json())
    return path


def read_metric_records(run: Path) -> list[dict]:
    """The run's metrics.jsonl lines so far, skipping a line still being written."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Poll `condition()` until true; an AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def latest_checkpoint_step(run: Path, phase: str | None = None) -> int:
    """Step of the newest checkpoint written under `<run>/checkpoints` (-1: none yet), of `phase` when given."""
    steps = [-1]
    for state in (run / "checkpoints").glob("checkpoint_*/state.json"):
        try:
            data = json.loads(state.read_text())
            if phase is None or data["phase"] == phase:
                steps.append(data["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps)


# The merged model's row kind and member name in a run's result and metrics.
MERGED = names.MERGED

# The schedule of the session's `trained_run` and `faulted_run`: long enough that a worker
# can be killed inside each phase after a checkpoint, with logged steps past it to replay.
SHARED_RUN_TRAINING = {"phase1_steps": 40, "phase2_steps": 30, "batch_size": 8, "seq_len": 64,
                       "eval_interval": 5, "checkpoint_interval": 10}


def shared_run_spec(manifest: Path | str, storage: Path, name: str, mlflow_store: str = "file") -> JobSpec:
    """The spec of the session's trained and faulted runs: equal but for name, storage and MLflow
    store ("file" or "sqlite", inside `storage`; neither changes the figures), with TensorBoard
    on and room for two worker failures."""
    uri = f"file:{storage / 'mlruns'}" if mlflow_store == "file" else f"sqlite:///{storage / 'mlflow.db'}"
    return tiny_spec(
        manifest, storage, name, training=SHARED_RUN_TRAINING, resources={"max_failures": 3},
        tracking={"mlflow_uri": uri, "tensorboard": True},
    )


def logged_steps(last: int, eval_interval: int, checkpoint_interval: int) -> set[int]:
    """The steps a phase of `last` steps reports at: every evaluation, every checkpoint, the last."""
    return {s for s in range(1, last + 1) if s % eval_interval == 0 or s % checkpoint_interval == 0 or s == last}


def _live_workers(dashboard_url: str) -> set[int]:
    """Pids of this session's cluster's live Ray Train workers (the machine may run other clusters)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=dashboard_url, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return {a.pid for a in actors}


def _kill_a_worker_in(spec: JobSpec, dashboard_url: str, phase: str, spared: set[int]) -> tuple[int, set[int]]:
    """SIGKILL one live worker not in `spared` once a checkpoint of `phase` is registered and
    the phase's lines past it are logged (the restarted group must replay them). Returns the
    step last logged before the kill and the workers alive then."""
    run = Path(spec.run_dir)
    wait_for(lambda: (run / "checkpoints" / "checkpoint_manager_snapshot.json").is_file()
             and latest_checkpoint_step(run, phase) > 0, 300, f"a registered {phase} checkpoint")

    def logged_past_checkpoint() -> bool:
        steps = [r["step"] for r in read_metric_records(run) if r["phase"] == phase]
        return bool(steps) and max(steps) > latest_checkpoint_step(run, phase)

    wait_for(logged_past_checkpoint, 120, f"{phase} metrics past the checkpoint")
    alive = _live_workers(dashboard_url)
    workers = sorted(alive - spared)
    assert workers, f"no live Ray Train worker of this run to kill in {phase}"
    killed_at = max(r["step"] for r in read_metric_records(run) if r["phase"] == phase)
    last = spec.training.phase1_steps if phase == "members" else spec.training.phase2_steps
    assert killed_at < last, f"the run left the {phase} phase before the kill; make it longer"
    os.kill(workers[-1], signal.SIGKILL)
    return killed_at, alive


def train_killing_workers(spec: JobSpec, dashboard_url: str, phases: tuple[str, ...] = ("members",)) -> dict:
    """`jobs.train.run(spec)`'s result after one of its Ray Train workers is SIGKILLed in
    each of `phases` in turn ("members": phase 1, "merge": phase 2).

    Each kill waits for a registered checkpoint of its phase and for metrics past it,
    asserts it happened inside the phase (else the phase is too short to test
    recovery), and spares the workers of earlier groups. The run must still finish.
    """
    from jobs import train

    spared = _live_workers(dashboard_url)  # workers of earlier runs still shutting down are not ours
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=train.run(spec, progress=False)), daemon=True)
    thread.start()
    for phase in phases:
        _, alive = _kill_a_worker_in(spec, dashboard_url, phase, spared)
        spared |= alive  # the next kill is for the restarted group
    thread.join(timeout=400)
    assert not thread.is_alive(), "the run did not finish after its workers were killed"
    assert "result" in out, "the run failed"
    return out["result"]
