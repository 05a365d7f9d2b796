"""Where a served run answers, torch-free: what `leviathan serve-model` deploys and
the API's generate route calls agree on it here.

A run is served as the Ray Serve application named after the run, under the route
prefix `/runs/<name>` of Serve's HTTP proxy. The deployment streams one JSON object
per line: `{"token": id, "text": "..."}` per generated token, then
`{"done": true, "prompt_tokens": P, "tokens": N, "finish_reason": "length"}`.
"""

from __future__ import annotations

DEFAULT_SERVE_PORT = 8001  # Serve's own default (8000) is also the REST API's
ROUTE_ROOT = "/runs"


def app_name(run_name: str) -> str:
    """The Serve application of a run: the run's own name."""
    return run_name


def route_prefix(run_name: str) -> str:
    """The Serve HTTP route prefix of a run's application."""
    return f"{ROUTE_ROOT}/{run_name}"
