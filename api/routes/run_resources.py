"""`/v1/runs`: the run folders under the storage root, read from the storage (Ray
may have forgotten old jobs): list, detail, report, final/ artifacts (with range
requests), delete.

Each handler checks the caller may see the run, calls `api.services.run_resources`
(storage reads in a worker thread) and shapes the answer.
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from api.routes import UNAUTHORIZED
from api.deps import GatewayDep, MetricsDep, PrincipalDep, StorageRootDep, SubmitterDep, require_api_token
from api.schemas import ArtifactList, ErrorBody, RunDetail, RunList, RunState
from api.services import run_resources as service
from api.services.run_resources import off_loop

router = APIRouter(
    prefix="/v1/runs",
    tags=["runs"],
    dependencies=[Depends(require_api_token)],
    responses={
        **UNAUTHORIZED,
        500: {"model": ErrorBody, "description": "The storage root cannot be read."},
        503: {"model": ErrorBody, "description": "The Ray Jobs server (asked which runs are being written) "
                                                 "is unreachable (retry)."},
    },
)
_NOT_FOUND = {404: {"model": ErrorBody, "description": "No such run, or one of another user's."}}


@router.get("", response_model=RunList, summary="List the caller's runs (an admin: all; newest first)")
async def list_runs(
    gateway: GatewayDep,
    reader: MetricsDep,
    root: StorageRootDep,
    principal: PrincipalDep,
    state: RunState | None = Query(None, description="Only runs in this state."),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
) -> RunList:
    runs = await off_loop(service.list_runs, root, await gateway.jobs(), principal, reader)
    if state is not None:
        runs = [r for r in runs if r.state == state]
    return RunList(runs=runs[offset : offset + limit], total=len(runs), limit=limit, offset=offset)


@router.get("/{name}", response_model=RunDetail, responses=_NOT_FOUND,
            summary="A run's state, phase, figures, spec and checkpoints")
async def get_run(name: str, gateway: GatewayDep, reader: MetricsDep, root: StorageRootDep,
                  principal: PrincipalDep) -> RunDetail:
    folder, owner, job = await off_loop(service.visible_run, root, name, await gateway.jobs(), principal)
    return await off_loop(partial(service.summarize, detailed=True), folder, owner, job, reader)


def _wants_markdown(accept: str | None) -> bool:
    """Whether `Accept` prefers text/markdown to application/json (by q-value, then order)."""
    best: tuple[float, int, str] | None = None
    for i, item in enumerate((accept or "").split(",")):
        kind, *params = [p.strip() for p in item.split(";")]
        if kind.lower() not in ("text/markdown", "application/json"):
            continue
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if q > 0 and (best is None or q > best[0]):
            best = (q, i, kind.lower())
    return best is not None and best[2] == "text/markdown"


@router.get(
    "/{name}/report",
    summary="The run's evaluation report: report.json, or report.md with `Accept: text/markdown`",
    responses={
        200: {"description": "report.json, or report.md when Accept prefers text/markdown.",
              "content": {"application/json": {"schema": {"type": "object"}},
                          "text/markdown": {"schema": {"type": "string"}}}},
        **_NOT_FOUND,
    },
)
async def get_report(name: str, request: Request, gateway: GatewayDep, root: StorageRootDep,
                     principal: PrincipalDep) -> Response:
    folder, _, _ = await off_loop(service.visible_run, root, name, await gateway.jobs(), principal)
    markdown = _wants_markdown(request.headers.get("accept"))
    content = await off_loop(service.report, folder, markdown)
    if markdown:
        return PlainTextResponse(content, media_type="text/markdown; charset=utf-8")
    return JSONResponse(content)


@router.get("/{name}/artifacts", response_model=ArtifactList, responses=_NOT_FOUND,
            summary="The files of the run's final/ (the loadable ensemble) with sizes and sha256")
async def list_artifacts(name: str, gateway: GatewayDep, root: StorageRootDep,
                         principal: PrincipalDep) -> ArtifactList:
    folder, _, _ = await off_loop(service.visible_run, root, name, await gateway.jobs(), principal)
    return ArtifactList(name=folder.name, artifacts=await off_loop(service.artifacts, folder))


@router.get(
    "/{name}/artifacts/{path:path}",
    response_class=StreamingResponse,
    summary="Download one file of final/ (single byte ranges: 206, 416)",
    responses={
        200: {"description": "The whole file.", "content": {"application/octet-stream": {}}},
        206: {"description": "The byte range asked for (`Range: bytes=start-end`).",
              "content": {"application/octet-stream": {}}},
        404: {"model": ErrorBody, "description": "No such run or file, or one outside the run folder."},
        416: {"model": ErrorBody, "description": "The range starts past the file's end."},
    },
)
async def get_artifact(name: str, path: str, request: Request, gateway: GatewayDep, root: StorageRootDep,
                       principal: PrincipalDep) -> StreamingResponse:
    folder, _, _ = await off_loop(service.visible_run, root, name, await gateway.jobs(), principal)
    parts = service.artifact_path(path)
    artifact = await off_loop(service.open_artifact, folder, parts)
    try:
        span = service.byte_range(request.headers.get("range"), artifact.size)
    except service.RangeNotSatisfiable:
        artifact.file.close()
        raise
    headers = {"Accept-Ranges": "bytes"}
    if span is None:
        start, length, status = 0, artifact.size, 200
    else:
        start, length, status = span[0], span[1] - span[0] + 1, 206
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{artifact.size}"
    headers["Content-Length"] = str(length)
    return StreamingResponse(artifact.chunks(start, length), status_code=status, headers=headers,
                             media_type="application/octet-stream")


@router.delete(
    "/{name}",
    status_code=204,
    summary="Remove the run folder (local or object storage)",
    responses={**_NOT_FOUND, 403: {"model": ErrorBody, "description": "The token's role is 'read'."},
               409: {"model": ErrorBody, "description": "A job that has not ended writes the run."}},
)
async def delete_run(name: str, gateway: GatewayDep, root: StorageRootDep, principal: SubmitterDep) -> Response:
    async with gateway.submit_lock:  # no submission can start writing it between the check and the removal
        folder, _, job = await off_loop(service.visible_run, root, name, await gateway.jobs(), principal)
        await off_loop(service.delete_run, folder, job)
    return Response(status_code=204)
