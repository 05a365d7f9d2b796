"""The API's settings: one pydantic-settings object read from `LEVIATHAN_*` variables.

Two kinds of token live here and must not be confused:
- `api_token` (`LEVIATHAN_API_TOKEN`, one admin) and `api_tokens`
  (`LEVIATHAN_API_TOKENS`, a file of hashed per-user tokens, `api.auth`) guard this
  API: clients send theirs as `Authorization: Bearer <token>`.
- `ray_auth_token` (`LEVIATHAN_RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN`, else the file at
  `ray_auth_token_path`, default `~/.ray/auth_token`) is the Ray cluster's own token
  (Ray 2.60 token auth); the API passes it on to the Ray Jobs server. The file is
  read again whenever its modification time changes (`RayTokenSource`), so a rotated
  cluster token needs no API restart and an unchanged one costs a `stat` per call.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobs.spec import default_home, default_storage
from leviathan.run.ray_address import DEFAULT_JOBS_URL, ray_address

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_working_dir() -> str:
    """The project root when running from a checkout (uploaded with each job), else ""
    (the package is installed on the cluster's nodes and nothing needs uploading)."""
    if (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "jobs").is_dir():
        return str(PROJECT_ROOT)
    return ""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEVIATHAN_", extra="ignore")

    ray_address: str = Field(
        default_factory=lambda: ray_address("jobs") or DEFAULT_JOBS_URL,
        validate_default=True,
        description=(
            "URL of the Ray Jobs server (the dashboard), http(s)://host:8265; like `ray job`, "
            "falls back to RAY_API_SERVER_ADDRESS, then RAY_ADDRESS (`leviathan.run.ray_address`)."
        ),
    )
    dashboard_url: str | None = Field(
        None, description="Dashboard URL used in links for users; default: ray_address."
    )
    api_token: SecretStr | None = Field(
        None,
        description=(
            "One admin's bearer token (user 'admin'); with neither it nor api_tokens set, no endpoint needs a token."
        ),
    )
    api_tokens: Path | None = Field(
        None,
        description=(
            "File of per-user tokens (JSON lines: sha256, user, role read|submit|admin; `leviathan token`); "
            "re-read when it changes. With api_token too, that one is one more admin."
        ),
    )
    tracking_uris: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated URI prefixes a spec's tracking.mlflow_uri may start with (the MLflow servers "
            "jobs may call); local file:/sqlite: stores under the storage root are always allowed."
        ),
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    storage: str = Field(
        default_factory=default_storage,
        description="Where run folders go (<storage>/<run-name>); jobs may not choose another root.",
    )
    data_root: str = Field(
        default_factory=lambda: str(default_home() / "data"),
        description=(
            "Folder every API-submitted data.manifest must lie under (besides 'builtin', the "
            "built-in corpus); default: the prepared-data folder under LEVIATHAN_HOME."
        ),
    )
    working_dir: str = Field(
        default_factory=default_working_dir,
        description="Folder uploaded as each job's runtime_env working_dir; empty: the package is installed on the nodes.",
    )
    job_python: str = Field(
        "python",
        description="Python command of the job entrypoint on the cluster (a venv's python when it is not on PATH there).",
    )
    ray_auth_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("LEVIATHAN_RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN", "ray_auth_token"),
    )
    ray_auth_token_path: Path = Field(
        Path("~/.ray/auth_token"),
        validation_alias=AliasChoices(
            "LEVIATHAN_RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN_PATH", "ray_auth_token_path"
        ),
    )

    # Limits on what one user may ask of the cluster (413 / 422 / 429 beyond them).
    max_body_bytes: int = Field(
        2**20, ge=1, description="Request bodies larger than this get 413 before they are read."
    )
    max_modules: int = Field(16, ge=1)
    max_steps: int = Field(1_000_000, ge=0, description="Per phase: phase1_steps and phase2_steps each.")
    max_seq_len: int = Field(4096, ge=2)
    max_member_params: int = Field(
        1_000_000_000, ge=1, description="Parameters of one member (its preset and sizes, at the data's vocabulary)."
    )
    max_concurrent_jobs: int = Field(4, ge=0, description="Leviathan jobs PENDING or RUNNING at once.")
    allow_unschedulable: bool = Field(
        False,
        description="Accept jobs the cluster's nodes cannot hold today (an autoscaling cluster adds nodes), "
        "and let their drivers wait for the nodes; unset: such a job gets 422 naming the resource.",
    )
    serve_url: str = Field(
        "http://127.0.0.1:8001",
        description="Ray Serve's HTTP proxy (`leviathan serve-model --http-port`), which the generate route calls.",
    )
    max_new_tokens: int = Field(1024, ge=1, description="The most tokens one generate request may ask for.")
    status_cache_s: float = Field(
        0.5, ge=0, le=1,
        description="How long a job's status from Ray answers further polls (0: every poll asks Ray).",
    )

    @field_validator("ray_address", "dashboard_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be the Ray Jobs server URL (http://host:8265), got {v!r}")
        return v.rstrip("/") if v else v

    @field_validator("serve_url")
    @classmethod
    def _serve_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be Ray Serve's HTTP URL (http://host:port), got {v!r}")
        return v.rstrip("/")

    @field_validator("tracking_uris", mode="before")
    @classmethod
    def _comma_separated(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, (list, tuple)):
            prefixes = [str(p).strip() for p in v if str(p).strip()]
            bad = [p for p in prefixes if "://" not in p and not p.startswith(("file:", "sqlite:"))]
            if bad:
                raise ValueError(f"each tracking URI prefix must be a URI (scheme://host...), got {bad[0]!r}")
            return prefixes
        return v

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("api_token", "ray_auth_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if v == "" else v

    @property
    def public_dashboard_url(self) -> str:
        return self.dashboard_url or self.ray_address


class RayTokenSource:
    """The Ray cluster token: the explicit setting, else the token file, re-read only
    when the file's modification time (or size, or inode) changes."""

    def __init__(self, settings: Settings) -> None:
        self._explicit = settings.ray_auth_token
        self._path = settings.ray_auth_token_path.expanduser()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._token: str | None = None

    def get(self) -> str | None:
        if self._explicit is not None:
            return self._explicit.get_secret_value()
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._token = self._path.read_text().strip() or None
                except OSError:
                    return None
                self._stamp = stamp
            return self._token
