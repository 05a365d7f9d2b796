"""The FastAPI application: `create_app(settings)` builds one; `app` is built from
the environment (`uvicorn api.app:app`, `leviathan serve`).

OpenAPI docs are at /docs. This module (and everything it imports) stays free of
torch and Ray Train: it needs only the JobSpec schema and Ray's Jobs API.

No input may cost a 5xx or a large answer: bodies over `max_body_bytes` get 413
before they are read (FastAPI's body limit), JSON bodies are parsed strictly
(`api.strict_json`), and every error answer quotes at most a short prefix of what
was sent.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.auth import Authenticator, read_token_file
from api.errors import ApiError, InvalidField, encodable
from api.metrics import MetricsReader
from api.ray_jobs import JobsGateway, RayGateway
from api.routes import generate, health, jobs, run_resources, runs
from api.services.runs import storage_root
from api.settings import Settings
from api.strict_json import MAX_MESSAGE_CHARS, safe_errors, shorten


async def error_answer(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler: the project's errors by their status, FastAPI's
    validation errors and Starlette's HTTP errors as FastAPI answers them, every
    message shortened and every echoed string made encodable (`encodable`)."""
    if isinstance(exc, InvalidField):
        return JSONResponse({"detail": encodable(safe_errors(exc.errors))}, status_code=422)
    if isinstance(exc, ApiError):
        return JSONResponse({"detail": encodable(shorten(exc.message, MAX_MESSAGE_CHARS))}, status_code=exc.status,
                            headers=exc.headers or None)
    if isinstance(exc, RequestValidationError):
        return JSONResponse({"detail": encodable(safe_errors(exc.errors()))}, status_code=422)
    assert isinstance(exc, HTTPException)
    if isinstance(exc.detail, str):
        exc.detail = shorten(exc.detail, MAX_MESSAGE_CHARS)
    exc.detail = encodable(exc.detail)
    return await http_exception_handler(request, exc)


def create_app(settings: Settings | None = None, gateway: JobsGateway | None = None) -> FastAPI:
    """An app on `settings` (default: the environment's) talking to Ray through
    `gateway` (default: a `RayGateway` on the settings' Ray address)."""
    settings = settings if settings is not None else Settings()
    gateway = gateway if gateway is not None else RayGateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.aclose()

    app = FastAPI(
        title="Leviathan",
        version="0.1.0",
        description=(
            "Submit typed Leviathan training specs as Ray jobs and follow them. "
            "Every job is a Ray job (it shows in `ray job list` and the dashboard); "
            "Ray is the only source of truth."
        ),
        lifespan=lifespan,
        max_body_size=settings.max_body_bytes,
    )
    app.state.settings = settings
    app.state.ray = gateway
    app.state.metrics = MetricsReader()
    app.state.storage_root = storage_root(settings)
    app.state.auth = Authenticator(
        settings.api_token.get_secret_value() if settings.api_token is not None else None, settings.api_tokens
    )
    if settings.api_tokens is not None:  # a missing or malformed token file stops the start, saying why
        read_token_file(settings.api_tokens.expanduser())
    for kind in (ApiError, RequestValidationError, HTTPException):
        app.add_exception_handler(kind, error_answer)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(runs.router)
    app.include_router(run_resources.router)
    app.include_router(generate.router)
    return app


def __getattr__(name: str) -> FastAPI:
    """`api.app:app`, built from the environment on first access (what uvicorn and
    `leviathan serve` load), so importing `create_app` needs no valid environment."""
    if name == "app":
        globals()["app"] = application = create_app()
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
