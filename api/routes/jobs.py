"""`/v1/jobs`: submit typed training specs as Ray jobs and watch them.

Each handler asks Ray (the Jobs server) for the truth on every call; the run
folder's metrics.jsonl adds the ensemble's progress. Nothing is stored here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from ray.job_submission import JobSubmissionClient

from api import ray_jobs
from api.deps import GatewayDep, SettingsDep, require_api_token
from api.metrics import MetricsReader, MetricsSummary, read_records, read_run_spec
from api.ray_jobs import RayGateway, RayJob, ray_errors
from api.runs import RunRef, data_root, manifest_allowed, run_of, storage_root, under_root
from api.schemas import (
    ErrorBody,
    JobDetail,
    JobList,
    JobStatusName,
    JobSubmitted,
    JobSummary,
    MemberProgress,
    MetricsPage,
    StopResult,
)
from api.settings import Settings
from api.strict_json import StrictJSONRoute
from jobs.spec import JobSpec, SpecError, check_manifest
from leviathan.config import BYTE_VOCAB_SIZE
from leviathan.run.folder import RunFolder
from leviathan.run.manifest import Manifest
from leviathan.run.storage import is_uri, normalize, remove_dir

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(require_api_token)],
    route_class=StrictJSONRoute,
    responses={
        401: {"model": ErrorBody, "description": "Missing or wrong API token."},
        502: {"model": ErrorBody, "description": "The Ray Jobs server answered with an error."},
        503: {"model": ErrorBody, "description": "The Ray Jobs server is unreachable or not ready (retry)."},
    },
)
_NOT_FOUND = {404: {"model": ErrorBody, "description": "No such job."}}


# ----------------------------------------------------------------------------- validation


def _field_error(loc: tuple[str, ...], msg: str, value: Any, kind: str = "value_error") -> dict:
    """One error in FastAPI's validation shape, `loc` naming the spec field."""
    return {"type": kind, "loc": ("body", *loc), "msg": msg, "input": value}


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
        return _field_error(("storage",), f"must be {root} or an absolute path under it", spec.storage)
    return norm


def _tracking_errors(spec: JobSpec, settings: Settings) -> list[dict]:
    """A local MLflow store (`file:`, `sqlite:`) is written by the job: it must lie under
    the storage root like the run folder."""
    local = spec.tracking.local_store
    if local is None:
        return []
    root = normalize(settings.storage)
    norm = os.path.normpath(local)
    if is_uri(root) or not os.path.isabs(norm) or not (norm + "/").startswith(root.rstrip("/") + "/"):
        return [_field_error(("tracking", "mlflow_uri"), f"a local store must be an absolute path under {root}",
                             spec.tracking.mlflow_uri)]
    return []


def _member_size_errors(spec: JobSpec, manifest: Manifest | None, limit: int) -> list[dict]:
    """`ensemble.members.<i>` over the per-member parameter limit, counted at the data's
    vocabulary (the byte vocabulary while the built-in corpus is not prepared yet)."""
    vocab = manifest.vocab_size if manifest else BYTE_VOCAB_SIZE
    return [
        _field_error(
            ("ensemble", "members", i),
            f"Input should have at most {limit} parameters (this API's max_member_params), has {n}",
            n, "less_than_equal",
        )
        for i, n in enumerate(spec.ensemble.member_params(vocab, spec.block_size))
        if n > limit
    ]


