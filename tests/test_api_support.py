"""Helpers shared by the API tests (no tests here): a real uvicorn server on loopback,
in a thread; an in-process app on an in-memory Ray jobs gateway; test settings and a
tiny training spec."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import uvicorn

from api.app import create_app
from api.errors import NotFound
from api.ray_jobs import RayJob
from api.settings import Settings
from tests.conftest import REPO_ROOT, RayCluster, free_port

API_TOKEN = "test-api-token-0123456789"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def memory_settings(storage: Path, **overrides: Any) -> Settings:
    """Settings for an app on an in-memory gateway: no Ray, no token file, storage in tmp."""
    values: dict[str, Any] = dict(
        ray_address="http://ray.test:8265", api_token=API_TOKEN, storage=str(storage),
        data_root=str(data_root_for(storage)), working_dir="", ray_auth_token=None,
        ray_auth_token_path=storage / "no-token",
    )
    values.update(overrides)
    return Settings(**values)


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


class MemoryGateway:
    """A `JobsGateway` holding jobs in a dict: what the services ask of Ray, without Ray.

    `submitted` lists each submission's keyword arguments; a submitted job stays
    PENDING (nothing runs it). Jobs may be added directly with `add`.
    """

    def __init__(self, dashboard_url: str = "http://ray.test:8265") -> None:
        self.dashboard_url = dashboard_url
        self.submit_lock = asyncio.Lock()
        self.records: dict[str, RayJob] = {}
        self.texts: dict[str, str] = {}
        self.submitted: list[dict[str, Any]] = []
        self.nodes: list[dict[str, float]] = [{"CPU": 256.0, "GPU": 16.0}]  # holds any valid spec

    def add(self, job: RayJob, logs: str = "") -> None:
        assert job.submission_id is not None
        self.records[job.submission_id] = job
        self.texts[job.submission_id] = logs

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def version(self) -> dict[str, Any]:
        return {"version": "memory"}

    async def fresh_job(self, job_id: str) -> RayJob:
        if job_id not in self.records:
            raise NotFound(f"no job {job_id!r}")
        return self.records[job_id]

    async def job(self, job_id: str) -> RayJob:
        return await self.fresh_job(job_id)

    async def jobs(self) -> list[RayJob]:
        return sorted(self.records.values(), key=lambda j: (j.start_time or 0, j.submission_id), reverse=True)

    async def logs(self, job_id: str) -> str:
        await self.fresh_job(job_id)
        return self.texts[job_id]

    async def follow_logs(self, job_id: str) -> AsyncIterator[str]:
        text = await self.logs(job_id)

        async def chunks() -> AsyncIterator[str]:
            yield text

        return chunks()

    async def stop(self, job_id: str) -> bool:
        job = await self.fresh_job(job_id)
        if job.status in ("STOPPED", "SUCCEEDED", "FAILED"):
            return False
        self.records[job_id] = RayJob(**{**job.__dict__, "status": "STOPPED"})
        return True

    async def node_resources(self) -> list[dict[str, float]]:
        return [dict(n) for n in self.nodes]

    def submit(self, *, entrypoint: str, submission_id: str, runtime_env: dict[str, Any],
               metadata: dict[str, str]) -> None:
        self.submitted.append(dict(entrypoint=entrypoint, submission_id=submission_id,
                                   runtime_env=runtime_env, metadata=metadata))
        self.add(RayJob(submission_id=submission_id, type="SUBMISSION", status="PENDING",
                        entrypoint=entrypoint, start_time=int(time.time() * 1000), metadata=metadata))

    def dashboard_link(self, job_id: str) -> str:
        return f"{self.dashboard_url}/#/jobs/{job_id}"


@asynccontextmanager
async def in_process(settings: Settings, gateway: MemoryGateway | None = None,
                     token: str | None = API_TOKEN) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on `create_app(settings, gateway)` in this process (ASGITransport):
    the API's own validation and services, no server and no Ray."""
    app = create_app(settings, gateway if gateway is not None else MemoryGateway())
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test", headers=headers) as client:
        yield client


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
