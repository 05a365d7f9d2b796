"""The API's job policy: what may be submitted, what the cluster admits (job slots,
capacity), how a run folder is created and submitted as a Ray job, how a stopped
or failed run resumes, and what a job's details say.

Free of FastAPI: every failure is an `api.errors.ApiError` (422s as `InvalidField`
naming the spec field), which the app's one exception handler answers. The
routes parse a request, call one function here, and shape the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shlex
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from api.auth import META_OWNER, Principal, visible_to
from api.errors import ApiError, Conflict, InvalidField, NotFound, StorageError, TooManyJobs, field_error
from api.metrics import MetricsReader, MetricsSummary, read_records, read_run_spec
from api.ray_jobs import TERMINAL, JobsGateway, RayJob, ms_to_datetime
from api.schemas import JobDetail, JobSubmitted, JobSummary, MemberProgress, MetricsPage
from api.services.run_resources import write_owner
from api.services.runs import RunRef, data_root, job_metadata, manifest_allowed, run_of, storage_root, under_root
from api.settings import Settings
from api.strict_json import shorten
from jobs.spec import RUN_NAME_PATTERN, JobSpec, SpecError, check_manifest
from leviathan.config import BYTE_VOCAB_SIZE
from leviathan.run import storage
from leviathan.run.capacity import ALLOW_UNSCHEDULABLE_ENV, capacity, describe, short_resource, worker_shape
from leviathan.run.env import RAY_TRAIN_STATE_TRACKING
from leviathan.run.folder import METRICS_FILE, SPEC_FILE, RunFolder
from leviathan.run.manifest import Manifest

log = logging.getLogger(__name__)

T = TypeVar("T")

SUBMISSION_PREFIX = "leviathan-"

# gitwildmatch patterns relative to working_dir (Ray also honours .gitignore and
# .rayignore). Hidden entries are .git, .venv and tool caches: none is code.
# ".?*", not ".*": Ray matches the root itself as "." and ".*" would exclude everything.
UPLOAD_EXCLUDES = [".?*", "/venv", "/runs", "/data", "*.egg-info", "__pycache__", "/benchmarks/results"]


# ----------------------------------------------------------------------------- validation


def _check_storage(spec: JobSpec, settings: Settings) -> str | dict:
    """The storage the run uses: the API's root, or a folder under it the spec names.

    Runs may not write outside the operator's storage root (the API writes
    spec.json there and the job writes everything else).
    """
    root = storage_root(settings)
    if "storage" not in spec.model_fields_set:
        return root
    norm = under_root(spec.storage, root)
    if norm is None:
        return field_error(("storage",), f"must be {root} or an absolute path under it", spec.storage)
    return norm


def tracking_allowed(uri: str, prefixes: list[str]) -> bool:
    """Whether `uri` is one of the operator's tracking servers: equal to a prefix, or
    below it at a path boundary (so `http://mlflow:5000` admits `http://mlflow:5000/x`
    but neither `http://mlflow:5000.evil` nor `http://mlflow:5000@169.254.169.254`)."""
    for prefix in prefixes:
        base = prefix.rstrip("/")
        if uri == prefix or uri == base or uri.startswith(base + "/"):
            return "/../" not in uri[len(base):] + "/"
    return False


def _tracking_errors(spec: JobSpec, settings: Settings) -> list[dict]:
    """Where rank 0 may send tracking data: a local MLflow store (`file:`, `sqlite:`),
    written by the job, must lie under the storage root like the run folder; any other
    URI must start with one of the API's `tracking_uris`, so a spec cannot make the
    cluster call an address of its choosing (a cloud metadata service, say)."""
    uri = spec.tracking.mlflow_uri
    if uri is None:
        return []
    local = spec.tracking.local_store
    root = storage.normalize(settings.storage)
    if local is None:
        if tracking_allowed(uri, settings.tracking_uris):
            return []
        allowed = ", ".join(settings.tracking_uris) or "none configured (LEVIATHAN_TRACKING_URIS)"
        return [field_error(("tracking", "mlflow_uri"),
                            f"must be a local store under {root} or start with one of this API's tracking "
                            f"servers: {allowed}", uri)]
    norm = os.path.normpath(local)
    if storage.is_uri(root) or not os.path.isabs(norm) or not (norm + "/").startswith(root.rstrip("/") + "/"):
        return [field_error(("tracking", "mlflow_uri"), f"a local store must be an absolute path under {root}",
                            uri)]
    return []


def _surrogate_errors(value: Any, loc: tuple = ()) -> list[dict]:
    """Strings holding lone surrogates (`"\\ud800"` in the JSON): not Unicode text, so no
    file, path or Ray call can take them. Pydantic refuses them in plain `str` fields
    but lets them through inside lists (`data.domains`); each is a 422 at its field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return [field_error(loc, "Input should be Unicode text (a lone surrogate is not)", value,
                                "string_unicode")]
        return []
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _surrogate_errors(v, (*loc, k))]
    if isinstance(value, (list, tuple)):
        return [e for i, v in enumerate(value) for e in _surrogate_errors(v, (*loc, i))]
    return []


