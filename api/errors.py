"""The API's own errors, and the one place they become HTTP answers.

The Ray jobs client and the services raise these; only `api.app`'s exception
handler turns them into status codes. So a service is testable without FastAPI,
and the mapping from "what went wrong" to "which status" is read in one table.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A failure a client can act on. `status` is its HTTP code, `headers` extra answer headers."""

    status = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthorized(ApiError):
    """No API token, or the wrong one."""

    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ApiError):
    """A valid token whose role may not do this (a `read` token submitting, say)."""

    status = 403


class NotFound(ApiError):
    """No such job (or one this API does not manage)."""

    status = 404


class Conflict(ApiError):
    """The resource is in a state that forbids the request (a finished run, a run a job writes)."""

    status = 409


class TooManyJobs(ApiError):
    """max_concurrent_jobs Leviathan jobs are pending or running already. A slot frees
    when one ends, which for a training job is minutes away: Retry-After says to ask
    again in 30 s."""

    status = 429
    headers = {"Retry-After": "30"}


class AuthUnavailable(ApiError):
    """The API's token file cannot be read or parsed: no token is accepted until it can."""

    status = 503


class StorageError(ApiError):
    """The API cannot write or read under its own storage root."""

    status = 500


class NotStarted(ApiError):
    """The app's lifespan has not opened the Ray client (yet)."""

    status = 503


class RayUnavailable(ApiError):
    """The Ray Jobs server is unreachable or not ready: a retry may succeed."""

    status = 503
    headers = {"Retry-After": "5"}


class RayRefusedToken(ApiError):
    """The cluster refused the Ray token the API passed on (never the token itself)."""

    status = 502

    def __init__(self, status: int | None = None) -> None:
        code = f" (HTTP {status})" if status else ""
        super().__init__(f"the Ray cluster refused the API's Ray token{code}")


class RayFailed(ApiError):
    """The Ray Jobs server answered with an error the API cannot act on."""

    status = 502


class InvalidField(ApiError):
    """One or more request fields are wrong: 422 in FastAPI's validation shape.

    `errors` are `{"type", "loc", "msg", "input"}` dicts with `loc` naming the field.
    """

    status = 422

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(str(e.get("msg")) for e in errors))
        self.errors = errors


def field_error(loc: tuple[Any, ...], msg: str, value: Any, kind: str = "value_error") -> dict[str, Any]:
    """One error in FastAPI's validation shape, `loc` naming the body field."""
    return {"type": kind, "loc": ("body", *loc), "msg": msg, "input": value}


def encodable(value: Any) -> Any:
    """`value` with every string made UTF-8 encodable: lone surrogates (which JSON's
    `\\ud800` escapes can put in a parsed string) become their `\\ud800` text.

    Error answers echo parts of the request; one unencodable character there would
    turn a 422 into a 500 while the answer is being written.
    """
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encodable(v) for v in value]
    return value
