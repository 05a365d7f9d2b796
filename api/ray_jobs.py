"""Everything the API says to Ray, through Ray's Jobs API.

Status, lists, logs and stops go to the Jobs REST API (`/api/jobs/...`), the
nodes' resources (for admission) to the state API (`/api/v0/nodes`), through
one long-lived async HTTP client (an `aiohttp.ClientSession`, the client Ray's own
tools use): its connections stay open, so a status call costs Ray one request on
a warm connection and the API no thread. aiohttp rather than httpx because on these
machines httpx spent about 1.3 ms of CPU per request against aiohttp's 0.3 ms, and a
proxied status call pays that on top of FastAPI's own work and Ray's. Ray's
`JobSubmissionClient` is kept for what REST alone cannot do: submitting a job
(it uploads the `working_dir` package first) and following a log (a websocket).

Ray is the only source of truth. Every failure leaves this module as an
`api.errors.ApiError` (never an HTTP exception): the app's one handler maps it.
What a Leviathan job is (its metadata, entrypoint, upload) is
`api.services.jobs`'s business, not this client's.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Protocol

import aiohttp
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from api.errors import NotFound, NotStarted, RayFailed, RayRefusedToken, RayUnavailable
from api.settings import RayTokenSource, Settings
from api.strict_json import shorten

TERMINAL = {"STOPPED", "SUCCEEDED", "FAILED"}

# Ids the Jobs server can address: Ray builds `/api/jobs/{id}` without quoting,
# so anything else cannot name a job there either.
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$")
# Nodes asked of the state API at once (its own default is 100).
_MAX_NODES = 10_000


def _no_job(job_id: str) -> NotFound:
    return NotFound(f"no job {shorten(job_id)!r}")


@dataclass(frozen=True)
class RayJob:
    """The fields of Ray's job record (`GET /api/jobs/{id}`) the API uses."""

    submission_id: str | None
    type: str  # SUBMISSION | DRIVER
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    entrypoint: str
    message: str | None = None
    error_type: str | None = None
    start_time: int | None = None  # ms since the epoch
    end_time: int | None = None
    driver_exit_code: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RayJob":
        return cls(
            submission_id=d.get("submission_id"),
            type=d.get("type") or "",
            status=d.get("status") or "PENDING",
            entrypoint=d.get("entrypoint") or "",
            message=d.get("message"),
            error_type=d.get("error_type"),
            start_time=d.get("start_time"),
            end_time=d.get("end_time"),
            driver_exit_code=d.get("driver_exit_code"),
            metadata=d.get("metadata") or {},
        )

    @property
    def is_submission(self) -> bool:
        return self.type == "SUBMISSION" and bool(self.submission_id)


class JobsGateway(Protocol):
    """What the services need of a Ray cluster's Jobs API. `RayGateway` is the real
    one; tests use an in-memory double. Every failure is an `api.errors.ApiError`."""

    submit_lock: asyncio.Lock

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def version(self) -> dict[str, Any]: ...

    async def job(self, job_id: str) -> RayJob:
        """The job's record, possibly shared with concurrent callers (NotFound if none)."""
        ...

    async def fresh_job(self, job_id: str) -> RayJob:
        """The job's record, asked of Ray now (NotFound if none)."""
        ...

    async def jobs(self) -> list[RayJob]:
        """All submitted jobs, newest first."""
        ...

    async def logs(self, job_id: str) -> str: ...

    async def follow_logs(self, job_id: str) -> AsyncIterator[str]:
        """The job's log from its first line, as it is written, until the job ends.
        Awaiting it connects (failing as an ApiError); iterating it streams."""
        ...

    async def stop(self, job_id: str) -> bool: ...

    async def node_resources(self) -> list[dict[str, float]]:
        """Each alive node's total resources ({"CPU": 4.0, "GPU": 1.0, ...}): what
        `ray.cluster_resources()` sums, per node, so a worker's shape can be fitted."""
        ...

    def submit(self, *, entrypoint: str, submission_id: str, runtime_env: dict[str, Any],
               metadata: dict[str, str]) -> None:
        """Submit a job (blocking: it may upload the working_dir first)."""
        ...

    def dashboard_link(self, job_id: str) -> str: ...


