"""Strict JSON request bodies, and error answers that never echo much of what was sent.

Python's `json.loads` is lenient where a job spec must not be: it accepts the
`NaN` / `Infinity` literals, turns `1e400` into `inf`, keeps the last of two
equal keys, and nests until the interpreter's recursion limit. `parse_body`
refuses each of these with a 422 that names the field, so no non-finite number
reaches validation and no error answer has to carry one (JSON cannot).

Every rejected value travels back only as a short preview (`preview`), so a
1 MiB field costs the caller a 1 MiB request, not a 1 MiB answer.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import HTTPException, Request
from fastapi.routing import APIRoute

MAX_DEPTH = 32  # objects/arrays inside each other; a JobSpec needs 4
MAX_NUMBER_DIGITS = 64  # longer numerals are no sensible setting
PREVIEW_CHARS = 64  # how much of a rejected value an error may quote
MAX_ERRORS = 20  # errors listed in one 422
MAX_MESSAGE_CHARS = 300


class _Unrepresentable:
    """A numeral JSON responses cannot carry (NaN, Infinity, 1e400) or too long to be a setting."""

    def __init__(self, text: str) -> None:
        self.text = text


class _Object(dict):
    """A JSON object that remembers which of its keys appeared more than once."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _float(text: str) -> float | _Unrepresentable:
    if len(text) > MAX_NUMBER_DIGITS:
        return _Unrepresentable(text)
    x = float(text)
    return x if math.isfinite(x) else _Unrepresentable(text)


def _int(text: str) -> int | _Unrepresentable:
    return int(text) if len(text) <= MAX_NUMBER_DIGITS else _Unrepresentable(text)


def _error(loc: tuple, kind: str, msg: str, value: Any = None) -> dict[str, Any]:
    return {"type": kind, "loc": ["body", *loc], "msg": msg, "input": preview(value)}


def _problems(doc: Any) -> list[dict[str, Any]]:
    """Non-finite or overlong numbers, duplicate keys and over-deep nesting, each at its path."""
    errors: list[dict[str, Any]] = []
    stack: list[tuple[Any, tuple, int]] = [(doc, (), 0)]
    while stack and len(errors) < MAX_ERRORS:
        value, loc, depth = stack.pop()
        if isinstance(value, _Unrepresentable):
            errors.append(_error(loc, "finite_number",
                                 f"Input should be a finite number of at most {MAX_NUMBER_DIGITS} characters",
                                 value.text))
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                errors.append(_error(loc, "too_deep", f"JSON nested deeper than {MAX_DEPTH} levels"))
                continue
            if isinstance(value, _Object):
                errors += [_error((*loc, k), "duplicate_key", "key given more than once", k)
                           for k in value.duplicates]
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack += [(v, (*loc, k), depth + 1) for k, v in items]
    return errors[:MAX_ERRORS]


def parse_body(raw: bytes) -> Any:
    """The request body as JSON, or HTTPException(422) listing what is wrong where.

    The 422 has FastAPI's validation shape (`detail: [{type, loc, msg, input}]`).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPException(422, [_error((), "json_invalid", f"body is not UTF-8 text (byte {e.start})")]) from None
    try:
        doc = json.loads(text, object_pairs_hook=_object, parse_float=_float, parse_int=_int,
                         parse_constant=_Unrepresentable)
    except json.JSONDecodeError as e:
        raise HTTPException(422, [_error((e.pos,), "json_invalid", f"JSON decode error: {e.msg}")]) from None
    except RecursionError:
        raise HTTPException(422, [_error((), "too_deep", f"JSON nested deeper than {MAX_DEPTH} levels")]) from None
    errors = _problems(doc)
    if errors:
        raise HTTPException(422, errors)
    return doc


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_body(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by `parse_body` (FastAPI's custom-route hook)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


# ----------------------------------------------------------------------------- safe echoes


def shorten(text: str, limit: int = PREVIEW_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def preview(value: Any) -> Any:
    """A rejected value as an error may quote it: small, JSON-safe, at most a short prefix."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**MAX_NUMBER_DIGITS else shorten(str(value))
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray)):
        return shorten(bytes(value[: PREVIEW_CHARS * 4]).decode("utf-8", errors="replace"))
    if isinstance(value, str):
        return shorten(value)
    if isinstance(value, _Unrepresentable):
        return shorten(value.text)
    try:  # containers: a prefix of their compact JSON
        text = json.dumps(value, default=repr, separators=(",", ":"))
    except (ValueError, RecursionError):
        text = repr(type(value))
    return shorten(text)


def safe_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors cut down to what a caller needs: type, loc, msg, a preview of the input."""
    out = []
    for e in list(errors)[:MAX_ERRORS]:
        item = {
            "type": str(e.get("type", "value_error")),
            "loc": [x if isinstance(x, int) else shorten(str(x)) for x in e.get("loc", ())],
            "msg": shorten(str(e.get("msg", "")), MAX_MESSAGE_CHARS),
        }
        if "input" in e:
            item["input"] = preview(e["input"])
        out.append(item)
    return out
