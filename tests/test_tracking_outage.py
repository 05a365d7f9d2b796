"""A tracking server that goes away mid-run: training never waits, and every point arrives once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.plan import Tracking
from cluster.tracking import Courier, Tracker, scalars
from leviathan.run import storage
from leviathan.run.records import record
from tests.conftest import free_port
from tests.scripts.common import wait_for
from tests.scripts.proxy import PausableProxy

pytestmark = pytest.mark.slow


class MlflowServer:
    """A real `mlflow server` process on a SQLite store behind a forwarder: `go_away` makes it
    unreachable (open connections reset, new ones refused), as a crashed or partitioned server
    looks to a client, and `come_back` reconnects it with its runs intact."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.proxy = PausableProxy(self.port)
        self.uri = f"http://127.0.0.1:{self.proxy.port}"

    def start(self) -> None:
        cmd = [
            str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--default-artifact-root", (self.folder / "artifacts").as_uri(), "--workers", "1",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(self.answers, 300, "the MLflow server", poll_s=0.5)  # minutes on a loaded 2-core machine
        except AssertionError:
            self.stop()
            raise

    def answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def go_away(self) -> None:
        self.proxy.pause()
        assert not self.answers()

    def come_back(self) -> None:
        self.proxy.resume()
        wait_for(self.answers, 60, "the MLflow server back", poll_s=0.2)

    def stop(self) -> None:
        self.proxy.close()
        os.killpg(self.proc.pid, 9)
        self.proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server for the module (each test its own experiment); a test that sends it away brings it back."""
    # MLflow's own HTTP retries would hold a courier for minutes per call; ours retry instead.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="30")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def records_for(steps: range, phase: str = "members") -> list[dict]:
    return [
        record(step=s, phase=phase, member=m, train_loss=1.0 / s, val_loss=2.0 / s, lr=1e-3)
        for s in steps for m in ("m0.0", "m1.0")
    ]


def logged_points(uri: str, experiment: str) -> dict[str, list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    return {tag: sorted(m.step for m in client.get_metric_history(run.info.run_id, tag)) for tag in run.data.metrics}


def test_points_logged_while_the_server_is_down_arrive_once_after_it_returns(mlflow_server, tmp_path):
    run_dir = str(tmp_path / "run")
    log = storage.AppendLog(storage.join(run_dir, "metrics.jsonl"))
    tracking = Tracking(mlflow_uri=mlflow_server.uri, experiment="outage")
    tracker = Tracker(tracking, run_dir, phase1_steps=15, phase2_steps=0)

    def report(steps: range) -> None:  # what a worker does each report: metrics.jsonl first, then tracking
        records = records_for(steps)
        log.append("".join(json.dumps(r) + "\n" for r in records).encode())
        tracker.log(records, None)

    report(range(1, 6))

    def first_five_arrived() -> bool:
        try:
            return logged_points(mlflow_server.uri, "outage").get("m0.0/train_loss") == [1, 2, 3, 4, 5]
        except Exception:  # the run or experiment not created yet
            return False

    wait_for(first_five_arrived, 120, "steps 1-5", poll_s=1)
    mlflow_server.go_away()
    report(range(6, 11))  # returns at once: the courier holds them
    mlflow_server.come_back()
    report(range(11, 16))
    tracker.finish(timeout_s=120)

    points = logged_points(mlflow_server.uri, "outage")
    expected = scalars(records_for(range(1, 16)), 15)
    tags = {tag for values in expected.values() for tag in values}
    assert set(points) == tags
    for tag in tags:
        assert points[tag] == list(range(1, 16)), (tag, points[tag])  # every step once


def test_a_full_queue_drops_instead_of_blocking_and_finish_replays_the_log(mlflow_server, tmp_path, monkeypatch):
    import cluster.tracking as tracking_module

    monkeypatch.setattr(tracking_module, "QUEUE_SIZE", 2)
    run_dir = str(tmp_path / "run")
    log = storage.AppendLog(storage.join(run_dir, "metrics.jsonl"))
    tracker = Tracker(Tracking(mlflow_uri=mlflow_server.uri, experiment="full"), run_dir, 40, 0)
    mlflow_server.go_away()
    for step in range(1, 41):
        records = records_for(range(step, step + 1))
        log.append("".join(json.dumps(r) + "\n" for r in records).encode())
        tracker.log(records, None)
    (courier,) = tracker.couriers
    assert courier.dropped > 0, "a queue of 2 cannot hold 40 reports while the server is away"
    mlflow_server.come_back()
    tracker.finish(timeout_s=120)
    assert logged_points(mlflow_server.uri, "full")["m1.0/val_loss"] == list(range(1, 41))


def test_a_courier_that_cannot_deliver_gives_up_at_its_bound():
    class Broken:
        def log_scalars(self, *_):
            raise ConnectionError("server away")

    courier = Courier("nowhere", Broken)
    courier.send("log_scalars", {}, 0.0)
    assert courier.close(timeout_s=1.0) is False
    wait_for(lambda: courier.abandoned == 1, 60, "the courier to give up")
