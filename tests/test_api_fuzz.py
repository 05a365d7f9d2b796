"""Hypothesis fuzz of POST /v1/jobs: malformed specs get 422 (bad bodies 4xx), never 5xx.

Each example takes the valid tiny spec and breaks it one way: an unknown key, a
wrong type, an out-of-range number, a null, a section that is not an object, a
body that is not an object, inconsistent shapes, or bytes that are not JSON.
Every string field (and every string inside a list, and unknown keys) also gets
text with a lone surrogate (`"\\ud800"` in the JSON): not Unicode, so a 422 at
that field whose echo of the input is still encodable, never a 500.
A second test writes JSON text that Python's json module would accept but a spec
must not: non-finite numbers and huge exponents or numerals, deep nesting,
non-UTF-8 bytes inside a string, and duplicate keys (422 naming the field, not
last-one-wins).
The field list and bounds are read from the JobSpec models themselves, so new
fields are fuzzed too. Requests go to the in-process app (ASGI, no sockets) so
300 examples take seconds; the app talks to the session's real Ray and has
`max_concurrent_jobs = 0`, so a spec that wrongly passed validation would answer
429, not 422, and fail the test without training anything.
"""

from __future__ import annotations

import copy
import json
import re
import types
import typing
from typing import Any, Literal

import annotated_types
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic.fields import FieldInfo

from api.app import create_app
from jobs.spec import (
    RUN_NAME_PATTERN, DataSpec, EnsembleSpec, JobSpec, MemberSpec, ResourcesSpec, TrackingSpec, TrainingSpec,
)
from tests.test_api_support import API_TOKEN, make_settings, tiny_spec

BASE = tiny_spec("fuzz")
SECTIONS = {"data": DataSpec, "ensemble": EnsembleSpec, "training": TrainingSpec, "resources": ResourcesSpec,
            "tracking": TrackingSpec}
# Strings pydantic would read as numbers or booleans.
NUMBER_WORDS = {"nan", "inf", "infinity", "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n"}


def _fields() -> list[tuple[tuple, str, FieldInfo]]:
    out = [((), n, f) for n, f in JobSpec.model_fields.items() if n not in SECTIONS]
    for sec, model in SECTIONS.items():
        out += [((sec,), n, f) for n, f in model.model_fields.items()]
    out += [(("ensemble", "members", 0), n, f) for n, f in MemberSpec.model_fields.items()]
    return out


FIELDS = _fields()


def _base_type(f: FieldInfo) -> tuple[Any, bool]:
    """(annotation without None, nullable)."""
    ann = f.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(ann))
    return ann, False


def _bounds(f: FieldInfo) -> dict[str, float]:
    out = {}
    for m in f.metadata:
        for kind in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(annotated_types, kind.capitalize())):
                out[kind] = getattr(m, kind)
    return out


def _set(spec: dict, path: tuple, value: Any) -> dict:
    spec = copy.deepcopy(spec)
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    return spec


containers = st.one_of(
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=3)
)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8).filter(
    lambda s: s not in NUMBER_WORDS
)


def wrong_value(f: FieldInfo, name: str) -> st.SearchStrategy:
    ann, _ = _base_type(f)
    if name == "name":
        return st.one_of(st.integers(), containers, st.text(max_size=80).filter(
            lambda s: not re.fullmatch(RUN_NAME_PATTERN, s)))
    if typing.get_origin(ann) is Literal:
        return st.one_of(st.integers(), containers, words.filter(lambda s: s not in typing.get_args(ann)))
    if ann is bool:
        return st.one_of(st.integers(min_value=2), st.floats(0.1, 0.9), containers)
    if ann is int:
        return st.one_of(words, containers, st.floats(0.1, 0.9).map(lambda x: x + 3))
    if ann is float:
        return st.one_of(words, containers)
    if ann is str:
        return st.one_of(st.integers(), st.booleans(), containers)
    if typing.get_origin(ann) is list:  # members, domains
        return st.one_of(st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                         st.lists(st.integers(), min_size=1, max_size=3))
    raise AssertionError(f"no wrong values for {name}: {ann}")


def out_of_range(f: FieldInfo) -> st.SearchStrategy | None:
    ann, _ = _base_type(f)
    b = _bounds(f)
    if not b or ann not in (int, float):
        return None
    options = []
    if ann is int:
        if "ge" in b:
            options.append(st.integers(max_value=int(b["ge"]) - 1))
        if "gt" in b:
            options.append(st.integers(max_value=int(b["gt"])))
        if "le" in b:
            options.append(st.integers(min_value=int(b["le"]) + 1))
    else:
        finite = dict(allow_nan=False, allow_infinity=False)
        if "ge" in b:
            options.append(st.floats(max_value=b["ge"], exclude_max=True, **finite))
        if "gt" in b:
            options.append(st.floats(max_value=b["gt"], **finite))
        if "le" in b:
            options.append(st.floats(min_value=b["le"], exclude_min=True, **finite))
    return st.one_of(options)


