"""Dependencies injected into the routes: settings, the Ray gateway, the metrics
reader, the storage root, and auth.

Everything hangs off `app.state` (set by `create_app(settings, gateway)`), so tests
build an app with their own settings and gateway and nothing is read from globals.
Each is declared once as an `Annotated` alias, and every route takes its services
through these aliases. They are `async def` because none of them blocks: FastAPI
runs plain `def` dependencies in a worker thread, which a status call would pay
for several times over.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from api.errors import Unauthorized
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
    """401 unless `Authorization: Bearer <LEVIATHAN_API_TOKEN>` (when one is set).

    This is the API's own token; the Ray cluster's token never comes from clients.
    The comparison is constant-time so response timing does not leak the token.
    One dependency both declares the scheme in the OpenAPI document and checks it,
    with the settings read from `app.state`: every /v1 route runs it.
    """

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        settings: Settings = request.app.state.settings
        if settings.api_token is None:
            return
        credentials = await super().__call__(request)
        expected = settings.api_token.get_secret_value().encode()
        given = credentials.credentials.encode() if credentials is not None else b""
        if credentials is None or not hmac.compare_digest(given, expected):
            raise Unauthorized("missing or invalid API token")


require_api_token = ApiToken(
    auto_error=False,
    scheme_name="HTTPBearer",
    description="LEVIATHAN_API_TOKEN (required only when the API has one set).",
)
