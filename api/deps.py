"""Dependencies injected into the routes: settings, the Ray gateway, the metrics
reader, the storage root, and auth (the caller's `Principal`, and the role check
for submitting and stopping).

Everything hangs off `app.state` (set by `create_app(settings, gateway)`), so tests
build an app with their own settings and gateway and nothing is read from globals.
Each is declared once as an `Annotated` alias, and every route takes its services
through these aliases. They are `async def` because none of them blocks: FastAPI
runs plain `def` dependencies in a worker thread, which a status call would pay
for several times over.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from api.auth import ANONYMOUS_ADMIN, Authenticator, Principal
from api.errors import Forbidden, Unauthorized
from api.metrics import MetricsReader
from api.ray_jobs import JobsGateway
from api.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_gateway(request: Request) -> JobsGateway:
    return request.app.state.ray


async def get_metrics_reader(request: Request) -> MetricsReader:
    return request.app.state.metrics


async def get_storage_root(request: Request) -> str:
    return request.app.state.storage_root


SettingsDep = Annotated[Settings, Depends(get_settings)]
GatewayDep = Annotated[JobsGateway, Depends(get_gateway)]
MetricsDep = Annotated[MetricsReader, Depends(get_metrics_reader)]
StorageRootDep = Annotated[str, Depends(get_storage_root)]


class ApiToken(HTTPBearer):
    """The caller's `Principal` from `Authorization: Bearer <token>`; 401 for none or an
    unknown one (when the API has tokens at all, `api.auth`).

    These are the API's own tokens; the Ray cluster's token never comes from clients.
    One dependency both declares the scheme in the OpenAPI document and checks it,
    with the authenticator read from `app.state`: every /v1 route runs it, and a
    route that takes `PrincipalDep` gets the same (per-request cached) answer.
    """

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        auth: Authenticator = request.app.state.auth
        if not auth.enabled:
            return ANONYMOUS_ADMIN
        credentials = await super().__call__(request)
        principal = auth.principal(credentials.credentials if credentials is not None else None)
        if principal is None:
            raise Unauthorized("missing or invalid API token")
        return principal


require_api_token = ApiToken(
    auto_error=False,
    scheme_name="HTTPBearer",
    description=(
        "LEVIATHAN_API_TOKEN, or a user's token from the LEVIATHAN_API_TOKENS file "
        "(required only when the API has either set)."
    ),
)

PrincipalDep = Annotated[Principal, Depends(require_api_token)]


async def require_submit_role(principal: PrincipalDep) -> Principal:
    """403 naming the role for a `read` token: it may not submit or stop jobs."""
    if not principal.may("submit"):
        raise Forbidden(f"the role {principal.role!r} may only read; submitting and stopping jobs needs "
                        "the role 'submit' or 'admin'")
    return principal


SubmitterDep = Annotated[Principal, Depends(require_submit_role)]