def validate_for_submission(spec: JobSpec, settings: Settings) -> JobSpec:
    """Everything short of Ray: storage root, data root, the API's limits, the data manifest.

    Raises RequestValidationError (422, FastAPI's shape, `loc` naming the field).
    Returns the spec with its storage resolved to an absolute root. Reads at most
    the manifest, and only one under the data root.
    """
    errors: list[dict] = []
    storage = _check_storage(spec, settings)
    if isinstance(storage, dict):
        errors.append(storage)
    errors.extend(_tracking_errors(spec, settings))
    if not manifest_allowed(spec.data.manifest, settings):
        errors.append(_field_error(
            ("data", "manifest"),
            f"must be 'builtin' or an absolute path under the data root {data_root(settings)}",
            spec.data.manifest,
        ))
    limits = [
        (("ensemble", "modules"), spec.ensemble.modules, settings.max_modules, "max_modules"),
        (("training", "phase1_steps"), spec.training.phase1_steps, settings.max_steps, "max_steps"),
        (("training", "phase2_steps"), spec.training.phase2_steps, settings.max_steps, "max_steps"),
        (("training", "seq_len"), spec.training.seq_len, settings.max_seq_len, "max_seq_len"),
    ]
    for loc, value, limit, name in limits:
        if value > limit:
            errors.append(_field_error(
                loc, f"Input should be less than or equal to {limit} (this API's {name})",
                value, "less_than_equal",
            ))
    if not errors:
        try:
            manifest = check_manifest(spec)
        except SpecError as e:
            field, _, msg = str(e).partition(": ")
            loc = tuple(field.split(".")) if msg and " " not in field else ("data", "manifest")
            errors.append(_field_error(loc, msg or str(e), None))
        else:
            errors.extend(_member_size_errors(spec, manifest, settings.max_member_params))
    if errors:
        raise RequestValidationError(errors)
    return spec.model_copy(update={"storage": storage})


# ----------------------------------------------------------------------------- views


async def _off_loop(run_dir: str, fn, *args):
    """Run a run-folder read: inline for a local file (a stat and a short read),
    in a worker thread for a remote URI, whose round trips would stall the loop."""
    if is_uri(run_dir):
        return await run_in_threadpool(fn, *args)
    return fn(*args)


def _summary_fields(job: RayJob, run: RunRef | None, gateway: RayGateway) -> dict[str, Any]:
    return {
        "job_id": job.submission_id,
        "status": job.status,
        "message": job.message,
        "leviathan": run is not None,
        "spec_name": run.spec_name if run else None,
        "run_name": run.run_name if run else None,
        "run_dir": run.run_dir if run else None,
        "entrypoint": job.entrypoint,
        "start_time": ray_jobs.ms_to_datetime(job.start_time),
        "end_time": ray_jobs.ms_to_datetime(job.end_time),
        "dashboard_url": gateway.dashboard_link(job.submission_id),
    }


def _with_spec_shape(run: RunRef, spec: dict[str, Any] | None) -> RunRef:
    """Fill what a `ray job submit` run's metadata lacks from the spec.json it wrote."""
    if run.modules is not None or spec is None:
        return run
    ensemble, training = spec.get("ensemble") or {}, spec.get("training") or {}
    numbers = {k: v if isinstance(v, int) else None for k, v in (
        ("modules", ensemble.get("modules")), ("members_per_module", ensemble.get("members_per_module")),
        ("phase1_steps", training.get("phase1_steps")), ("phase2_steps", training.get("phase2_steps")))}
    return RunRef(**{**run.__dict__, **numbers})


async def _detail(job: RayJob, gateway: RayGateway, reader: MetricsReader, root: str) -> JobDetail:
    run = run_of(job, root)
    fields = _summary_fields(job, run, gateway)
    fields.update(error_type=job.error_type, driver_exit_code=job.driver_exit_code)
    if run is None:
        return JobDetail(**fields)
    summary: MetricsSummary | None = None
    if run.run_dir is not None:
        if run.modules is None:
            run = _with_spec_shape(run, await _off_loop(run.run_dir, read_run_spec, run.run_dir))
        summary = await _off_loop(run.run_dir, reader.summary, run.run_dir)
    # Every member is listed from the start; figures appear as metrics arrive.
    members: dict[str, dict] = {
        f"m{i}.{j}": {"member": f"m{i}.{j}", "module": i}
        for i in range(run.modules or 0) for j in range(run.members_per_module or 0)
    }
    phase1_steps, phase2_steps = run.phase1_steps, run.phase2_steps
    if summary is not None:
        for name, m in summary.members.items():
            members[name] = {**members.get(name, {}), **{k: v for k, v in m.items() if v is not None}}
        fields.update(
            phase=summary.phase,
            step=summary.step,
            metrics_records=summary.records,
            metrics_updated_at=summary.updated_at,
            tokens_per_s=summary.progress.tokens_per_s or None,
        )
        if phase1_steps is not None and phase2_steps is not None:
            fields["eta_s"] = summary.progress.eta_s(phase1_steps, phase2_steps)
    fields.update(
        phase1_steps=run.phase1_steps,
        phase2_steps=run.phase2_steps,
        members=[MemberProgress(**m) for m in members.values()],
    )
    return JobDetail(**fields)


