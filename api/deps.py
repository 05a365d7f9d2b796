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
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.ray_jobs import RayGateway
from api.settings import Settings

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="LEVIATHAN_API_TOKEN (required only when the API has one set).",
)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_gateway(request: Request) -> RayGateway:
    return request.app.state.ray


SettingsDep = Annotated[Settings, Depends(get_settings)]
GatewayDep = Annotated[RayGateway, Depends(get_gateway)]


async def require_api_token(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
) -> None:
    """401 unless `Authorization: Bearer <LEVIATHAN_API_TOKEN>` (when one is set).

    This is the API's own token; the Ray cluster's token never comes from clients.
    The comparison is constant-time so response timing does not leak the token.
    Settings come straight from `app.state`, not from `SettingsDep`: every route
    runs this check, and FastAPI solves each nested dependency on every request.
    """
    settings: Settings = request.app.state.settings
    if settings.api_token is None:
        return
    expected = settings.api_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if credentials is None or not hmac.compare_digest(given, expected):
        raise HTTPException(
            401, "missing or invalid API token", headers={"WWW-Authenticate": "Bearer"}
        )
