"""Experiment tracking: rank 0 logs the run to MLflow and/or TensorBoard.

Ray Train V2 runs no Tune callbacks for a plain `TorchTrainer`, so tracking
happens inside the training function, on rank 0, beside metrics.jsonl: every
report's records (each member's losses, the uniform mixture's and the merged
model's), the job's tokens/s per phase and its ETA (`leviathan.run.progress`). The
JobSpec, flattened, is the MLflow run's parameters; the final evaluation table
and `report.md` are its artifacts.

One tracking run per run folder (the folder of metrics.jsonl): the MLflow run
carries a tag derived from that folder, so a restarted worker group (or the
driver, attaching the report) finds and continues the same run. TensorBoard's
event files live in `<run>/tensorboard`; a restart adds a new event file there.
No point is logged twice and none is lost: records are appended to
metrics.jsonl first and tracked after, and when a restarted worker group opens
a sink it reads back the (tag, step) points the sink already holds and logs
only the others. A restart runs the steps after its checkpoint again with the
same values (the resume is bit-exact), so a point that a crash cut off between
metrics.jsonl and a sink is filled in by the replay, and the rest are skipped.

A tracking server that goes away never stops training. Each sink runs in its
own `Courier` thread behind a bounded queue: the training step only enqueues
(and drops what a full queue cannot hold), and the courier retries a failed
call with backoff, with one warning when the outage starts and one when it
ends. Points that were dropped or never got through are sent by `finish`,
which replays metrics.jsonl; the sinks' held (tag, step) sets keep every point
logged once. A server still down at the end costs a warning, not the run.

Steps are global: phase-1 step s is s, phase-2 step s is phase1_steps + s, so
each curve runs on across both phases. mlflow and tensorboard are an optional
extra (`pip install leviathan[tracking]`), imported only when a spec asks for them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from cluster.plan import Tracking
from leviathan.run import storage
from leviathan.run.folder import TENSORBOARD_DIR
from leviathan.run.progress import RunProgress
from leviathan.run.records import MetricsLog

RUN_KEY_TAG = "leviathan.run_key"
RUN_DIR_TAG = "leviathan.run_dir"
_FIGURES = ("train_loss", "val_loss", "mixed_val_loss", "lr", "tokens_per_s")
_MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call
QUEUE_SIZE = 256  # reports a courier holds while its server is away; more are dropped (replayed at the end)
FINISH_TIMEOUT_S = 60.0  # how long the end of a run waits for a server that is away
logger = logging.getLogger(__name__)


def run_key(run_dir: str) -> str:
    """The tag value naming a run folder's tracking run (a hash: safe in MLflow's filter syntax)."""
    return hashlib.sha256(storage.normalize(run_dir).encode()).hexdigest()[:32]


def global_step(phase: str, step: int, phase1_steps: int) -> int:
    return step if phase == "members" else phase1_steps + step


def scalars(records: Iterable[dict[str, Any]], phase1_steps: int) -> dict[int, dict[str, float]]:
    """Global step -> {tag: value} of the records' figures: `m0.1/val_loss`,
    `merged/mixed_val_loss`, `uniform/mixed_val_loss`; the final evaluation's under `final/`."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for r in records:
        prefix = "final/" if r["phase"] == "final" else ""
        values = out[global_step(r["phase"], r["step"], phase1_steps)]
        for name in _FIGURES:
            if r.get(name) is not None:
                values[f"{prefix}{r['member']}/{name}"] = float(r[name])
    return dict(out)


def progress_scalars(progress: RunProgress, phase1_steps: int, phase2_steps: int) -> dict[str, float]:
    """The job's tokens/s in the current phase (`progress/tokens_per_s_members` or
    `_merge`) and its ETA in seconds, at the latest report."""
    out = {}
    if progress.current_tokens_per_s is not None:
        out[f"progress/tokens_per_s_{progress.current_phase}"] = progress.current_tokens_per_s
    eta = progress.eta_s(phase1_steps, phase2_steps)
    if eta is not None:
        out["progress/eta_s"] = eta
    return out