def _member_size_errors(spec: JobSpec, vocab_size: int | None, limit: int) -> list[dict]:
    """`ensemble.members.<i>` over the per-member parameter limit, counted at the data's
    vocabulary (the byte vocabulary while the built-in corpus is not prepared yet)."""
    return [
        field_error(
            ("ensemble", "members", i),
            f"Input should have at most {limit} parameters (this API's max_member_params), has {n}",
            n, "less_than_equal",
        )
        for i, n in enumerate(spec.ensemble.member_params(vocab_size or BYTE_VOCAB_SIZE, spec.block_size))
        if n > limit
    ]


def _limit_errors(spec: JobSpec, settings: Settings) -> list[dict]:
    limits = [
        (("ensemble", "modules"), spec.ensemble.modules, settings.max_modules, "max_modules"),
        (("training", "phase1_steps"), spec.training.phase1_steps, settings.max_steps, "max_steps"),
        (("training", "phase2_steps"), spec.training.phase2_steps, settings.max_steps, "max_steps"),
        (("training", "seq_len"), spec.training.seq_len, settings.max_seq_len, "max_seq_len"),
    ]
    return [
        field_error(loc, f"Input should be less than or equal to {limit} (this API's {name})", value,
                    "less_than_equal")
        for loc, value, limit, name in limits
        if value > limit
    ]


def _vocab_size(manifest: Manifest | None) -> int | None:
    """The manifest's vocabulary size (None while the built-in corpus is not prepared)."""
    return None if manifest is None else manifest.vocab_size


def validate_for_submission(spec: JobSpec, settings: Settings) -> JobSpec:
    """Everything short of Ray: storage root, data root, the API's limits, the data manifest.

    Raises InvalidField (422, FastAPI's shape, `loc` naming the field). Returns the
    spec with its storage resolved to an absolute root. Reads at most the manifest,
    and only one under the data root.
    """
    surrogates = _surrogate_errors(spec.model_dump())
    if surrogates:  # first: a path holding one cannot even be stat'ed
        raise InvalidField(surrogates)
    errors: list[dict] = []
    resolved = _check_storage(spec, settings)
    if isinstance(resolved, dict):
        errors.append(resolved)
    errors.extend(_tracking_errors(spec, settings))
    if not manifest_allowed(spec.data.manifest, settings):
        errors.append(field_error(
            ("data", "manifest"),
            f"must be 'builtin' or an absolute path under the data root {data_root(settings)}",
            spec.data.manifest,
        ))
    errors.extend(_limit_errors(spec, settings))
    if not errors:
        try:
            manifest = check_manifest(spec)
        except SpecError as e:
            field, _, msg = str(e).partition(": ")
            loc = tuple(field.split(".")) if msg and " " not in field else ("data", "manifest")
            errors.append(field_error(loc, msg or str(e), None))
        else:
            errors.extend(_member_size_errors(spec, _vocab_size(manifest), settings.max_member_params))
    if errors:
        raise InvalidField(errors)
    return spec.model_copy(update={"storage": resolved})