# ----------------------------------------------------------------------------- routes


def _new_run_folder(spec: JobSpec) -> tuple[JobSpec, str]:
    """A fresh `<name>-<6 hex>` run folder holding spec.json: (run spec, spec.json path)."""
    for _ in range(5):
        run_spec = spec.model_copy(update={"name": ray_jobs.new_run_name(spec.name)})
        try:
            return run_spec, ray_jobs.write_spec(run_spec)
        except FileExistsError:
            continue
        except (OSError, ValueError) as e:
            raise HTTPException(500, f"cannot write {run_spec.run_dir}/spec.json: {e}") from None
    raise HTTPException(500, f"no free run folder name under {spec.storage} after 5 tries")


def _submit_to_ray(gateway: RayGateway, settings: Settings, run_spec: JobSpec, spec_name: str,
                   spec_path: str) -> str:
    """Submit through Ray's client (it uploads the working_dir package first)."""
    submission_id = ray_jobs.SUBMISSION_PREFIX + run_spec.name
    with ray_errors():
        gateway.sdk().submit_job(
            entrypoint=ray_jobs.entrypoint(settings, spec_path),
            submission_id=submission_id,
            runtime_env=ray_jobs.runtime_env(settings),
            metadata=ray_jobs.job_metadata(run_spec, spec_name),
        )
    return submission_id


@router.post(
    "",
    status_code=201,
    response_model=JobSubmitted,
    summary="Submit a training job (a JobSpec) to Ray",
    responses={
        413: {"description": "The body is larger than LEVIATHAN_MAX_BODY_BYTES (not read)."},
        500: {"model": ErrorBody, "description": "The API cannot write to its storage."},
        429: {"model": ErrorBody, "description": "max_concurrent_jobs reached."},
    },
)
async def submit_job(spec: JobSpec, settings: SettingsDep, gateway: GatewayDep) -> JobSubmitted:
    chose_storage = "storage" in spec.model_fields_set
    spec = await run_in_threadpool(validate_for_submission, spec, settings)
    try:
        await run_in_threadpool(ray_jobs.ensure_storage, spec.storage)
    except (OSError, ValueError) as e:
        if chose_storage:
            raise RequestValidationError([_field_error(("storage",), f"cannot create it: {e}", spec.storage)])
        raise HTTPException(500, f"the API cannot write to its storage {spec.storage}: {e}") from None
    root = storage_root(settings)
    async with gateway.submit_lock:
        jobs = await gateway.jobs()
        active = sum(1 for j in jobs if j.status not in ray_jobs.TERMINAL and run_of(j, root) is not None)
        if active >= settings.max_concurrent_jobs:
            raise HTTPException(
                429,
                f"{active} Leviathan jobs are pending or running; this API allows "
                f"{settings.max_concurrent_jobs} at once (max_concurrent_jobs)",
            )
        run_spec, spec_path = await run_in_threadpool(_new_run_folder, spec)
        try:
            submission_id = await run_in_threadpool(
                _submit_to_ray, gateway, settings, run_spec, spec.name, spec_path
            )
        except HTTPException:
            with contextlib.suppress(OSError):  # nothing ran: leave no empty run behind
                remove_dir(run_spec.run_dir)
            raise
    log.info("submitted %s (%s)", submission_id, run_spec.run_dir)
    return JobSubmitted(
        job_id=submission_id,
        run_name=run_spec.name,
        run_dir=run_spec.run_dir,
        status="PENDING",
        dashboard_url=gateway.dashboard_link(submission_id),
    )


