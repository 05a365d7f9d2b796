"""Sampling from a run's Ray Serve deployment (`leviathan serve-model`), over HTTP.

The API never loads a model: it posts the request to Serve's HTTP proxy at the
run's route prefix (`leviathan.run.serving`) and reads the newline-delimited JSON
the deployment streams back. The proxy's answer before the stream says what went
wrong: 404 = no application at that prefix (the run is not deployed), 422 = a field
the model cannot use (k above its members, say), anything else = a failed
deployment. A stream that breaks or ends without its `done` line means the replica
serving it died: `StreamBroken`, which the route turns into an SSE `error` event.
Free of FastAPI: failures are `api.errors.ApiError`s.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from api.errors import ApiError, InvalidField, NotFound, field_error
from api.schemas import GenerateRequest
from leviathan.run.serving import route_prefix

CONNECT_TIMEOUT_S = 5.0
TOKEN_TIMEOUT_S = 120.0  # a replica busy with a full batch may be slow to the next token, never this slow


class ServeUnavailable(ApiError):
    """Ray Serve's HTTP proxy cannot be reached: a retry may succeed."""

    status = 503
    headers = {"Retry-After": "5"}


class ServeFailed(ApiError):
    """The deployment answered with an error the API cannot act on."""

    status = 502


class StreamBroken(Exception):
    """The stream stopped before its `done` line (its replica died or the proxy dropped it)."""


def check_request(request: GenerateRequest, max_new_tokens: int) -> None:
    """422 at max_new_tokens when it exceeds the API's bound."""
    if request.max_new_tokens > max_new_tokens:
        raise InvalidField([field_error(("max_new_tokens",), f"must be <= {max_new_tokens} (the API's bound)",
                                        request.max_new_tokens, "less_than_equal")])


@dataclass
class Stream:
    """An open stream from a replica: `lines()` yields its token lines, then its `done` line."""

    client: httpx.AsyncClient
    response: httpx.Response

    async def lines(self) -> AsyncIterator[dict[str, Any]]:
        try:
            async for raw in self.response.aiter_lines():
                if not raw.strip():
                    continue
                line = json.loads(raw)
                yield line
                if line.get("done"):
                    return
        except (httpx.HTTPError, ValueError) as e:
            raise StreamBroken(type(e).__name__) from None
        raise StreamBroken("the stream ended without its done line")

    async def aclose(self) -> None:
        await self.response.aclose()
        await self.client.aclose()


def _not_usable(body: Any) -> InvalidField:
    """The deployment's 422 in the API's shape, each error at its body field."""
    errors = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors:
        errors = [{"loc": ["body"], "msg": "the deployment refused the request"}]
    return InvalidField([field_error(tuple(e.get("loc", ["body"])[1:]) or ("body",), str(e.get("msg")), None)
                         for e in errors if isinstance(e, dict)])


async def open_stream(serve_url: str, name: str, request: GenerateRequest) -> Stream:
    """Post the request to the run's deployment; raises before any token when it cannot start."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(TOKEN_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
    url = f"{serve_url}{route_prefix(name)}/generate"
    try:
        response = await client.send(
            client.build_request("POST", url, json=request.model_dump(exclude_none=True)), stream=True)
    except httpx.HTTPError:
        await client.aclose()
        raise ServeUnavailable(f"Ray Serve at {serve_url} is unreachable (retry)") from None
    if response.status_code == 200:
        return Stream(client, response)
    try:
        body = json.loads(await response.aread()) if response.status_code == 422 else None
    except (httpx.HTTPError, ValueError):
        body = None
    finally:
        await response.aclose()
        await client.aclose()
    if response.status_code == 404:
        raise NotFound(f"run {name!r} has no deployment (`leviathan serve-model --run {name}` serves it)")
    if response.status_code == 422:
        raise _not_usable(body)
    if response.status_code == 503:
        raise ServeUnavailable(f"the deployment of run {name!r} has no replica ready (retry)")
    raise ServeFailed(f"the deployment of run {name!r} answered HTTP {response.status_code}")


async def collect(name: str, stream: Stream) -> dict[str, Any]:
    """The whole answer of a stream (`GenerateAnswer`'s fields); 502 when it breaks."""
    tokens: list[int] = []
    text: list[str] = []
    try:
        async for line in stream.lines():
            if line.get("done"):
                return dict(name=name, text="".join(text), tokens=tokens, prompt_tokens=line.get("prompt_tokens", 0),
                            finish_reason=line.get("finish_reason", "length"),
                            routed_members=line.get("routed_members"))
            tokens.append(int(line["token"]))
            text.append(str(line.get("text", "")))
    except StreamBroken:
        raise ServeFailed(f"the replica generating for run {name!r} stopped mid-answer (retry)") from None
    finally:
        await stream.aclose()
    raise ServeFailed(f"the replica generating for run {name!r} stopped mid-answer (retry)")


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event; data is JSON on one line (token text may hold newlines)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def events(name: str, stream: Stream) -> AsyncIterator[bytes]:
    """The stream as server-sent events: `token` per token, then `done` (or `error` if it breaks)."""
    count = 0
    try:
        async for line in stream.lines():
            if line.get("done"):
                yield sse("done", {"tokens": count, "prompt_tokens": line.get("prompt_tokens", 0),
                                   "finish_reason": line.get("finish_reason", "length"),
                                   "routed_members": line.get("routed_members")})
                return
            count += 1
            yield sse("token", {"token": int(line["token"]), "text": str(line.get("text", ""))})
    except StreamBroken:
        yield sse("error", {"detail": f"the replica generating for run {name!r} stopped after {count} tokens "
                                      "(retry)", "tokens": count})
    finally:
        await stream.aclose()
