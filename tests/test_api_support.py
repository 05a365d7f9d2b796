"""Helpers shared by the API tests (no tests here): a real uvicorn server on loopback,
in a thread, test settings and a tiny training spec."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import uvicorn

from api.app import create_app
from api.settings import Settings
from tests.conftest import REPO_ROOT, RayCluster, free_port

API_TOKEN = "test-api-token-0123456789"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def make_settings(ray_cluster: RayCluster, storage: Path, **overrides: Any) -> Settings:
    """Test settings: the session's Ray, storage in tmp (the data root beside it), this
    checkout uploaded, and the default job entrypoint (`python` is the venv's on the
    cluster's PATH)."""
    values: dict[str, Any] = dict(
        ray_address=ray_cluster.dashboard_url,
        api_token=API_TOKEN,
        storage=str(storage),
        data_root=str(data_root_for(storage)),
        working_dir=str(REPO_ROOT),
        job_python="python",
        ray_auth_token=ray_cluster.auth_token,
    )
    values.update(overrides)
    return Settings(**values)


def data_root_for(storage: Path) -> Path:
    return storage.with_name(storage.name + "-data")


class LiveServer:
    """uvicorn serving `create_app(settings)` on 127.0.0.1:<free port>."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, token: str | None = API_TOKEN, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def live_server(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(settings) as server:
        yield server


def tiny_spec(name: str, steps: int = 4, modules: int = 1) -> dict[str, Any]:
    """A job that trains in seconds on CPU: tiny members, one worker, few steps."""
    return {
        "name": name,
        "ensemble": {
            "modules": modules,
            "members_per_module": 1,
            "members": [{"preset": "tiny", "flavour": "gelu4"}],
            "merge_width": 32,
            "merge_heads": 2,
        },
        "training": {
            "phase1_steps": steps,
            "phase2_steps": steps,
            "batch_size": 2,
            "seq_len": 32,
            "warmup_steps": 1,
            "eval_interval": 2,
            "eval_batches": 1,
            "checkpoint_interval": 2,
        },
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
    }


def submit(client: httpx.Client, spec: dict[str, Any], timeout: float = 60) -> httpx.Response:
    """POST /v1/jobs, retrying while Ray answers 503 (a fresh cluster's job agent
    can take a few seconds to accept submissions)."""
    deadline = time.monotonic() + timeout
    r = client.post("/v1/jobs", json=spec)
    while r.status_code == 503 and time.monotonic() < deadline:
        time.sleep(1)
        r = client.post("/v1/jobs", json=spec)
    return r


def wait_for_status(
    client: httpx.Client, job_id: str, wanted: set[str], timeout: float
) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until its status is in `wanted` (or terminal)."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}")
        r.raise_for_status()
        body = r.json()
        if body["status"] in wanted or body["status"] in TERMINAL:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{job_id} still {body.get('status')} after {timeout:.0f}s: {body}")