# ----------------------------------------------------------------------------- the run folder


def new_run_name(spec_name: str) -> str:
    """`<name>-<6 hex>`: unique run folders for specs that share a name; fits the
    spec's 63-character name pattern."""
    return f"{spec_name[:56]}-{secrets.token_hex(3)}"


def write_spec(spec: JobSpec) -> str:
    """Write `<run_dir>/spec.json`, the one copy the job reads; returns its path or URI.

    The run folder must not exist yet (FileExistsError): a collision would mix two
    runs' outputs. The storage folder above it must exist.
    """
    storage.make_dir(spec.run_dir, new=True)
    spec_path = RunFolder(spec.run_dir).spec
    storage.write_text(spec_path, spec.to_json() + "\n")
    return spec_path


def new_run_folder(spec: JobSpec, owner: str) -> tuple[JobSpec, str]:
    """A fresh `<name>-<6 hex>` run folder holding spec.json and owner.json (the run stays
    its owner's after Ray forgets the job): (run spec, spec.json path)."""
    for _ in range(5):
        run_spec = spec.model_copy(update={"name": new_run_name(spec.name)})
        try:
            spec_path = write_spec(run_spec)
            write_owner(run_spec.run_dir, owner)
            return run_spec, spec_path
        except FileExistsError:
            continue
        except (OSError, ValueError) as e:
            raise StorageError(f"cannot write {run_spec.run_dir}/{SPEC_FILE}: {e}") from None
    raise StorageError(f"no free run folder name under {spec.storage} after 5 tries")


def ensure_storage(spec: JobSpec, chose_storage: bool) -> None:
    """Create the storage root (or the folder under it the spec names) if needed: a
    folder the caller chose is their field's error, the API's own root is the API's."""
    try:
        storage.make_dir(spec.storage)
    except (OSError, ValueError) as e:
        if chose_storage:
            raise InvalidField([field_error(("storage",), f"cannot create it: {e}", spec.storage)]) from None
        raise StorageError(f"the API cannot write to its storage {spec.storage}: {e}") from None


# ----------------------------------------------------------------------------- submission


def entrypoint(settings: Settings, spec_path: str) -> str:
    """The training entry on a typed spec: the command this API runs for a new run."""
    return f"{_python(settings)} -m jobs.train --spec {shlex.quote(spec_path)}"


def resume_entrypoint(settings: Settings, name: str, root: str) -> str:
    """The training entry resuming run `name` under the storage root, with its own spec.json."""
    return f"{_python(settings)} -m jobs.train --resume {shlex.quote(name)} --storage {shlex.quote(root)}"


def _python(settings: Settings) -> str:
    return " ".join(shlex.quote(p) for p in shlex.split(settings.job_python))


def runtime_env(settings: Settings) -> dict:
    """A job's code reaches the cluster one of two ways (README): `working_dir` set
    (default: this checkout) uploads the project, minus `.git`, virtual environments
    and data (Ray caps uploads at 100 MiB); empty means the package is installed on
    every node."""
    env: dict = {
        "env_vars": {
            # The dashboard's Train view needs state tracking in the job's environment.
            RAY_TRAIN_STATE_TRACKING: "1",
            # Log lines reach `ray job logs` / the log stream as they are printed.
            "PYTHONUNBUFFERED": "1",
        }
    }
    if settings.allow_unschedulable:  # the driver then waits for an autoscaler's nodes too
        env["env_vars"][ALLOW_UNSCHEDULABLE_ENV] = "1"
    if settings.working_dir:
        env["working_dir"] = settings.working_dir
        env["excludes"] = list(UPLOAD_EXCLUDES)
    return env


