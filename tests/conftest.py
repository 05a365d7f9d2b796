"""Shared test fixtures: one real Ray cluster per test session, each corpus prepared
once, one finished training run and one faulted run that the end-to-end tests read.

Tests come in two tiers. Every test that asks for the Ray cluster (directly or
through another fixture) is marked `slow` at collection, so `pytest -m "not slow"`
is the quick tier and `pytest -m slow` the end-to-end one; plain `pytest` runs both.

Starting Ray costs seconds here, so every test that needs Ray shares the one
cluster started by the `ray_cluster` fixture. It is what users run: a
`ray start --head` cluster with the dashboard and its Jobs server and Ray's
token authentication on; the test process joins it with `ray.init(address=...)`
so Ray Train runs from the tests, while `JobSubmissionClient`, `ray job submit`
and the API submit jobs to the same cluster.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.scripts.proxy import PausableProxy

if TYPE_CHECKING:
    from jobs.spec import JobSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def _ensure_ray_token() -> str:
    """The cluster token Ray's clients and `ray start --head` read (~/.ray/auth_token)."""
    if not RAY_TOKEN_FILE.is_file():
        RAY_TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        RAY_TOKEN_FILE.write_text(secrets.token_hex(32))
        RAY_TOKEN_FILE.chmod(0o600)
    return RAY_TOKEN_FILE.read_text().strip()


# Ray reads its auth mode when it is imported, so this must precede every `import ray`.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = _ensure_ray_token()
os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "1"
# Ray Train's preemption watcher polls for cloud spot-instance notices: one more actor process per
# run that a local test cluster has no use for.
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
# Train's controller polls its workers every 2 s by default, so every run waited about that long
# to notice its workers had finished (or died). Tiny test runs train for about 2 s: poll faster.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
# The suite runs beside its own Ray workers on two cores: one thread per process keeps
# torch from oversubscribing them (set before torch is first imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")


