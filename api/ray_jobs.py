"""Everything the API says to Ray, through Ray's Jobs API.

Status, lists, logs and stops go to the Jobs REST API (`/api/jobs/...`) through
one long-lived async HTTP client (an `aiohttp.ClientSession`, the client Ray's own
tools use): its connections stay open, so a status call costs Ray one request on
a warm connection and the API no thread. aiohttp rather than httpx because on these
machines httpx spent about 1.3 ms of CPU per request against aiohttp's 0.3 ms, and a
proxied status call pays that on top of FastAPI's own work and Ray's. Ray's
`JobSubmissionClient` is kept for what REST alone cannot do: submitting a job
(it uploads the `working_dir` package first) and following a log (a websocket).

Ray is the only source of truth: a Leviathan job is a Ray job whose metadata
carries the run folder and the spec's name, so a restarted API (or one on
another host) recovers every job from Ray's job list.

A job's code reaches the cluster one of two ways (README): `working_dir` set
(default: this checkout) uploads the project as the job's `runtime_env`
working_dir, minus `.git`, virtual environments and data (Ray caps uploads at
100 MiB); `working_dir` empty means the package is installed on every node.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shlex
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

import aiohttp
import requests
from fastapi import HTTPException
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from api.settings import RayTokenSource, Settings
from api.strict_json import shorten
from jobs.spec import JobSpec
from leviathan.run import storage
from leviathan.run.env import RAY_TRAIN_STATE_TRACKING
from leviathan.run.folder import RunFolder

# Job metadata keys (Ray metadata values are strings).
META_RUN_DIR = "leviathan_run_dir"
META_RUN_NAME = "leviathan_run_name"
META_SPEC_NAME = "leviathan_spec_name"
META_MODULES = "leviathan_modules"
META_MEMBERS_PER_MODULE = "leviathan_members_per_module"
META_PHASE1_STEPS = "leviathan_phase1_steps"
META_PHASE2_STEPS = "leviathan_phase2_steps"

SUBMISSION_PREFIX = "leviathan-"
TERMINAL = {"STOPPED", "SUCCEEDED", "FAILED"}

# gitwildmatch patterns relative to working_dir (Ray also honours .gitignore and
# .rayignore). Hidden entries are .git, .venv and tool caches: none is code.
# ".?*", not ".*": Ray matches the root itself as "." and ".*" would exclude everything.
UPLOAD_EXCLUDES = [".?*", "/venv", "/runs", "/data", "*.egg-info", "__pycache__", "/benchmarks/results"]

# Ids the Jobs server can address: Ray builds `/api/jobs/{id}` without quoting,
# so anything else cannot name a job there either.
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$")
_STATUS_CODE = re.compile(r"status code (\d{3})")


class RayRefusedToken(HTTPException):
    """502: the cluster refused the Ray token the API passed on (never the token itself)."""

    def __init__(self, status: int | None = None) -> None:
        code = f" (HTTP {status})" if status else ""
        super().__init__(502, f"the Ray cluster refused the API's Ray token{code}")


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


class RayGateway:
    """The API's link to one Ray cluster: the REST client, the cluster token, and a
    JobSubmissionClient for submissions and log streams.

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
        """One REST call; Ray's answers become HTTP errors a client can act on."""
        if self._http is None:
            raise HTTPException(503, "the API is not started (no Ray client)")
        try:
            async with self._http.request(
                method, self.settings.ray_address + path, headers=self._headers()
            ) as r:
                status, body = r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise HTTPException(503, f"Ray Jobs server unreachable: {type(e).__name__} {shorten(str(e), 160)}",
                                headers={"Retry-After": "5"}) from None
        if status == 200:
            try:
                return json.loads(body)
            except ValueError:
                raise HTTPException(502, "Ray Jobs server error: an answer that is not JSON") from None
        if status in (401, 403):
            raise RayRefusedToken(status)
        if status == 404 and job_id is not None:
            raise HTTPException(404, f"no job {shorten(job_id)!r}")
        text = body.decode("utf-8", errors="replace")
        if "try again later" in text:  # e.g. the head's job agent is still starting
            raise HTTPException(503, f"Ray Jobs server not ready: {shorten(text, 200)}",
                                headers={"Retry-After": "5"})
        raise HTTPException(502, f"Ray Jobs server error: HTTP {status}: {shorten(text, 200)}")

    async def version(self) -> dict[str, Any]:
        return await self._call("GET", "/api/version")

    async def fresh_job(self, job_id: str) -> RayJob:
        """A submitted job's record, asked of Ray now; 404 for anything else (drivers
        started with `ray.init()` are not jobs this API manages)."""
        if not _JOB_ID.match(job_id):
            raise HTTPException(404, f"no job {shorten(job_id)!r}")
        job = RayJob.from_json(await self._call("GET", f"/api/jobs/{job_id}", job_id))
        if not job.is_submission:
            raise HTTPException(404, f"no job {shorten(job_id)!r}")
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

    def sdk(self) -> JobSubmissionClient:
        """Ray's client, rebuilt when the token changes. Blocking (building one costs
        two round trips): call it from a worker thread."""
        token = self.token.get()
        with self._sdk_lock:
            if self._sdk is None or token != self._sdk_token:
                headers = {"Authorization": f"Bearer {token}"} if token else None
                with ray_errors():
                    self._sdk = JobSubmissionClient(self.settings.ray_address, headers=headers)
                self._sdk_token = token
            return self._sdk

    def dashboard_link(self, job_id: str) -> str:
        return f"{self.settings.public_dashboard_url}/#/jobs/{job_id}"


