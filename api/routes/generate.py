"""`POST /v1/runs/{name}/generate`: sample from a run served on Ray Serve.

Server-sent events when the client accepts `text/event-stream` (a `token` event
per token, then `done`, or `error` if the replica dies mid-stream), else one JSON
answer. The run must be the caller's (404 otherwise, as for every /v1/runs route)
and deployed by `leviathan serve-model` (404 with its own message otherwise).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import GatewayDep, PrincipalDep, SettingsDep, StorageRootDep, require_api_token
from api.routes import UNAUTHORIZED
from api.schemas import ErrorBody, GenerateAnswer, GenerateRequest
from api.services import generate as service
from api.services.run_resources import off_loop, visible_run
from api.strict_json import StrictJSONRoute

# Strict JSON bodies like every other route that takes one: a body that is not UTF-8 JSON is a 422, not a 400.
router = APIRouter(prefix="/v1/runs", tags=["runs"], dependencies=[Depends(require_api_token)],
                   route_class=StrictJSONRoute)

_SSE = "text/event-stream"


def wants_events(accept: str | None) -> bool:
    return _SSE in (accept or "").lower()


@router.post(
    "/{name}/generate",
    response_model=GenerateAnswer,
    summary="Sample text from the run's Ray Serve deployment (SSE with `Accept: text/event-stream`)",
    responses={
        200: {"description": "The continuation as JSON, or server-sent events: `token` "
                             "({token, text}) per token, then `done` ({tokens, prompt_tokens, finish_reason, "
                             "routed_members}), or `error` ({detail, tokens}) if the replica dies mid-stream.",
              "content": {_SSE: {"schema": {"type": "string"}}}},
        **UNAUTHORIZED,
        404: {"model": ErrorBody, "description": "No such run (or another user's), or the run has no deployment."},
        502: {"model": ErrorBody, "description": "The deployment failed, or its replica died mid-answer (JSON)."},
        503: {"model": ErrorBody, "description": "Ray Serve is unreachable or has no replica ready (retry)."},
    },
)
async def generate(name: str, body: GenerateRequest, request: Request, gateway: GatewayDep,
                   root: StorageRootDep, principal: PrincipalDep, settings: SettingsDep) -> Response:
    service.check_request(body, settings.max_new_tokens)
    await off_loop(visible_run, root, name, await gateway.jobs(), principal)
    stream = await service.open_stream(settings.serve_url, name, body)
    if wants_events(request.headers.get("accept")):
        return StreamingResponse(service.events(name, stream), media_type=_SSE,
                                 headers={"Cache-Control": "no-cache"})
    return GenerateAnswer(**await service.collect(name, stream))  # type: ignore[return-value]
