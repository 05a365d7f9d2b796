"""`/v1/jobs`: submit typed training specs as Ray jobs and watch them.

Each handler asks Ray (the Jobs server) for the truth on every call; the run
folder's metrics.jsonl adds the ensemble's progress. Nothing is stored here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from ray.job_submission import JobDetails, JobSubmissionClient

from api import ray_jobs
from api.deps import get_gateway, get_metrics_reader, get_ray_client, get_settings, require_api_token
from api.metrics import MetricsReader, read_records
from api.ray_jobs import RayGateway, ray_errors
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
from jobs.spec import JobSpec, SpecError, check_manifest
from leviathan.config import BYTE_VOCAB_SIZE
from leviathan.storage import is_uri, normalize, remove_dir

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(require_api_token)],
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
    root = normalize(settings.storage)
    if "storage" not in spec.model_fields_set:
        return root
    given = spec.storage
    if is_uri(given):
        norm = given.rstrip("/")
        ok = (norm == root or norm.startswith(root + "/")) and "/../" not in norm + "/"
    else:
        norm = os.path.normpath(os.path.expanduser(given))
        ok = os.path.isabs(norm) and (norm == root or norm.startswith(root.rstrip("/") + "/"))
    if not ok:
        return _field_error(("storage",), f"must be {root} or an absolute path under it", given)
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


def _member_size_errors(spec: JobSpec, manifest: dict | None, limit: int) -> list[dict]:
    """`ensemble.members.<i>` over the per-member parameter limit, counted at the data's
    vocabulary (the byte vocabulary while the built-in corpus is not prepared yet)."""
    vocab = manifest["vocab_size"] if manifest else BYTE_VOCAB_SIZE
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
    """Everything short of Ray: storage root, the API's limits, the data manifest.

    Raises RequestValidationError (422, FastAPI's shape, `loc` naming the field).
    Returns the spec with its storage resolved to an absolute root.
    """
    errors: list[dict] = []
    storage = _check_storage(spec, settings)
    if isinstance(storage, dict):
        errors.append(storage)
    errors.extend(_tracking_errors(spec, settings))
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


def _summary_fields(info: JobDetails, gateway: RayGateway) -> dict[str, Any]:
    meta = info.metadata or {}
    lev = ray_jobs.is_leviathan(info)
    return {
        "job_id": info.submission_id,
        "status": info.status.value,
        "message": info.message,
        "leviathan": lev,
        "spec_name": meta.get(ray_jobs.META_SPEC_NAME) if lev else None,
        "run_name": meta.get(ray_jobs.META_RUN_NAME) if lev else None,
        "run_dir": meta.get(ray_jobs.META_RUN_DIR) if lev else None,
        "entrypoint": info.entrypoint,
        "start_time": ray_jobs.ms_to_datetime(info.start_time),
        "end_time": ray_jobs.ms_to_datetime(info.end_time),
        "dashboard_url": gateway.dashboard_link(info.submission_id),
    }


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _detail(info: JobDetails, gateway: RayGateway, reader: MetricsReader) -> JobDetail:
    fields = _summary_fields(info, gateway)
    fields.update(error_type=info.error_type, driver_exit_code=info.driver_exit_code)
    if not fields["leviathan"]:
        return JobDetail(**fields)
    meta = info.metadata or {}
    modules = _int_or_none(meta.get(ray_jobs.META_MODULES)) or 0
    per_module = _int_or_none(meta.get(ray_jobs.META_MEMBERS_PER_MODULE)) or 0
    # Every member is listed from the start; figures appear as metrics arrive.
    members: dict[str, dict] = {
        f"m{i}.{j}": {"member": f"m{i}.{j}", "module": i}
        for i in range(modules) for j in range(per_module)
    }
    phase1_steps = _int_or_none(meta.get(ray_jobs.META_PHASE1_STEPS))
    phase2_steps = _int_or_none(meta.get(ray_jobs.META_PHASE2_STEPS))
    summary = reader.summary(fields["run_dir"])
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
        phase1_steps=phase1_steps,
        phase2_steps=phase2_steps,
        members=[MemberProgress(**m) for m in members.values()],
    )
    return JobDetail(**fields)


# ----------------------------------------------------------------------------- routes


@router.post(
    "",
    status_code=201,
    response_model=JobSubmitted,
    summary="Submit a training job (a JobSpec) to Ray",
    responses={
        400: {"model": ErrorBody, "description": "The body cannot be read (not UTF-8 text)."},
        500: {"model": ErrorBody, "description": "The API cannot write to its storage."},
        429: {"model": ErrorBody, "description": "max_concurrent_jobs reached."},
    },
)
def submit_job(
    spec: JobSpec,
    settings: Settings = Depends(get_settings),
    gateway: RayGateway = Depends(get_gateway),
    client: JobSubmissionClient = Depends(get_ray_client),
) -> JobSubmitted:
    chose_storage = "storage" in spec.model_fields_set
    spec = validate_for_submission(spec, settings)
    try:
        ray_jobs.ensure_storage(spec.storage)
    except (OSError, ValueError) as e:
        if chose_storage:
            raise RequestValidationError([_field_error(("storage",), f"cannot create it: {e}", spec.storage)])
        raise HTTPException(500, f"the API cannot write to its storage {spec.storage}: {e}") from None
    with gateway.submit_lock:
        active = ray_jobs.count_active_leviathan_jobs(client)
        if active >= settings.max_concurrent_jobs:
            raise HTTPException(
                429,
                f"{active} Leviathan jobs are pending or running; this API allows "
                f"{settings.max_concurrent_jobs} at once (max_concurrent_jobs)",
            )
        for _ in range(5):
            run_spec = spec.model_copy(update={"name": ray_jobs.new_run_name(spec.name)})
            try:
                spec_path = ray_jobs.write_spec(run_spec)
                break
            except FileExistsError:
                continue
            except (OSError, ValueError) as e:
                raise HTTPException(500, f"cannot write {run_spec.run_dir}/spec.json: {e}") from None
        else:
            raise HTTPException(500, f"no free run folder name under {spec.storage} after 5 tries")
        submission_id = ray_jobs.SUBMISSION_PREFIX + run_spec.name
        try:
            with ray_errors():
                client.submit_job(
                    entrypoint=ray_jobs.entrypoint(settings, spec_path),
                    submission_id=submission_id,
                    runtime_env=ray_jobs.runtime_env(settings),
                    metadata=ray_jobs.job_metadata(run_spec, spec.name),
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
def list_jobs(
    status: JobStatusName | None = Query(None, description="Only jobs in this Ray status."),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
    gateway: RayGateway = Depends(get_gateway),
    client: JobSubmissionClient = Depends(get_ray_client),
) -> JobList:
    jobs = ray_jobs.list_submission_jobs(client)
    if status is not None:
        jobs = [j for j in jobs if j.status.value == status]
    page = jobs[offset : offset + limit]
    return JobList(
        jobs=[JobSummary(**_summary_fields(j, gateway)) for j in page],
        total=len(jobs),
        limit=limit,
        offset=offset,
    )


@router.get("/{job_id}", response_model=JobDetail, responses=_NOT_FOUND,
            summary="Ray status, phase and per-member progress")
def get_job(
    job_id: str,
    gateway: RayGateway = Depends(get_gateway),
    client: JobSubmissionClient = Depends(get_ray_client),
    reader: MetricsReader = Depends(get_metrics_reader),
) -> JobDetail:
    info = ray_jobs.get_submission_job(client, job_id)
    return _detail(info, gateway, reader)


@router.get("/{job_id}/metrics", response_model=MetricsPage,
            responses={**_NOT_FOUND, 500: {"model": ErrorBody, "description": "The run folder cannot be read."}},
            summary="Records of the run's metrics.jsonl")
def get_metrics(
    job_id: str,
    since_step: int | None = Query(None, description="Only records with step > since_step."),
    client: JobSubmissionClient = Depends(get_ray_client),
) -> MetricsPage:
    info = ray_jobs.get_submission_job(client, job_id)
    if not ray_jobs.is_leviathan(info):
        return MetricsPage(job_id=job_id, since_step=since_step, records=[])
    run_dir = info.metadata[ray_jobs.META_RUN_DIR]
    try:
        records = read_records(run_dir, since_step)
    except (OSError, ValueError) as e:
        raise HTTPException(500, f"cannot read {run_dir}/metrics.jsonl: {e}") from None
    steps = [r["step"] for r in records if r.get("step") is not None]
    return MetricsPage(
        job_id=job_id,
        run_dir=run_dir,
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
    tail: int | None = Query(None, ge=0, le=1_000_000, description="Only the last N lines."),
    follow: bool = Query(False, description="Stream the log as text/plain until the job ends."),
    client: JobSubmissionClient = Depends(get_ray_client),
):
    await run_in_threadpool(ray_jobs.get_submission_job, client, job_id)

    def fetch() -> str:
        with ray_errors(job_id):
            return client.get_job_logs(job_id)

    if follow:
        # The stream starts at the log's first line: skip all but the last `tail`.
        skip = 0
        if tail is not None:
            skip = max(0, (await run_in_threadpool(fetch)).count("\n") - tail)
        return StreamingResponse(_follow(client, job_id, skip), media_type="text/plain")
    text = await run_in_threadpool(fetch)
    if tail is not None:
        lines = text.splitlines(keepends=True)
        text = "".join(lines[max(0, len(lines) - tail) :])
    return PlainTextResponse(text)


@router.post("/{job_id}/stop", response_model=StopResult, responses=_NOT_FOUND,
             summary="Ask Ray to stop the job (it ends as STOPPED)")
def stop_job(job_id: str, client: JobSubmissionClient = Depends(get_ray_client)) -> StopResult:
    ray_jobs.get_submission_job(client, job_id)
    with ray_errors(job_id):
        stopped = client.stop_job(job_id)
        status = client.get_job_status(job_id)
    return StopResult(job_id=job_id, stopped=stopped, status=status.value)
