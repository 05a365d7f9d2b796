"""`/v1/runs/{name}`: a run folder under the storage root, addressed by its name.

A run outlives its Ray jobs: resuming one submits a new job that continues the
run's checkpoints in the same folder. The policy lives in `api.services.jobs`.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.routes import RAY_ERRORS
from api.deps import GatewayDep, SettingsDep, SubmitterDep, require_api_token
from api.schemas import ErrorBody, JobSubmitted
from api.services import jobs as service
from api.strict_json import StrictJSONRoute

router = APIRouter(
    prefix="/v1/runs",
    tags=["runs"],
    dependencies=[Depends(require_api_token)],
    route_class=StrictJSONRoute,
    responses=RAY_ERRORS,
)


@router.post(
    "/{name}/resume",
    status_code=201,
    response_model=JobSubmitted,
    summary="Resume a failed or stopped run from its latest checkpoint (a new Ray job, same run folder)",
    responses={
        403: {"model": ErrorBody, "description": "The token's role is 'read'."},
        404: {"model": ErrorBody, "description": "No run of that name under the storage root, or one of "
                                                 "another user's."},
        409: {"model": ErrorBody, "description": "The run finished, or a job of it is still pending or running."},
        422: {"description": "The run's spec is outside this API's limits, or the cluster cannot hold it."},
        429: {"model": ErrorBody, "description": "max_concurrent_jobs reached (Retry-After)."},
    },
)
async def resume_run(name: str, settings: SettingsDep, gateway: GatewayDep, owner: SubmitterDep) -> JobSubmitted:
    return await service.resume(name, settings, gateway, owner)