def _field_mutations() -> list[st.SearchStrategy]:
    out = []
    for path, name, f in FIELDS:
        out.append(wrong_value(f, name).map(lambda v, p=path + (name,): _set(BASE, p, v)))
        rng = out_of_range(f)
        if rng is not None:
            out.append(rng.map(lambda v, p=path + (name,): _set(BASE, p, v)))
        if not _base_type(f)[1]:
            out.append(st.just(_set(BASE, path + (name,), None)))
    return out


object_paths = [(), ("data",), ("ensemble",), ("training",), ("resources",), ("tracking",), ("ensemble", "members", 0)]
known = {n for _, n, _ in FIELDS} | set(SECTIONS)
unknown_key = st.tuples(
    st.sampled_from(object_paths), st.text(min_size=1, max_size=12).filter(lambda k: k not in known),
    st.one_of(st.integers(), st.text(max_size=5), st.none()),
).map(lambda t: _set(BASE, t[0] + (t[1],), t[2]))
bad_section = st.tuples(
    st.sampled_from(sorted(SECTIONS)), st.one_of(st.integers(), words, st.lists(st.integers(), max_size=2))
).map(lambda t: _set(BASE, (t[0],), t[1]))
not_an_object = st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3))
inconsistent = st.one_of(
    # members: neither members_per_module nor modules * members_per_module entries
    st.integers(3, 6).map(lambda n: _set(BASE, ("ensemble", "members"), [{"preset": "tiny"}] * n)),
    st.integers(1, 8).filter(lambda h: 32 % h).map(lambda h: _set(BASE, ("ensemble", "merge_heads"), h)),
    st.integers(2, 8).map(lambda w: _set(BASE, ("resources", "workers"), w)),
    st.lists(words, min_size=0, max_size=0).map(lambda d: _set(_set(BASE, ("ensemble", "modules"), 2),
                                                               ("data", "domains"), ["only-one"])),
)


def _is_text(ann: Any) -> bool:
    return ann is str or (typing.get_origin(ann) is Literal and all(isinstance(a, str) for a in typing.get_args(ann)))


def _string_paths() -> list[tuple]:
    """Where a spec holds text: each str or string-Literal field, and the first item of each list of str."""
    out = []
    for path, name, f in FIELDS:
        ann, _ = _base_type(f)
        if _is_text(ann):
            out.append(path + (name,))
        elif typing.get_origin(ann) is list and _is_text(typing.get_args(ann)[0]):
            out.append(path + (name, 0))
    return out


STRING_PATHS = _string_paths()
lone_surrogate = st.integers(0xD800, 0xDFFF).map(chr)
with_surrogate = st.tuples(st.text(max_size=6), lone_surrogate, st.text(max_size=6)).map("".join)
surrogate_in_field = st.tuples(st.sampled_from(STRING_PATHS), with_surrogate).map(
    lambda t: (t[0], _set(BASE, t[0], t[1]))
)
surrogate_key = st.tuples(st.sampled_from(object_paths), with_surrogate).map(
    lambda t: (None, _set(BASE, t[0] + (t[1],), 1))
)
json_spec = st.one_of(*_field_mutations(), unknown_key, bad_section, not_an_object, inconsistent)


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, UnicodeDecodeError):
        return False


not_json = st.binary(max_size=40).filter(lambda b: not _is_json_object(b))


@pytest.fixture(scope="module")
def app_client(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("fuzz-runs")
    app = create_app(make_settings(ray_cluster, storage, max_concurrent_jobs=0))
    with TestClient(app, headers={"Authorization": f"Bearer {API_TOKEN}"}) as client:
        yield client, storage


def test_fuzz_list_covers_every_spec_field():
    # Guards the generator itself: each field has a wrong value, bounded ones a range, text a surrogate.
    assert {("name",), ("data", "domains", 0), ("tracking", "experiment"), ("ensemble", "members", 0, "flavour")} \
        <= set(STRING_PATHS)
    assert len(STRING_PATHS) >= 12, STRING_PATHS  # every text field of the spec as it stands
    assert len(FIELDS) == sum(len(m.model_fields) for m in (JobSpec, *SECTIONS.values(), MemberSpec)) - len(SECTIONS)
    assert sum(out_of_range(f) is not None for _, _, f in FIELDS) >= 20


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(json_spec.map(lambda b: ("json", b)), not_json.map(lambda b: ("bytes", b)),
                      st.one_of(surrogate_in_field, surrogate_key).map(lambda c: ("surrogate", c))))