@contextmanager
def ray_errors(job_id: str | None = None) -> Iterator[None]:
    """Translate JobSubmissionClient exceptions into HTTP errors.

    The client raises RuntimeError("Request failed with status code N: ...") for
    any non-200 answer, ConnectionError when the server is down, and
    AuthenticationError when the cluster refuses the token the API passed on.
    """
    try:
        yield
    except HTTPException:
        raise
    except AuthenticationError:
        raise RayRefusedToken() from None
    except (ConnectionError, requests.RequestException) as e:
        raise HTTPException(503, f"Ray Jobs server unreachable: {type(e).__name__}") from None
    except RuntimeError as e:
        m = _STATUS_CODE.search(str(e))
        if job_id is not None and m and m.group(1) == "404":
            raise HTTPException(404, f"no job {shorten(job_id)!r}") from None
        if "try again later" in str(e):
            raise HTTPException(
                503, f"Ray Jobs server not ready: {shorten(str(e), 200)}", headers={"Retry-After": "5"}
            ) from None
        raise HTTPException(502, f"Ray Jobs server error: {shorten(str(e), 200)}") from None


def ms_to_datetime(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


# ----------------------------------------------------------------------------- submission


def new_run_name(spec_name: str) -> str:
    """`<name>-<6 hex>`: unique run folders for specs that share a name; fits the
    spec's 63-character name pattern."""
    return f"{spec_name[:56]}-{secrets.token_hex(3)}"


def ensure_storage(location: str) -> None:
    """Create the storage root (or the folder under it a spec names) if needed."""
    storage.make_dir(location)


def write_spec(spec: JobSpec) -> str:
    """Write `<run_dir>/spec.json`, the one copy the job reads; returns its path or URI.

    The run folder must not exist yet (FileExistsError): a collision would mix two
    runs' outputs. The storage folder above it must exist (`ensure_storage`).
    """
    storage.make_dir(spec.run_dir, new=True)
    spec_path = RunFolder(spec.run_dir).spec
    storage.write_text(spec_path, spec.to_json() + "\n")
    return spec_path


def entrypoint(settings: Settings, spec_path: str) -> str:
    """The only command this API ever runs: the training entry on a typed spec."""
    python = " ".join(shlex.quote(p) for p in shlex.split(settings.job_python))
    return f"{python} -m jobs.train --spec {shlex.quote(spec_path)}"


def runtime_env(settings: Settings) -> dict:
    env: dict = {
        "env_vars": {
            # The dashboard's Train view needs state tracking in the job's environment.
            RAY_TRAIN_STATE_TRACKING: "1",
            # Log lines reach `ray job logs` / the log stream as they are printed.
            "PYTHONUNBUFFERED": "1",
        }
    }
    if settings.working_dir:
        env["working_dir"] = settings.working_dir
        env["excludes"] = list(UPLOAD_EXCLUDES)
    return env


def job_metadata(spec: JobSpec, spec_name: str) -> dict[str, str]:
    return {
        META_RUN_DIR: spec.run_dir,
        META_RUN_NAME: spec.name,
        META_SPEC_NAME: spec_name,
        META_MODULES: str(spec.ensemble.modules),
        META_MEMBERS_PER_MODULE: str(spec.ensemble.members_per_module),
        META_PHASE1_STEPS: str(spec.training.phase1_steps),
        META_PHASE2_STEPS: str(spec.training.phase2_steps),
    }