# ----------------------------------------------------------------------------- admission


def _active_jobs(jobs: list[RayJob], root: str) -> list[RayJob]:
    """Leviathan jobs (under this API's storage root) that are PENDING or RUNNING."""
    return [j for j in jobs if j.status not in TERMINAL and run_of(j, root) is not None]


def check_job_slots(jobs: list[RayJob], root: str, settings: Settings) -> None:
    """429 with Retry-After once max_concurrent_jobs Leviathan jobs are pending or running."""
    active = len(_active_jobs(jobs, root))
    if active >= settings.max_concurrent_jobs:
        raise TooManyJobs(
            f"{active} Leviathan jobs are pending or running; this API allows "
            f"{settings.max_concurrent_jobs} at once (max_concurrent_jobs); retry when one ends"
        )


async def check_schedulable(spec: JobSpec, settings: Settings, gateway: JobsGateway) -> None:
    """422 when the cluster's nodes cannot hold the job's workers, instead of a job that
    Ray Train keeps waiting for resources that never come.

    Each worker needs its CPUs (and GPU) on one node (`leviathan.run.capacity`), compared
    with the alive nodes' totals: resources other jobs hold free up, missing ones do not.
    An autoscaling cluster can add nodes the count cannot see: its operator sets
    `allow_unschedulable` (LEVIATHAN_ALLOW_UNSCHEDULABLE=1) and the check is skipped."""
    if settings.allow_unschedulable:
        return
    r = spec.resources
    need = worker_shape(r.cpus_per_worker, r.use_gpu, r.gpus_per_worker)
    nodes = await gateway.node_resources()
    cap = capacity(need, nodes)
    workers = spec.num_workers
    if cap.fits(workers):
        return
    short = short_resource(need, nodes)
    if short == "CPU":
        loc, value = ("resources", "cpus_per_worker"), r.cpus_per_worker
        why = f"no node has {need['CPU']:g} CPU"
    elif short is not None:
        loc, value = ("resources", "use_gpu"), r.use_gpu
        why = f"no node has {need[short]:g} {short}"
    else:
        loc, value = ("resources", "workers"), workers
        why = f"the nodes hold only {cap.slots} such worker(s)"
    largest = max(nodes, key=lambda n: capacity(need, [n]).slots, default={})
    raise InvalidField([field_error(
        loc,
        f"cannot be scheduled: {workers} worker(s) x ({describe(need)}) each, but {why}; the cluster has "
        f"{describe(cap.totals)} in total over {cap.nodes} node(s) (largest: "
        f"{describe({k: largest.get(k, 0.0) for k in need})}). To run it anyway on an autoscaling "
        "cluster, which adds nodes on demand, start the API with LEVIATHAN_ALLOW_UNSCHEDULABLE=1",
        value,
    )])


async def _admit(spec: JobSpec, settings: Settings, gateway: JobsGateway, jobs: list[RayJob]) -> None:
    """Inside the submit lock: the job slots (429), then the cluster's capacity (422).

    Slots come first: they are answered from the job list alone, so a request at the
    limit costs the cluster no further question."""
    check_job_slots(jobs, storage_root(settings), settings)
    await check_schedulable(spec, settings, gateway)


def _submit_job(run_spec: JobSpec, settings: Settings, gateway: JobsGateway, *, entry: str,
                submission_id: str, spec_name: str, owner: Principal) -> None:
    """Submit to Ray (blocking: it may upload the working_dir first). The owner's user
    name travels in the metadata with the run's."""
    gateway.submit(entrypoint=entry, submission_id=submission_id, runtime_env=runtime_env(settings),
                   metadata={**job_metadata(run_spec, spec_name), META_OWNER: owner.user})


