"""Environment variable names every layer reads, spelled once (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path

# Leviathan's own.
HOME = "LEVIATHAN_HOME"  # where runs and prepared data go by default (~/leviathan)
STAGING_DIR = "LEVIATHAN_STAGING_DIR"  # where workers stage shards of remote manifests
STORAGE_RETRY_S = "LEVIATHAN_STORAGE_RETRY_S"  # how long a storage write keeps retrying (default 60 s)

# Ray's, as Leviathan uses them.
RAY_ADDRESS = "RAY_ADDRESS"
RAY_AUTH_MODE = "RAY_AUTH_MODE"
RAY_AUTH_TOKEN = "RAY_AUTH_TOKEN"
RAY_AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
RAY_API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"
RAY_TRAIN_STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"
RAY_TRAIN_HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def leviathan_home() -> Path:
    """`$LEVIATHAN_HOME`, default `~/leviathan`."""
    return Path(os.environ.get(HOME) or Path.home() / "leviathan").expanduser()
