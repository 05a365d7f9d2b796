"""`GET /healthz`: liveness without a token, plus whether Ray's Jobs server answers."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from ray.exceptions import AuthenticationError

from api.deps import get_gateway
from api.ray_jobs import RayGateway
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness (no token needed)")
def healthz(gateway: RayGateway = Depends(get_gateway)) -> Health:
    """Always 200 while the API runs; `ray` says whether the Jobs server answered
    (a round trip each call, so a dead cluster shows at once)."""
    try:
        gateway.client().get_version()
    except AuthenticationError:
        return Health(ray="unauthorized")
    except Exception:
        return Health(ray="unreachable")
    return Health(ray="ok")