def _submitted(run_spec: JobSpec, submission_id: str, gateway: JobsGateway) -> JobSubmitted:
    return JobSubmitted(
        job_id=submission_id,
        run_name=run_spec.name,
        run_dir=run_spec.run_dir,
        status="PENDING",
        dashboard_url=gateway.dashboard_link(submission_id),
    )


async def submit(spec: JobSpec, settings: Settings, gateway: JobsGateway, owner: Principal) -> JobSubmitted:
    """Validate, create the run folder, submit it to Ray; a refused or failed submission
    leaves no folder.

    Ray is the only record of a job: the run folder, the spec's name and the owner's
    user name travel in the job's metadata, so a restarted API recovers every job, and
    who may see it, from Ray's job list.
    """
    chose_storage = "storage" in spec.model_fields_set
    spec = await asyncio.to_thread(validate_for_submission, spec, settings)
    await asyncio.to_thread(ensure_storage, spec, chose_storage)
    async with gateway.submit_lock:
        await _admit(spec, settings, gateway, await gateway.jobs())  # refused before a run folder exists
        run_spec, spec_path = await asyncio.to_thread(new_run_folder, spec, owner.user)
        submission_id = SUBMISSION_PREFIX + run_spec.name
        try:
            await asyncio.to_thread(_submit_job, run_spec, settings, gateway, entry=entrypoint(settings, spec_path),
                                    submission_id=submission_id, spec_name=spec.name, owner=owner)
        except ApiError:
            with contextlib.suppress(OSError):  # nothing ran: leave no empty run behind
                storage.remove_dir(run_spec.run_dir)
            raise
    log.info("submitted %s (%s)", submission_id, run_spec.run_dir)
    return _submitted(run_spec, submission_id, gateway)


# ----------------------------------------------------------------------------- resume

_RUN_NAME = re.compile(RUN_NAME_PATTERN)


def _resumable_spec(name: str, settings: Settings) -> JobSpec:
    """The spec.json of run `name` under the storage root, validated as a submission,
    with its storage set to where it lies. NotFound / Conflict (finished) / InvalidField."""
    root = storage_root(settings)
    folder = RunFolder.of(root, name)
    try:
        text = storage.read_text(folder.spec)
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot read {folder.spec}: {e}") from None
    if text is None:
        raise NotFound(f"no run {name!r} under the storage root")
    if folder.is_finished():
        raise Conflict(f"run {name!r} already finished; nothing to resume (its report and final/ stand)")
    try:
        spec = JobSpec.model_validate_json(text)
    except ValueError as e:
        raise Conflict(f"run {name!r} has an invalid {SPEC_FILE}: {str(e).splitlines()[0]}") from None
    return validate_for_submission(spec.model_copy(update={"storage": root}), settings)


def _jobs_of_run(jobs: list[RayJob], root: str, run_dir: str) -> list[RayJob]:
    return [j for j in jobs if (ref := run_of(j, root)) is not None and ref.run_dir == run_dir]


async def resume(name: str, settings: Settings, gateway: JobsGateway, owner: Principal) -> JobSubmitted:
    """Continue a failed or stopped run from its latest checkpoint, as a new Ray job
    running `jobs.train --resume NAME` on the run folder's own spec.json.

    404: no such run, or one whose earlier jobs `owner` may not see (the same answer,
    so a run's existence is told only to its owner and admins); 409: it finished, or
    a job of this run is still pending or running; then the same 429 / 422 admission
    as a new job. The new job belongs to `owner`."""
    if not _RUN_NAME.match(name):
        raise NotFound(f"no run {name[:80]!r}")
    root = storage_root(settings)
    run_dir = RunFolder.of(root, name).root
    from api.services.run_resources import may_see, read_owner

    recorded = await asyncio.to_thread(read_owner, RunFolder.of(root, name))  # owner.json outlives Ray's job list
    if recorded is not None and not may_see(owner, recorded):
        raise NotFound(f"no run {name!r} under the storage root")
    if any(not visible_to(owner, j.metadata) for j in _jobs_of_run(await gateway.jobs(), root, run_dir)):
        raise NotFound(f"no run {name!r} under the storage root")
    spec = await asyncio.to_thread(_resumable_spec, name, settings)
    async with gateway.submit_lock:
        jobs = await gateway.jobs()
        for job in _jobs_of_run(jobs, root, run_dir):
            if job.status not in TERMINAL:
                raise Conflict(f"run {name!r} is still being written by job {job.submission_id} ({job.status}); "
                               "stop it first or wait for it to end")
        await _admit(spec, settings, gateway, jobs)
        submission_id = f"{SUBMISSION_PREFIX}{name}-resume-{secrets.token_hex(3)}"
        await asyncio.to_thread(_submit_job, spec, settings, gateway, entry=resume_entrypoint(settings, name, root),
                                submission_id=submission_id, spec_name=name, owner=owner)
    log.info("submitted %s resuming %s", submission_id, spec.run_dir)
    return _submitted(spec, submission_id, gateway)