def test_malformed_specs_are_rejected_with_4xx_never_5xx(app_client, body):
    client, storage = app_client
    kind, payload = body
    if kind == "surrogate":  # json.dumps escapes it as \\udxxx; httpx's json= could not encode it at all
        loc, spec = payload
        r = client.post("/v1/jobs", content=json.dumps(spec).encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (spec, r.status_code, r.text)
        if loc is not None:
            assert ["body", *loc] in [e["loc"] for e in r.json()["detail"]], (loc, r.text)
    elif kind == "json":
        r = client.post("/v1/jobs", json=payload)
        assert r.status_code == 422, (payload, r.status_code, r.text)
        assert all(e["loc"][0] == "body" for e in r.json()["detail"]), r.text
    else:
        r = client.post("/v1/jobs", content=payload, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (payload, r.status_code, r.text)
    assert not any(storage.iterdir()), "a rejected spec left a run folder"


# ----------------------------------------------------------------------------- JSON text json.loads lets through

RAW = "__raw_value__"


def _text_with(path: tuple, raw: bytes) -> bytes:
    """The tiny spec as JSON text with the value at `path` replaced by `raw` verbatim."""
    return json.dumps(_set(BASE, path, RAW)).encode().replace(json.dumps(RAW).encode(), raw)


def _node(spec: dict, path: tuple) -> Any:
    for key in path:
        spec = spec[key]
    return spec


def _text_with_duplicate(path: tuple, key: str, value: Any) -> bytes:
    """The tiny spec as JSON text whose object at `path` holds `key` twice, with equal values."""
    text = json.dumps(_set(_set(BASE, path + (key,), value), path + (RAW,), value))
    return text.replace(json.dumps(RAW), json.dumps(key)).encode()


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


value_paths = [path + (name,) for path, name, _ in FIELDS]
numeral = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E309"]),
    st.integers(309, 100_000).map(lambda e: f"1e{e}"),
    st.integers(309, 100_000).map(lambda e: f"-9.5e+{e}"),
    st.integers(65, 6000).map(lambda n: "1" * n),  # no setting needs it; past 4300 digits int() fails
)
non_finite = st.tuples(st.sampled_from(value_paths), numeral).map(
    lambda t: (t[0], _text_with(t[0], t[1].encode()))
)
nesting = st.tuples(st.integers(33, 5000), st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")])).map(
    lambda t: t[1][0] * t[0] + b"0" + t[1][1] * t[0]
)
deep = st.tuples(st.sampled_from(value_paths), nesting).map(lambda t: (None, _text_with(t[0], t[1])))
not_utf8 = st.tuples(
    st.sampled_from([("name",), ("data", "manifest"), ("storage",), ("data", "domains", 0)]),
    st.binary(min_size=1, max_size=8).filter(_not_utf8),
).map(lambda t: (None, _text_with(t[0], b'"' + t[1] + b'"')))
def _present(path: tuple) -> bool:
    try:
        return isinstance(_node(BASE, path), dict)
    except (KeyError, IndexError):
        return False


# Every key of every object the tiny spec has (tables it leaves out, such as tracking, hold none).
DUPLICATES = [(p, k, v) for p in object_paths if p != ("data",) and _present(p) for k, v in _node(BASE, p).items()]
DUPLICATES.append((("data",), "manifest", "builtin"))
duplicate = st.sampled_from(DUPLICATES).map(lambda t: (t[0] + (t[1],), _text_with_duplicate(*t)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.one_of(non_finite, deep, not_utf8, duplicate))
def test_json_the_stdlib_would_accept_is_422_naming_the_field(app_client, case):
    client, storage = app_client
    loc, raw = case
    r = client.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, (raw[:200], r.status_code, r.text[:500])
    errors = r.json()["detail"]
    assert len(r.content) < 4096, len(r.content)
    if loc is not None:
        assert ["body", *loc] in [e["loc"] for e in errors], (raw[:200], errors)
    assert not any(storage.iterdir()), "a rejected spec left a run folder"


@pytest.mark.parametrize("path", value_paths, ids=lambda p: ".".join(map(str, p)))
def test_every_field_refuses_non_finite_numbers(app_client, path):
    # Fields without an upper bound (grad_clip, say) would take +inf if it got through.
    client, _ = app_client
    for raw in (b"1e400", b"Infinity", b"-Infinity", b"NaN"):
        r = client.post("/v1/jobs", content=_text_with(path, raw), headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (path, raw, r.status_code, r.text[:300])
        assert ["body", *path] in [e["loc"] for e in r.json()["detail"]], (path, raw, r.text)