class RayGateway:
    """The API's link to one Ray cluster: the REST client, the cluster token, and a
    JobSubmissionClient for submissions and log streams. A `JobsGateway`.

    `start()` / `aclose()` run in the app's lifespan: the async client belongs to
    the server's event loop.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.token = RayTokenSource(settings)
        self._http: aiohttp.ClientSession | None = None
        self._in_flight: dict[str, asyncio.Future[RayJob]] = {}
        self._sdk_lock = threading.Lock()
        self._sdk: JobSubmissionClient | None = None
        self._sdk_token: str | None = None
        # Serialises "count running jobs, then submit" so two requests cannot
        # both take the last free slot.
        self.submit_lock = asyncio.Lock()

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30, connect=5),
            connector=aiohttp.TCPConnector(limit=64),
        )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _headers(self) -> dict[str, str]:
        token = self.token.get()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _call(self, method: str, path: str, job_id: str | None = None) -> Any:
        """One REST call; Ray's answers become project errors a client can act on."""
        if self._http is None:
            raise NotStarted("the API is not started (no Ray client)")
        try:
            async with self._http.request(
                method, self.settings.ray_address + path, headers=self._headers()
            ) as r:
                status, body = r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise RayUnavailable(
                f"Ray Jobs server unreachable: {type(e).__name__} {shorten(str(e), 160)}"
            ) from None
        if status == 200:
            try:
                return json.loads(body)
            except ValueError:
                raise RayFailed("Ray Jobs server error: an answer that is not JSON") from None
        if status in (401, 403):
            raise RayRefusedToken(status)
        if status == 404 and job_id is not None:
            raise _no_job(job_id)
        text = body.decode("utf-8", errors="replace")
        if "try again later" in text:  # e.g. the head's job agent is still starting
            raise RayUnavailable(f"Ray Jobs server not ready: {shorten(text, 200)}")
        raise RayFailed(f"Ray Jobs server error: HTTP {status}: {shorten(text, 200)}")

    async def version(self) -> dict[str, Any]:
        return await self._call("GET", "/api/version")

    async def fresh_job(self, job_id: str) -> RayJob:
        """A submitted job's record, asked of Ray now; NotFound for anything else (drivers
        started with `ray.init()` are not jobs this API manages)."""
        if not _JOB_ID.match(job_id):
            raise _no_job(job_id)
        job = RayJob.from_json(await self._call("GET", f"/api/jobs/{job_id}", job_id))
        if not job.is_submission:
            raise _no_job(job_id)
        return job

    async def job(self, job_id: str) -> RayJob:
        """`fresh_job`, with calls for one job sharing one Ray request and its answer
        for `status_cache_s` seconds (LEVIATHAN_STATUS_CACHE_S, at most 1, default 0.5).

        A status poll that arrives while Ray is answering the same question, or
        within status_cache_s of its answer, takes that answer. Ray stays the only
        source of truth: an answer is at most one Ray round trip plus
        status_cache_s old, errors are never kept, and a stop through this API
        drops the job's answer. Under many pollers of one job (dashboards, the
        CLI's progress) this turns N identical Ray requests into about one per
        status_cache_s.
        """
        pending = self._in_flight.get(job_id)
        if pending is None:
            pending = asyncio.ensure_future(self.fresh_job(job_id))
            self._in_flight[job_id] = pending
            pending.add_done_callback(lambda done: self._forget(job_id, done))
        # shield: a caller that disconnects must not cancel the others' request.
        return await asyncio.shield(pending)

    def _forget(self, job_id: str, done: asyncio.Future) -> None:
        """Drop a finished request now (an error, or no cache) or once status_cache_s has passed."""
        failed = done.cancelled() or done.exception() is not None  # retrieved, even when every caller has gone
        if failed or self.settings.status_cache_s == 0:
            self._drop(job_id, done)
        else:
            asyncio.get_running_loop().call_later(self.settings.status_cache_s, self._drop, job_id, done)

    def _drop(self, job_id: str, done: asyncio.Future | None = None) -> None:
        """Forget the job's request (only `done`, when given: a newer one stays)."""
        if done is None or self._in_flight.get(job_id) is done:
            self._in_flight.pop(job_id, None)

    async def jobs(self) -> list[RayJob]:
        """All submitted jobs, newest first."""
        jobs = [RayJob.from_json(d) for d in await self._call("GET", "/api/jobs/")]
        jobs = [j for j in jobs if j.is_submission]
        jobs.sort(key=lambda j: (j.start_time or 0, j.submission_id), reverse=True)
        return jobs

    async def logs(self, job_id: str) -> str:
        return (await self._call("GET", f"/api/jobs/{job_id}/logs", job_id))["logs"]

    async def stop(self, job_id: str) -> bool:
        stopped = bool((await self._call("POST", f"/api/jobs/{job_id}/stop", job_id))["stopped"])
        self._drop(job_id)  # polls after the stop ask Ray again
        return stopped

    async def node_resources(self) -> list[dict[str, float]]:
        """Ray's state API (`GET /api/v0/nodes`, the dashboard's answer to `ray list
        nodes`): every ALIVE node's `resources_total`."""
        body = await self._call("GET", f"/api/v0/nodes?limit={_MAX_NODES}&detail=false")
        try:
            rows = body["data"]["result"]["result"]
            return [
                {k: float(v) for k, v in (row.get("resources_total") or {}).items()}
                for row in rows if row.get("state") == "ALIVE"
            ]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise RayFailed("Ray state API error: an unexpected answer to GET /api/v0/nodes") from None

    def _client(self) -> JobSubmissionClient:
        """Ray's client, rebuilt when the token changes. Blocking (building one costs
        two round trips): call it from a worker thread."""
        token = self.token.get()
        with self._sdk_lock:
            if self._sdk is None or token != self._sdk_token:
                headers = {"Authorization": f"Bearer {token}"} if token else None
                with _client_errors():
                    self._sdk = JobSubmissionClient(self.settings.ray_address, headers=headers)
                self._sdk_token = token
            return self._sdk

    def submit(self, *, entrypoint: str, submission_id: str, runtime_env: dict[str, Any],
               metadata: dict[str, str]) -> None:
        """Submit through Ray's client (it uploads the working_dir package first). Blocking."""
        client = self._client()
        with _client_errors():
            client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                              runtime_env=runtime_env, metadata=metadata)

    async def follow_logs(self, job_id: str) -> AsyncIterator[str]:
        """Following is a websocket: Ray's client does it. The client is built before the
        answer starts, so an unreachable cluster is still an error status."""
        client = await asyncio.to_thread(self._client)
        return client.tail_job_logs(job_id)

    def dashboard_link(self, job_id: str) -> str:
        return f"{self.settings.public_dashboard_url}/#/jobs/{job_id}"


@contextmanager
def _client_errors() -> Iterator[None]:
    """JobSubmissionClient's exceptions as project errors.

    The client raises RuntimeError("Request failed with status code N: ...") for
    any non-200 answer, ConnectionError when the server is down, and
    AuthenticationError when the cluster refuses the token the API passed on.
    """
    try:
        yield
    except AuthenticationError:
        raise RayRefusedToken() from None
    except (ConnectionError, requests.RequestException) as e:
        raise RayUnavailable(f"Ray Jobs server unreachable: {type(e).__name__}") from None
    except RuntimeError as e:
        if "try again later" in str(e):
            raise RayUnavailable(f"Ray Jobs server not ready: {shorten(str(e), 200)}") from None
        raise RayFailed(f"Ray Jobs server error: {shorten(str(e), 200)}") from None


def ms_to_datetime(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None
