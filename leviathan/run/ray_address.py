"""Which Ray a process talks to, read from the environment in one place (torch-free).

`RAY_ADDRESS` means two things in Ray's own tools: `ray job ...` reads it as the
Jobs server's URL (http://host:8265, after `RAY_API_SERVER_ADDRESS`), while
`ray.init()` reads it as the cluster to join (a GCS `host:6379`, `auto`, or
`ray://`). The API needs the first, a job's driver the second; both ask here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from leviathan.run.env import RAY_ADDRESS, RAY_API_SERVER_ADDRESS

LEVIATHAN_RAY_ADDRESS = "LEVIATHAN_RAY_ADDRESS"
DEFAULT_JOBS_URL = "http://127.0.0.1:8265"


def _is_url(address: str) -> bool:
    return address.startswith(("http://", "https://"))


def ray_address(purpose: Literal["jobs", "cluster"], environ: Mapping[str, str] | None = None) -> str | None:
    """The address for `purpose` from the environment (default `os.environ`); None when unset.

    - "jobs": the Jobs server URL, from `LEVIATHAN_RAY_ADDRESS`, then (like `ray job`)
      `RAY_API_SERVER_ADDRESS`, then `RAY_ADDRESS`. Returned as given: the caller
      checks that it is an http(s) URL, so a GCS address there is an error, not a guess.
    - "cluster": what `ray.init()` joins, `RAY_ADDRESS`. An http(s) URL there names a
      Jobs server, which `ray.init()` cannot join: ValueError saying what to set instead.
    """
    env = os.environ if environ is None else environ
    if purpose == "jobs":
        for name in (LEVIATHAN_RAY_ADDRESS, RAY_API_SERVER_ADDRESS, RAY_ADDRESS):
            if env.get(name):
                return env[name]
        return None
    if purpose != "cluster":
        raise ValueError(f"purpose must be 'jobs' or 'cluster', got {purpose!r}")
    address = env.get(RAY_ADDRESS) or None
    if address is not None and _is_url(address):
        raise ValueError(
            f"{RAY_ADDRESS}={address} is a Jobs server URL, which a driver cannot join: submit the job "
            f"with `ray job submit`, or set {RAY_ADDRESS} to the cluster's address (host:6379)"
        )
    return address