# ----------------------------------------------------------------------------- ownership


async def visible_job(gateway: JobsGateway, job_id: str, principal: Principal) -> RayJob:
    """The job's record if `principal` may see it; otherwise the very NotFound an
    unknown id gets, so a job's existence is not told to anyone but its owner."""
    job = await gateway.job(job_id)
    if not visible_to(principal, job.metadata):
        raise NotFound(f"no job {shorten(job_id)!r}")
    return job


async def visible_jobs(gateway: JobsGateway, principal: Principal) -> list[RayJob]:
    """The jobs `principal` may see, newest first."""
    return [j for j in await gateway.jobs() if visible_to(principal, j.metadata)]


# ----------------------------------------------------------------------------- views


async def _off_loop(run_dir: str, fn: Callable[..., T], *args: Any) -> T:
    """Run a run-folder read: inline for a local file (a stat and a short read),
    in a worker thread for a remote URI, whose round trips would stall the loop."""
    if storage.is_uri(run_dir):
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _summary_fields(job: RayJob, run: RunRef | None, gateway: JobsGateway) -> dict[str, Any]:
    return {
        "job_id": job.submission_id,
        "status": job.status,
        "message": job.message,
        "leviathan": run is not None,
        "spec_name": run.spec_name if run else None,
        "run_name": run.run_name if run else None,
        "run_dir": run.run_dir if run else None,
        "entrypoint": job.entrypoint,
        "start_time": ms_to_datetime(job.start_time),
        "end_time": ms_to_datetime(job.end_time),
        "dashboard_url": gateway.dashboard_link(job.submission_id),
    }


def summary(job: RayJob, gateway: JobsGateway, root: str) -> JobSummary:
    return JobSummary(**_summary_fields(job, run_of(job, root), gateway))


def _with_spec_shape(run: RunRef, spec: dict[str, Any] | None) -> RunRef:
    """Fill what a `ray job submit` run's metadata lacks from the spec.json it wrote."""
    if run.modules is not None or spec is None:
        return run
    ensemble, training = spec.get("ensemble") or {}, spec.get("training") or {}
    numbers = {k: v if isinstance(v, int) else None for k, v in (
        ("modules", ensemble.get("modules")), ("members_per_module", ensemble.get("members_per_module")),
        ("phase1_steps", training.get("phase1_steps")), ("phase2_steps", training.get("phase2_steps")))}
    return RunRef(**{**run.__dict__, **numbers})