@router.get("", response_model=JobList, summary="List jobs (newest first)")
async def list_jobs(
    settings: SettingsDep,
    gateway: GatewayDep,
    status: JobStatusName | None = Query(None, description="Only jobs in this Ray status."),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
) -> JobList:
    jobs = await gateway.jobs()
    if status is not None:
        jobs = [j for j in jobs if j.status == status]
    page = jobs[offset : offset + limit]
    root = storage_root(settings)
    return JobList(
        jobs=[JobSummary(**_summary_fields(j, run_of(j, root), gateway)) for j in page],
        total=len(jobs),
        limit=limit,
        offset=offset,
    )


@router.get("/{job_id}", response_model=JobDetail, responses=_NOT_FOUND,
            summary="Ray status, phase and per-member progress")
async def get_job(job_id: str, request: Request) -> JobDetail:
    # The route clients poll: its services come straight from `app.state` rather than
    # as three injected dependencies, which FastAPI would solve again on every call.
    state = request.app.state
    job = await state.ray.job(job_id)
    return await _detail(job, state.ray, state.metrics, storage_root(state.settings))


@router.get("/{job_id}/metrics", response_model=MetricsPage,
            responses={**_NOT_FOUND, 500: {"model": ErrorBody, "description": "The run folder cannot be read."}},
            summary="Records of the run's metrics.jsonl")
async def get_metrics(
    job_id: str,
    settings: SettingsDep,
    gateway: GatewayDep,
    since_step: int | None = Query(None, description="Only records with step > since_step."),
) -> MetricsPage:
    job = await gateway.job(job_id)
    run = run_of(job, storage_root(settings))
    if run is None or run.run_dir is None:
        return MetricsPage(job_id=job_id, since_step=since_step, records=[])
    try:
        records = await run_in_threadpool(read_records, run.run_dir, since_step)
    except (OSError, ValueError) as e:
        raise HTTPException(500, f"cannot read {RunFolder(run.run_dir).metrics}: {e}") from None
    steps = [r["step"] for r in records if r.get("step") is not None]
    return MetricsPage(
        job_id=job_id,
        run_dir=run.run_dir,
        since_step=since_step,
        records=records,
        last_step=max(steps) if steps else since_step,
    )


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


async def _follow(client: JobSubmissionClient, job_id: str, skip: int) -> AsyncIterator[str]:
    try:
        async for chunk in _skip_lines(client.tail_job_logs(job_id), skip):
            yield chunk
    except Exception as e:  # the status line is sent already: end the stream, log why
        log.warning("log stream of %s ended: %s", job_id, e)


@router.get(
    "/{job_id}/logs",
    summary="The job's driver log (tail, or follow as a stream)",
    responses={
        200: {
            "description": "The log as text/plain (streamed with follow=true).",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **_NOT_FOUND,
    },
)
async def get_logs(
    job_id: str,
    gateway: GatewayDep,
    tail: int | None = Query(None, ge=0, le=1_000_000, description="Only the last N lines."),
    follow: bool = Query(False, description="Stream the log as text/plain until the job ends."),
):
    await gateway.job(job_id)
    if follow:
        # Following is a websocket: Ray's client does it. The stream starts at the
        # log's first line: skip all but the last `tail`.
        skip = 0
        if tail is not None:
            skip = max(0, (await gateway.logs(job_id)).count("\n") - tail)
        client = await run_in_threadpool(gateway.sdk)
        return StreamingResponse(_follow(client, job_id, skip), media_type="text/plain")
    text = await gateway.logs(job_id)
    if tail is not None:
        lines = text.splitlines(keepends=True)
        text = "".join(lines[max(0, len(lines) - tail) :])
    return PlainTextResponse(text)


@router.post("/{job_id}/stop", response_model=StopResult, responses=_NOT_FOUND,
             summary="Ask Ray to stop the job (it ends as STOPPED)")
async def stop_job(job_id: str, gateway: GatewayDep) -> StopResult:
    await gateway.job(job_id)
    stopped = await gateway.stop(job_id)
    job = await gateway.fresh_job(job_id)  # the status after the stop, not a shared earlier answer
    return StopResult(job_id=job_id, stopped=stopped, status=job.status)