def new_points(by_step: dict[int, dict[str, float]], held: set[tuple[str, int]]) -> dict[int, dict[str, float]]:
    """by_step without the (tag, step) points a sink already holds."""
    out = {step: {tag: v for tag, v in values.items() if (tag, step) not in held} for step, values in by_step.items()}
    return {step: values for step, values in out.items() if values}


class MlflowRun:
    """The MLflow run of one run folder, found by its tag or created."""

    def __init__(self, tracking: Tracking, run_dir: str):
        client = mlflow_client(tracking.mlflow_uri)
        experiment_id = ensure_experiment(client, tracking)
        key = run_key(run_dir)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
        self.held: set[tuple[str, int]] = set()  # (tag, step) points logged before this start
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            for tag in found[0].data.metrics:
                self.held.update((tag, m.step) for m in client.get_metric_history(self.run_id, tag))
        else:
            tags = {RUN_KEY_TAG: key, RUN_DIR_TAG: storage.normalize(run_dir)}
            self.run_id = client.create_run(experiment_id, tags=tags, run_name=run_dir.rstrip("/").rsplit("/", 1)[-1]).info.run_id
        self.client = client

    def log_params(self, params: Iterable[tuple[str, str]]) -> None:
        """The same values again on a restart are accepted by MLflow; parameters never change."""
        from mlflow.entities import Param

        batch = [Param(k, v) for k, v in params]
        for i in range(0, len(batch), 100):  # MLflow's limit of params per call
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def log_scalars(self, by_step: dict[int, dict[str, float]], wall_time: float) -> None:
        from mlflow.entities import Metric

        ms = int(wall_time * 1000)
        fresh = new_points(by_step, self.held)
        batch = [Metric(k, v, ms, step) for step, values in fresh.items() for k, v in values.items()]
        for i in range(0, len(batch), _MLFLOW_BATCH):
            part = batch[i : i + _MLFLOW_BATCH]
            self.client.log_batch(self.run_id, metrics=part)
            self.held.update((m.key, m.step) for m in part)

    def log_text(self, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def mlflow_client(uri: str):
    """An `MlflowClient` for `uri`. MLflow 3 refuses its file store unless
    MLFLOW_ALLOW_FILE_STORE is set; a `file:` URI in a spec is that consent."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, tracking: Tracking) -> str:
    """The experiment's id, created on first use. A sqlite store keeps its artifacts
    beside the database file (MLflow's default is the process's working folder)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(tracking.experiment)
    if found is not None:
        return found.experiment_id
    artifacts = None
    if tracking.mlflow_uri.startswith("sqlite:///"):
        db = Path(tracking.mlflow_uri.removeprefix("sqlite:///"))
        artifacts = (db.parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(tracking.experiment, artifact_location=artifacts)
    except MlflowException:  # another run created it meanwhile
        return client.get_experiment_by_name(tracking.experiment).experiment_id


class TensorBoardRun:
    """Event files under `<run>/tensorboard`. On an object store the writer fills a
    local folder whose files are copied up after every flush."""

    def __init__(self, run_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.join(run_dir, TENSORBOARD_DIR)
        local = storage.local_path(self.remote)
        self.held = held_tensorboard_points(self.remote)  # (tag, step) points of earlier starts
        self.mirror = None if local is not None else tempfile.mkdtemp(prefix="leviathan-tb-")
        self.writer = SummaryWriter(log_dir=str(local if local is not None else self.mirror))

    def log_scalars(self, by_step: dict[int, dict[str, float]], wall_time: float) -> None:
        for step, values in sorted(new_points(by_step, self.held).items()):
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step, walltime=wall_time)
                self.held.add((tag, step))
        self.flush()

    def log_text(self, name: str, text: str) -> None:
        self.writer.add_text(name, text)
        self.flush()

    def flush(self) -> None:
        self.writer.flush()
        if self.mirror is not None:
            for f in Path(self.mirror).iterdir():
                storage.write_bytes(storage.join(self.remote, f.name), f.read_bytes())

    def finish(self) -> None:
        self.writer.close()
        self.flush()


def held_tensorboard_points(folder: str) -> set[tuple[str, int]]:
    """The (tag, step) scalar points in the event files under folder (a path or URI), if any."""
    if not storage.list_dir(folder):
        return set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def points(local: Path) -> set[tuple[str, int]]:
        events = EventAccumulator(str(local), purge_orphaned_data=False, size_guidance={"scalars": 0})
        events.Reload()
        return {(tag, e.step) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}

    local = storage.local_path(folder)
    if local is not None:
        return points(local)
    with tempfile.TemporaryDirectory(prefix="leviathan-tb-read-") as tmp:
        storage.download(folder, tmp)
        return points(Path(tmp))


class Courier:
    """One sink, fed from a bounded queue by its own thread, so training never waits on it.

    `open_sink` builds the sink (it may need the server too). A call that fails
    is retried, the same call, with doubling backoff up to 30 s; the first
    failure of an outage logs one warning and the recovery one more line.
    """

    def __init__(self, name: str, open_sink):
        self.name, self._open = name, open_sink
        self.sink = None
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self.dropped = 0  # calls a full queue could not take
        self.abandoned = 0  # calls given up at close, the server still away
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"leviathan-tracking-{name}", daemon=True)
        self._thread.start()

    def send(self, call: str, *args: Any, wait_s: float = 0.0) -> None:
        """Queue `sink.call(*args)`. A training step never waits (wait_s = 0): a full
        queue drops the call, and `Tracker.finish` replays metrics.jsonl instead."""
        try:
            self.queue.put((call, args), timeout=wait_s) if wait_s > 0 else self.queue.put_nowait((call, args))
        except queue.Full:
            self.dropped += 1

    def _serve(self) -> None:
        while True:
            try:
                call, args = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            try:
                if call == "stop":
                    return
                self._deliver(call, args)
            finally:
                self.queue.task_done()

    def _deliver(self, call: str, args: tuple) -> None:
        delay, failing_since = 1.0, None
        while True:
            try:
                if self.sink is None:
                    self.sink = self._open()
                getattr(self.sink, call)(*args)
                if failing_since is not None:
                    logger.warning("tracking to %s is back after %.0f s", self.name, time.monotonic() - failing_since)
                return
            except Exception as e:  # the sinks' errors have no common base; any one means "try again"
                if failing_since is None:
                    failing_since = time.monotonic()
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    logger.warning("tracking to %s failed, retrying in the background: %s", self.name, first)
                if self._closing.is_set() and time.monotonic() - failing_since > self._give_up_s:
                    logger.warning("tracking to %s still failing; its points stay in metrics.jsonl", self.name)
                    self.abandoned += 1
                    return
                time.sleep(delay)
                delay = min(2 * delay, 30.0)

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued call was delivered (or given up); True when it was."""
        deadline = time.monotonic() + timeout_s
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.queue.unfinished_tasks

    def close(self, timeout_s: float) -> bool:
        """Deliver what is queued within timeout_s, then stop; True when everything went out."""
        self._give_up_s = timeout_s
        self._closing.set()
        self.send("stop", wait_s=timeout_s)
        self._thread.join(timeout_s)
        return not self._thread.is_alive() and self.queue.empty() and not self.abandoned

    _give_up_s = FINISH_TIMEOUT_S


def read_records(run_dir: str) -> list[dict[str, Any]]:
    """Every complete record of `<run>/metrics.jsonl` (what `finish` replays)."""
    return MetricsLog(run_dir).read()


class Tracker:
    """Rank 0's tracking runs (MLflow, TensorBoard or both) of one run folder, each behind a `Courier`."""

    def __init__(self, tracking: Tracking, run_dir: str, phase1_steps: int, phase2_steps: int):
        self.phase1_steps, self.phase2_steps, self.run_dir = phase1_steps, phase2_steps, run_dir
        self.couriers: list[Courier] = []
        if tracking.mlflow_uri is not None:
            def open_mlflow() -> MlflowRun:
                run = MlflowRun(tracking, run_dir)
                run.log_params(tracking.params)
                return run

            self.couriers.append(Courier(f"MLflow {tracking.mlflow_uri}", open_mlflow))
        if tracking.tensorboard:
            self.couriers.append(Courier("TensorBoard", lambda: TensorBoardRun(run_dir)))

    def log(self, records: list[dict[str, Any]], progress: RunProgress | None) -> None:
        """One report's records; each sink skips the points it already holds."""
        if not records:
            return
        by_step = scalars(records, self.phase1_steps)
        steps = [global_step(r["phase"], r["step"], self.phase1_steps) for r in records if r["phase"] != "final"]
        if steps and progress is not None:
            by_step[max(steps)].update(progress_scalars(progress, self.phase1_steps, self.phase2_steps))
        now = time.time()
        for courier in self.couriers:
            courier.send("log_scalars", by_step, now)

    def log_text(self, name: str, text: str) -> None:
        for courier in self.couriers:
            courier.send("log_text", name, text)

    def drain(self, timeout_s: float = FINISH_TIMEOUT_S) -> bool:
        """Wait until the couriers delivered what was logged so far; True when they all did."""
        return all([courier.drain(timeout_s) for courier in self.couriers])

    def finish(self, timeout_s: float = FINISH_TIMEOUT_S) -> None:
        """Replay metrics.jsonl (what a full queue dropped or an outage held back), then close."""
        replay = [r for r in read_records(self.run_dir) if r.get("phase") in ("members", "merge", "final")]
        by_step = scalars(replay, self.phase1_steps)
        for courier in self.couriers:
            if by_step:
                courier.send("log_scalars", by_step, time.time(), wait_s=timeout_s)
            courier.send("finish", wait_s=timeout_s)
            if not courier.close(timeout_s):
                logger.warning("tracking to %s did not finish within %.0f s; metrics.jsonl holds every point",
                               courier.name, timeout_s)


def end_run(tracking: Tracking, run_dir: str, status: str, files: dict[str, str]) -> None:
    """The driver's part once training ended: `files` (artifact name -> text, e.g.
    report.md) into the run folder's MLflow run, which then ends as `status`
    (FINISHED, or FAILED when the workers failed past max_failures)."""
    if tracking.mlflow_uri is None:
        return

    class Ending:
        def end(self) -> None:
            run = MlflowRun(tracking, run_dir)
            for name, text in files.items():
                run.log_text(name, text)
            run.finish(status)

    courier = Courier(f"MLflow {tracking.mlflow_uri}", Ending)
    courier.send("end")
    if not courier.close(FINISH_TIMEOUT_S):
        logger.warning("tracking: the MLflow run was not ended as %s (server unreachable)", status)


def check_tracking(tracking: Tracking) -> None:
    """Reach the MLflow store and its experiment before any worker starts, so a bad
    URI is a one-line error instead of a failing worker group. Raises ValueError."""
    try:
        if tracking.tensorboard:
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        if tracking.mlflow_uri is None:
            return
        ensure_experiment(mlflow_client(tracking.mlflow_uri), tracking)
    except ImportError as e:
        raise ValueError(f"tracking: {e.name or 'tensorboard'} is not installed (pip install 'leviathan[tracking]')") from None
    except Exception as e:  # MLflow's store errors have no common base; the message is what matters
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"tracking.mlflow_uri: cannot use {tracking.mlflow_uri}: {first}") from None
