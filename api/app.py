"""The FastAPI application: `create_app(settings)` builds one; `app` is built from
the environment (`uvicorn api.app:app`, `leviathan serve`).

OpenAPI docs are at /docs. This module (and everything it imports) stays free of
torch and Ray Train: it needs only the JobSpec schema and Ray's Jobs client.
"""

from __future__ import annotations

from fastapi import FastAPI

from api.metrics import MetricsReader
from api.ray_jobs import RayGateway
from api.routes import health, jobs
from api.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    app = FastAPI(
        title="Leviathan",
        version="0.1.0",
        description=(
            "Submit typed Leviathan training specs as Ray jobs and follow them. "
            "Every job is a Ray job (it shows in `ray job list` and the dashboard); "
            "Ray is the only source of truth."
        ),
    )
    app.state.settings = settings
    app.state.ray = RayGateway(settings)
    app.state.metrics = MetricsReader()
    app.include_router(health.router)
    app.include_router(jobs.router)
    return app


def __getattr__(name: str) -> FastAPI:
    """`api.app:app`, built from the environment on first access (what uvicorn and
    `leviathan serve` load), so importing `create_app` needs no valid environment."""
    if name == "app":
        globals()["app"] = application = create_app()
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