async def detail(job: RayJob, gateway: JobsGateway, reader: MetricsReader, root: str) -> JobDetail:
    """Ray's fields, plus the run's phase, step and per-member figures from its metrics log."""
    run = run_of(job, root)
    fields = _summary_fields(job, run, gateway)
    fields.update(error_type=job.error_type, driver_exit_code=job.driver_exit_code)
    if run is None:
        return JobDetail(**fields)
    metrics: MetricsSummary | None = None
    if run.run_dir is not None:
        if run.modules is None:
            run = _with_spec_shape(run, await _off_loop(run.run_dir, read_run_spec, run.run_dir))
        metrics = await _off_loop(run.run_dir, reader.summary, run.run_dir)
    # Every member is listed from the start; figures appear as metrics arrive.
    members: dict[str, dict] = {
        f"m{i}.{j}": {"member": f"m{i}.{j}", "module": i}
        for i in range(run.modules or 0) for j in range(run.members_per_module or 0)
    }
    if metrics is not None:
        for name, m in metrics.members.items():
            members[name] = {**members.get(name, {}), **{k: v for k, v in m.items() if v is not None}}
        fields.update(
            phase=metrics.phase,
            step=metrics.step,
            metrics_records=metrics.records,
            metrics_updated_at=metrics.updated_at,
            tokens_per_s=metrics.progress.tokens_per_s or None,
        )
        if run.phase1_steps is not None and run.phase2_steps is not None:
            fields["eta_s"] = metrics.progress.eta_s(run.phase1_steps, run.phase2_steps)
    fields.update(
        phase1_steps=run.phase1_steps,
        phase2_steps=run.phase2_steps,
        members=[MemberProgress(**m) for m in members.values()],
    )
    return JobDetail(**fields)


async def metrics_page(job: RayJob, root: str, since_step: int | None) -> MetricsPage:
    """The records of the job's metrics log after `since_step` (none for a run the API may not read)."""
    job_id = job.submission_id or ""
    run = run_of(job, root)
    if run is None or run.run_dir is None:
        return MetricsPage(job_id=job_id, since_step=since_step, records=[])
    try:
        records = await asyncio.to_thread(read_records, run.run_dir, since_step)
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot read {run.run_dir}/{METRICS_FILE}: {e}") from None
    steps = [r["step"] for r in records if r.get("step") is not None]
    return MetricsPage(
        job_id=job_id,
        run_dir=run.run_dir,
        since_step=since_step,
        records=records,
        last_step=max(steps) if steps else since_step,
    )


# ----------------------------------------------------------------------------- logs


def last_lines(text: str, n: int | None) -> str:
    """The last n lines of `text` (all of it when n is None)."""
    if n is None:
        return text
    lines = text.splitlines(keepends=True)
    return "".join(lines[max(0, len(lines) - n) :])


async def _skip_lines(chunks: AsyncIterator[str], n: int) -> AsyncIterator[str]:
    """Drop the first n complete lines of a chunked text stream."""
    async for chunk in chunks:
        while n > 0 and chunk:
            i = chunk.find("\n")
            if i < 0:
                chunk = ""
                break
            chunk = chunk[i + 1 :]
            n -= 1
        if chunk:
            yield chunk


async def follow_logs(gateway: JobsGateway, job_id: str, tail: int | None) -> AsyncIterator[str]:
    """The job's log as it is written, from its last `tail` lines (all when None).

    The stream starts at the log's first line: all but the last `tail` are skipped.
    An error once the answer has started cannot change its status: it ends the
    stream and is logged.
    """
    skip = 0
    if tail is not None:
        skip = max(0, (await gateway.logs(job_id)).count("\n") - tail)
    chunks = await gateway.follow_logs(job_id)

    async def stream() -> AsyncIterator[str]:
        try:
            async for chunk in _skip_lines(chunks, skip):
                yield chunk
        except Exception as e:  # the status line is sent already: end the stream, log why
            log.warning("log stream of %s ended: %s", job_id, e)

    return stream()


async def stop(gateway: JobsGateway, job_id: str, principal: Principal) -> tuple[bool, str]:
    """Ask Ray to stop a job `principal` may see: (whether Ray stopped it, its status after the stop)."""
    await visible_job(gateway, job_id, principal)
    stopped = await gateway.stop(job_id)
    job = await gateway.fresh_job(job_id)  # the status after the stop, not a shared earlier answer
    return stopped, job.status
