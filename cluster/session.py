"""Connect to the Ray cluster a job runs on.

`RAY_ADDRESS` set (a `ray job submit` driver, or a user pointing at a
cluster): connect to it. Otherwise start a local Ray in this process, the
embedded default of `leviathan train`. In both cases the dashboard's Train view
needs `RAY_TRAIN_ENABLE_STATE_TRACKING=1` in the process that calls
`TorchTrainer.fit()`: it decides there whether the run registers with Ray
Train's state actor.
"""

from __future__ import annotations

import logging
import os
import socket

from leviathan.run import env
from leviathan.run.ray_address import ray_address

STATE_TRACKING = env.RAY_TRAIN_STATE_TRACKING
HEALTH_CHECK_INTERVAL = env.RAY_TRAIN_HEALTH_CHECK_INTERVAL
API_SERVER_ADDRESS = env.RAY_API_SERVER_ADDRESS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_train_env() -> None:
    """Ray Train settings read by the process that calls `fit()` (and passed on to its controller).

    - the dashboard's Train view: `RAY_TRAIN_ENABLE_STATE_TRACKING=1`;
    - the controller polls workers every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`
      (2 s by default) and each worker holds one unconsumed report, so a
      `ray.train.report` less than one interval after the previous one
      waits; 0.5 s keeps frequent evaluation reports cheap and notices dead
      workers sooner. Values set by the user win.
    """
    os.environ.setdefault(STATE_TRACKING, "1")
    os.environ.setdefault(HEALTH_CHECK_INTERVAL, "0.5")


def init_ray(*, address: str | None = None, num_cpus: int | None = None) -> str:
    """Make sure Ray is initialised; returns how: "existing", "cluster" or "local"."""
    import ray

    configure_train_env()
    if ray.is_initialized():
        return "existing"
    env_address = ray_address("cluster")
    if address or env_address:
        # Without an explicit address ray.init() reads RAY_ADDRESS itself, as a
        # `ray job submit` driver expects (the job supervisor sets it).
        ray.init(address=address if address and address != env_address else None,
                 logging_level=logging.WARNING)
        return "cluster"
    # address="local": always a new cluster of our own, never one found through
    # /tmp/ray/ray_current_cluster (which may be another user's, or stale).
    # Ray Train's placement-group cleaner asks the state API whether the
    # controller is alive; without an address that API connects to the most
    # recently started Ray on the machine, which on a shared machine can be
    # another cluster (which does not know our controller, so the cleaner
    # removes our workers' placement group). The job's env var points it here.
    dashboard_port = _free_port()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        dashboard_port=dashboard_port,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {
            STATE_TRACKING: os.environ[STATE_TRACKING],
            API_SERVER_ADDRESS: f"http://127.0.0.1:{dashboard_port}",
        }},
    )
    return "local"
