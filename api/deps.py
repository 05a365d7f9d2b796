"""Dependencies injected into the routes: settings, auth, the Ray gateway.

Everything hangs off `app.state` (set by `create_app(settings)`), so tests build
an app with their own settings and nothing is read from globals. Each is declared
once as an `Annotated` alias. They are `async def` because none of them blocks:
FastAPI runs plain `def` dependencies in a worker thread, which a status call
would pay for several times over.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBearer

from api.ray_jobs import RayGateway
from api.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_gateway(request: Request) -> RayGateway:
    return request.app.state.ray


SettingsDep = Annotated[Settings, Depends(get_settings)]
GatewayDep = Annotated[RayGateway, Depends(get_gateway)]


class ApiToken(HTTPBearer):
    """401 unless `Authorization: Bearer <LEVIATHAN_API_TOKEN>` (when one is set).

    This is the API's own token; the Ray cluster's token never comes from clients.
    The comparison is constant-time so response timing does not leak the token.
    One dependency both declares the scheme in the OpenAPI document and checks it,
    with the settings read from `app.state`: every /v1 route runs it, and FastAPI
    solves each nested dependency again on every request.
    """

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        settings: Settings = request.app.state.settings
        if settings.api_token is None:
            return
        credentials = await super().__call__(request)
        expected = settings.api_token.get_secret_value().encode()
        given = credentials.credentials.encode() if credentials is not None else b""
        if credentials is None or not hmac.compare_digest(given, expected):
            raise HTTPException(
                401, "missing or invalid API token", headers={"WWW-Authenticate": "Bearer"}
            )


require_api_token = ApiToken(
    auto_error=False,
    scheme_name="HTTPBearer",
    description="LEVIATHAN_API_TOKEN (required only when the API has one set).",
)
