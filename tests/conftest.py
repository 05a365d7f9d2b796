"""Shared test fixtures: one real Ray cluster per test session.

Starting Ray costs seconds here, so every test that needs Ray shares the one
cluster started by the `ray_cluster` fixture. It is what users run: a
`ray start --head` cluster with the dashboard and its Jobs server and Ray's
token authentication on; the test process joins it with `ray.init(address=...)`
so Ray Train runs from the tests, while `JobSubmissionClient`, `ray job submit`
and the API submit jobs to the same cluster.
"""

from __future__ import annotations

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
from typing import Any

import pytest

from tests.scripts.proxy import PausableProxy

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
# The suite runs beside its own Ray workers on two cores: one thread per process keeps
# torch from oversubscribing them (set before torch is first imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
    env["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "1"
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
