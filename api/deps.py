"""Dependencies injected into the routes: settings, auth, the Ray Jobs client.

Everything hangs off `app.state` (set by `create_app(settings)`), so tests build
an app with their own settings and nothing is read from globals.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray.job_submission import JobSubmissionClient

from api.metrics import MetricsReader
from api.ray_jobs import RayGateway, ray_errors
from api.settings import Settings

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="LEVIATHAN_API_TOKEN (required only when the API has one set).",
)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_gateway(request: Request) -> RayGateway:
    return request.app.state.ray


def get_metrics_reader(request: Request) -> MetricsReader:
    return request.app.state.metrics


def get_ray_client(gateway: RayGateway = Depends(get_gateway)) -> JobSubmissionClient:
    with ray_errors():
        return gateway.client()


def require_api_token(
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    settings: Settings = Depends(get_settings),
) -> None:
    """401 unless `Authorization: Bearer <LEVIATHAN_API_TOKEN>` (when one is set).

    This is the API's own token; the Ray cluster's token never comes from clients.
    The comparison is constant-time so response timing does not leak the token.
    """
    if settings.api_token is None:
        return
    expected = settings.api_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if credentials is None or not hmac.compare_digest(given, expected):
        raise HTTPException(
            401, "missing or invalid API token", headers={"WWW-Authenticate": "Bearer"}
        )
