"""`/v1/jobs`: submit typed training specs as Ray jobs and watch them.

Each handler parses the request, calls `api.services.jobs`, and shapes the
answer; the policy lives in the service. Ray is asked for the truth on every
call; nothing is stored here.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse, StreamingResponse

from api.routes import RAY_ERRORS
from api.deps import GatewayDep, MetricsDep, PrincipalDep, SettingsDep, StorageRootDep, SubmitterDep, require_api_token
from api.schemas import ErrorBody, JobDetail, JobList, JobStatusName, JobSubmitted, MetricsPage, StopResult
from api.services import jobs as service
from api.strict_json import StrictJSONRoute
from jobs.spec import JobSpec

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(require_api_token)],
    route_class=StrictJSONRoute,
    responses=RAY_ERRORS,
)
_NOT_FOUND = {404: {"model": ErrorBody, "description": "No such job, or one of another user's."}}
_FORBIDDEN = {403: {"model": ErrorBody, "description": "The token's role is 'read'."}}


@router.post(
    "",
    status_code=201,
    response_model=JobSubmitted,
    summary="Submit a training job (a JobSpec) to Ray",
    responses={
        413: {"description": "The body is larger than LEVIATHAN_MAX_BODY_BYTES (not read)."},
        500: {"model": ErrorBody, "description": "The API cannot write to its storage."},
        429: {"model": ErrorBody, "description": "max_concurrent_jobs reached (Retry-After says when to ask again)."},
        **_FORBIDDEN,
    },
)
async def submit_job(spec: JobSpec, settings: SettingsDep, gateway: GatewayDep, owner: SubmitterDep) -> JobSubmitted:
    return await service.submit(spec, settings, gateway, owner)


@router.get("", response_model=JobList, summary="List the caller's jobs (an admin: all; newest first)")
async def list_jobs(
    gateway: GatewayDep,
    root: StorageRootDep,
    principal: PrincipalDep,
    status: JobStatusName | None = Query(None, description="Only jobs in this Ray status."),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
) -> JobList:
    jobs = await service.visible_jobs(gateway, principal)
    if status is not None:
        jobs = [j for j in jobs if j.status == status]
    page = jobs[offset : offset + limit]
    return JobList(jobs=[service.summary(j, gateway, root) for j in page], total=len(jobs), limit=limit,
                   offset=offset)


@router.get("/{job_id}", response_model=JobDetail, responses=_NOT_FOUND,
            summary="Ray status, phase and per-member progress")
async def get_job(job_id: str, gateway: GatewayDep, reader: MetricsDep, root: StorageRootDep,
                  principal: PrincipalDep) -> JobDetail:
    return await service.detail(await service.visible_job(gateway, job_id, principal), gateway, reader, root)


@router.get("/{job_id}/metrics", response_model=MetricsPage,
            responses={**_NOT_FOUND, 500: {"model": ErrorBody, "description": "The run folder cannot be read."}},
            summary="Records of the run's metrics.jsonl")
async def get_metrics(
    job_id: str,
    gateway: GatewayDep,
    root: StorageRootDep,
    principal: PrincipalDep,
    since_step: int | None = Query(None, description="Only records with step > since_step."),
) -> MetricsPage:
    return await service.metrics_page(await service.visible_job(gateway, job_id, principal), root, since_step)


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
    principal: PrincipalDep,
    tail: int | None = Query(None, ge=0, le=1_000_000, description="Only the last N lines."),
    follow: bool = Query(False, description="Stream the log as text/plain until the job ends."),
):
    await service.visible_job(gateway, job_id, principal)
    if follow:
        return StreamingResponse(await service.follow_logs(gateway, job_id, tail), media_type="text/plain")
    return PlainTextResponse(service.last_lines(await gateway.logs(job_id), tail))


@router.post("/{job_id}/stop", response_model=StopResult, responses={**_NOT_FOUND, **_FORBIDDEN},
             summary="Ask Ray to stop the job (it ends as STOPPED)")
async def stop_job(job_id: str, gateway: GatewayDep, principal: SubmitterDep) -> StopResult:
    stopped, status = await service.stop(gateway, job_id, principal)
    return StopResult(job_id=job_id, stopped=stopped, status=status)
