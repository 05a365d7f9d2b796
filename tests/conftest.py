"""Shared test fixtures: one real local Ray cluster per test session.

`ray.init()` costs seconds here, so every test that needs Ray shares the one
started by the `ray_cluster` fixture. It runs with the dashboard (and with it
the Ray Jobs server), so Ray Train runs in this process and jobs submitted
through `JobSubmissionClient` or `ray job submit` land on the same cluster.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    address: str  # GCS address, for RAY_ADDRESS / ray.init(address=...)
    dashboard_url: str  # http://127.0.0.1:<port>, the Jobs API
    auth_token: str | None  # Ray token auth (on by default for local clusters)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> RayCluster:
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    # Jobs started by the job server run `python -m jobs...` from the repo.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    ctx = ray.init(
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        logging_level="WARNING",
        log_to_driver=False,
    )
    token_file = Path.home() / ".ray" / "auth_token"
    token = token_file.read_text().strip() if token_file.is_file() else None
    cluster = RayCluster(
        address=ctx.address_info["gcs_address"],
        dashboard_url=f"http://{ctx.dashboard_url}",
        auth_token=token,
    )
    yield cluster
    ray.shutdown()
