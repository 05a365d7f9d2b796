"""`GET /healthz`: liveness without a token, plus whether Ray's Jobs server answers."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import GatewayDep
from api.errors import ApiError, RayRefusedToken
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness (no token needed)")
async def healthz(gateway: GatewayDep) -> Health:
    """Always 200 while the API runs; `ray` says whether the Jobs server answered
    (a round trip each call, so a dead cluster shows at once)."""
    try:
        await gateway.version()
    except RayRefusedToken:
        return Health(ray="unauthorized")
    except ApiError:
        return Health(ray="unreachable")
    return Health(ray="ok")