SLOW_FIXTURES = frozenset({"ray_cluster"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `slow` every test whose fixtures (resolved transitively) include the Ray cluster:
    those start Ray work, the rest run in-process in seconds."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Store:
    """moto's S3 server on 127.0.0.1: a real object store (no appends, no folders) for
    storage tests. pyarrow.fs resolves `s3://` URIs to it through the AWS_* variables
    this session sets, in the test process and in the Ray cluster it starts."""

    endpoint: str  # http://127.0.0.1:<port>, through a forwarder that `pause` cuts off
    proxy: Any = None  # tests.scripts.proxy.PausableProxy in front of moto

    def pause(self, seconds: float) -> None:
        """Make the store unreachable for `seconds` (its buckets are kept)."""
        self.proxy.pause(seconds)

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint.removeprefix("http://"), scheme="http",
            access_key=S3_ENV["AWS_ACCESS_KEY_ID"], secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region=S3_ENV["AWS_DEFAULT_REGION"], allow_bucket_creation=True,
        )

    def new_bucket(self) -> str:
        """A fresh empty bucket; returns its URI `s3://<name>`."""
        name = f"lv-{secrets.token_hex(6)}"
        self.filesystem().create_dir(name)
        return f"s3://{name}"


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server per session (started before Ray, so Ray's workers see it too)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = PausableProxy(port)
    endpoint = f"http://127.0.0.1:{proxy.port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield S3Store(endpoint=endpoint, proxy=proxy)
    finally:
        proxy.close()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the session's S3 server: `s3://<name>`."""
    return s3_server.new_bucket()


@dataclass
class RayCluster:
    address: str  # GCS address, for RAY_ADDRESS / ray.init(address=...)
    dashboard_url: str  # http://127.0.0.1:<port>, the Jobs API
    auth_token: str | None  # Ray token auth (on for this cluster)
    staging_dir: Path  # where the cluster's workers stage data from remote manifests
    metrics_url: str  # the head node's Prometheus export (`ray start --metrics-export-port`)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

    def cli_env(self) -> dict[str, str]:
        """Environment for a `ray` CLI or job-client subprocess talking to this cluster."""
        env = dict(os.environ)
        env.update(RAY_ADDRESS=self.dashboard_url, RAY_AUTH_MODE="token")
        if self.auth_token:
            env["RAY_AUTH_TOKEN"] = self.auth_token
        return env


def _ray_env(dashboard_url: str) -> dict[str, str]:
    """The head node's environment: the test venv's python first on PATH, so job
    entrypoints (`python -m jobs.train`) run with the project and its deps, and this
    cluster's Jobs server as the one Ray's state API asks (Train's placement-group
    cleaner would otherwise ask whichever cluster started last on the machine)."""
    env = dict(os.environ)
    env["RAY_API_SERVER_ADDRESS"] = dashboard_url
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _wait_for_dashboard(url: str, token: str, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"Ray dashboard at {url} did not come up in {timeout_s} s")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server) -> RayCluster:
    import ray

    ray_bin = str(VENV_BIN / "ray")
    gcs_port, dashboard_port, metrics_port = free_port(), free_port(), free_port()
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    env = _ray_env(dashboard_url)
    staging_dir = tmp_path_factory.mktemp("staged")
    env["LEVIATHAN_STAGING_DIR"] = str(staging_dir)
    token = os.environ["RAY_AUTH_TOKEN"]  # `ray start --head` turns auth on since the token exists
    log = open(tmp_path_factory.mktemp("ray") / "ray_start.log", "w")
    # A private temp dir: job drivers find their cluster through <temp dir>/ray_current_cluster,
    # so the shared /tmp/ray would hand them any other cluster started on this machine.
    temp_dir = tempfile.mkdtemp(prefix="lvray-", dir="/tmp")
    head = subprocess.Popen(
        [
            ray_bin, "start", "--head", "--block",
            f"--temp-dir={temp_dir}",
            f"--port={gcs_port}",
            f"--dashboard-port={dashboard_port}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=4",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={metrics_port}",
            f"--runtime-env-agent-port={free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_dashboard(dashboard_url, token, head)
        os.environ.update(
            PATH=env["PATH"], PYTHONPATH=env["PYTHONPATH"], RAY_API_SERVER_ADDRESS=dashboard_url
        )
        gcs_address = f"127.0.0.1:{gcs_port}"
        ray.init(address=gcs_address, logging_level="WARNING", log_to_driver=False)
        yield RayCluster(address=gcs_address, dashboard_url=dashboard_url, auth_token=token, staging_dir=staging_dir,
                         metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        ray.shutdown()
        # The head's processes share its process group: end them together, not one by one.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- corpora and runs, once a session


@pytest.fixture(scope="session")
def builtin_corpus(tmp_path_factory) -> Path:
    """The built-in corpus prepared once: its manifest.json."""
    from tests.scripts.common import builtin_manifest

    return builtin_manifest(tmp_path_factory.getbasetemp() / "leviathan-builtin")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The evaluation tests' small byte-level corpus (3 domains) prepared once: its manifest.json."""
    from tests.test_evaluation import prepare_corpus

    return prepare_corpus(tmp_path_factory.mktemp("small-corpus"))


@pytest.fixture(scope="session")
def two_workers(ray_cluster, builtin_corpus, small_corpus, tmp_path_factory) -> Path:
    """One 2-worker gloo fit running every check of tests/scripts/two_workers.py (phase 2 and the
    evaluation equal one process; the start-up check leaves no trace); each check's outputs
    are under <folder>/<check name>."""
    from tests.scripts.two_workers import run_checks

    return run_checks(tmp_path_factory.mktemp("two-workers"), {"builtin": builtin_corpus, "small": small_corpus})


@dataclass
class TrainedRun:
    """A finished run of `python -m jobs.train` as a user starts it (a subprocess, tracking on)."""

    spec: JobSpec
    run: Path  # its run folder
    result: dict  # train_result.json
    stdout: str  # the command's stdout
    output: str  # stdout and stderr
    gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (name, sorted tags) -> highest value scraped

    def gauge_names(self) -> set[str]:
        return {name for name, _ in self.gauges}


def _scrape(metrics_url: str, run_name: str, into: dict) -> None:
    """Fold the run's Leviathan gauges on the head's Prometheus export into `into` (highest value kept)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_leviathan_") and s.labels.get("run") == run_name:
                key = (s.name, tuple(sorted(s.labels.items())))
                into[key] = max(s.value, into.get(key, s.value))


@pytest.fixture(scope="session")
def trained_run(ray_cluster, builtin_corpus, tmp_path_factory) -> TrainedRun:
    """One tiny run serving the run-contract, report, CLI-output, dashboard-gauge and tracking
    tests. Its gauges are scraped while it trains and after, until every Leviathan gauge of
    the merge phase has shown (Ray exports a worker's gauges seconds after they are set)."""
    from cluster.metrics import GAUGES, PHASE_GAUGE
    from tests.scripts.common import shared_run_spec, write_spec

    storage = tmp_path_factory.mktemp("trained")
    spec = shared_run_spec(builtin_corpus, storage, "trained")
    env = dict(ray_cluster.cli_env(), RAY_ADDRESS=ray_cluster.address)
    out_file, err_file = storage / "stdout.txt", storage / "stderr.txt"
    with open(out_file, "w") as out, open(err_file, "w") as err:  # files: a full pipe would stall the run
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.train", "--spec", str(write_spec(spec, storage / "spec.json")), "--no-progress"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=err,
        )
    gauges: dict = {}
    wanted = {f"ray_leviathan_{name}" for name in [*GAUGES, PHASE_GAUGE]}

    def complete() -> bool:
        seen = {name for name, tags in gauges if dict(tags).get("phase") == "merge"}
        return wanted <= {name for name, _ in gauges} and "ray_leviathan_step" in seen

    deadline = time.monotonic() + 600  # a hung run fails the session's run tests instead of stalling them
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            _scrape(ray_cluster.metrics_url, spec.name, gauges)
            time.sleep(0.5)
        for _ in range(120):  # at most about a minute after the run
            if complete():
                break
            _scrape(ray_cluster.metrics_url, spec.name, gauges)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout, stderr = out_file.read_text(), err_file.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"the session's trained run failed ({proc.returncode}):\n{(stdout + stderr)[-4000:]}")
    run = Path(spec.run_dir)
    result = json.loads((run / "train_result.json").read_text())
    return TrainedRun(spec=spec, run=run, result=result, stdout=stdout, output=stdout + stderr, gauges=gauges)


@dataclass
class FaultedRun:
    """The trained run's spec (another name, storage and MLflow store) run with a worker killed in phase 1
    and again in phase 2; it must end with the same figures."""

    spec: JobSpec
    run: Path
    result: dict  # jobs.train.run's result


@pytest.fixture(scope="session")
def faulted_run(ray_cluster, builtin_corpus, tmp_path_factory) -> FaultedRun:
    from tests.scripts.common import shared_run_spec, train_killing_workers

    # The trained run tracks to an MLflow file store, this one to an SQLite store: both stores are run.
    spec = shared_run_spec(builtin_corpus, tmp_path_factory.mktemp("faulted"), "faulted", mlflow_store="sqlite")
    result = train_killing_workers(spec, ray_cluster.dashboard_url, phases=("members", "merge"))
    return FaultedRun(spec=spec, run=Path(spec.run_dir), result=result)
