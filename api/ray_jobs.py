"""Everything the API says to Ray, through `ray.job_submission.JobSubmissionClient`.

Ray is the only source of truth: a Leviathan job is a Ray job whose metadata
carries the run folder and the spec's name, so a restarted API (or one on
another host) recovers every job from `list_jobs` / `get_job_info`.

A job's code reaches the cluster one of two ways (README): `working_dir` set
(default: this checkout) uploads the project as the job's `runtime_env`
working_dir, minus `.git`, virtual environments and data (Ray caps uploads at
100 MiB); `working_dir` empty means the package is installed on every node.
"""

from __future__ import annotations

import re
import secrets
import shlex
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

import requests
from fastapi import HTTPException
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient, JobType

from api.settings import Settings
from jobs.spec import JobSpec
from leviathan import storage

# Job metadata keys (Ray metadata values are strings).
META_RUN_DIR = "leviathan_run_dir"
META_RUN_NAME = "leviathan_run_name"
META_SPEC_NAME = "leviathan_spec_name"
META_MODULES = "leviathan_modules"
META_MEMBERS_PER_MODULE = "leviathan_members_per_module"
META_PHASE1_STEPS = "leviathan_phase1_steps"
META_PHASE2_STEPS = "leviathan_phase2_steps"

SUBMISSION_PREFIX = "leviathan-"
TERMINAL = {JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED}

# gitwildmatch patterns relative to working_dir (Ray also honours .gitignore and
# .rayignore). Hidden entries are .git, .venv and tool caches: none is code.
# ".?*", not ".*": Ray matches the root itself as "." and ".*" would exclude everything.
UPLOAD_EXCLUDES = [".?*", "/venv", "/runs", "/data", "*.egg-info", "__pycache__", "/benchmarks/results"]

# Ids the Jobs server can address: Ray builds `/api/jobs/{id}` without quoting,
# so anything else cannot name a job there either.
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$")
_STATUS_CODE = re.compile(r"status code (\d{3})")


class RayGateway:
    """Holds one JobSubmissionClient and rebuilds it when the Ray token changes.

    Building a client costs two HTTP round trips (Ray's version checks), so it is
    shared by all requests; the client itself is stateless between calls
    (`requests.request` per call), hence safe across threads.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._client: JobSubmissionClient | None = None
        self._client_token: str | None = None
        # Serialises "count running jobs, then submit" so two requests cannot
        # both take the last free slot.
        self.submit_lock = threading.Lock()

    def client(self) -> JobSubmissionClient:
        token = self.settings.ray_token()
        with self._lock:
            if self._client is None or token != self._client_token:
                headers = {"Authorization": f"Bearer {token}"} if token else None
                self._client = JobSubmissionClient(self.settings.ray_address, headers=headers)
                self._client_token = token
            return self._client

    def dashboard_link(self, job_id: str) -> str:
        return f"{self.settings.public_dashboard_url}/#/jobs/{job_id}"


@contextmanager
def ray_errors(job_id: str | None = None) -> Iterator[None]:
    """Translate the Jobs client's exceptions into HTTP errors.

    The client raises RuntimeError("Request failed with status code N: ...") for
    any non-200 answer, ConnectionError when the server is down, and
    AuthenticationError when the cluster refuses the token the API passed on.
    """
    try:
        yield
    except HTTPException:
        raise
    except AuthenticationError as e:
        raise HTTPException(502, f"the Ray cluster refused the API's Ray token: {e}") from None
    except (ConnectionError, requests.RequestException) as e:
        raise HTTPException(503, f"Ray Jobs server unreachable: {e}") from None
    except RuntimeError as e:
        m = _STATUS_CODE.search(str(e))
        if job_id is not None and m and m.group(1) == "404":
            raise HTTPException(404, f"no job {job_id!r}") from None
        if "try again later" in str(e):  # e.g. the head's job agent is still starting
            raise HTTPException(
                503, f"Ray Jobs server not ready: {e}", headers={"Retry-After": "5"}
            ) from None
        raise HTTPException(502, f"Ray Jobs server error: {e}") from None


def get_submission_job(client: JobSubmissionClient, job_id: str) -> JobDetails:
    """`get_job_info` for a submitted job, 404 for anything else (drivers started
    with `ray.init()` are not jobs this API manages)."""
    if not _JOB_ID.match(job_id):
        raise HTTPException(404, f"no job {job_id!r}")
    with ray_errors(job_id):
        info = client.get_job_info(job_id)
    if info.type != JobType.SUBMISSION or not info.submission_id:
        raise HTTPException(404, f"no job {job_id!r}")
    return info


def list_submission_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    """All submitted jobs, newest first."""
    with ray_errors():
        jobs = client.list_jobs()
    jobs = [j for j in jobs if j.type == JobType.SUBMISSION and j.submission_id]
    jobs.sort(key=lambda j: (j.start_time or 0, j.submission_id), reverse=True)
    return jobs


def is_leviathan(info: JobDetails) -> bool:
    return bool(info.metadata and META_RUN_DIR in info.metadata)


def count_active_leviathan_jobs(client: JobSubmissionClient) -> int:
    return sum(
        1 for j in list_submission_jobs(client) if is_leviathan(j) and j.status not in TERMINAL
    )


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
    spec_path = storage.join(spec.run_dir, "spec.json")
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
            "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
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
