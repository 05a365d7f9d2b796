"""Serving a trained run on Ray Serve and `POST /v1/runs/{name}/generate`.

In-process (no Ray): the route's 422s name their field, an unknown run is 404, an
unreachable Serve is 503, and `serve-model` refuses bad flags and a run without
final/ in one line. Live (slow): the session's trained run deployed with two
replicas of one request each, two concurrent SSE streams through a real uvicorn
API, one replica killed mid-stream: its client gets a clean `error` event, the other
stream finishes with all its tokens.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs import serve_model
from jobs.evaluate import load_final
from jobs.generate import generate_text
from leviathan.run.folder import RunFolder
from leviathan.run.serving import app_name
from tests.conftest import free_port
from tests.test_api_support import LiveServer, in_process, make_settings, memory_settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _run_folder(storage: Path, name: str) -> None:
    folder = Path(RunFolder.of(str(storage), name).root)
    folder.mkdir(parents=True)
    Path(RunFolder(str(folder)).spec).write_text("{}")


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.anyio
@pytest.mark.parametrize("field, value", [("max_new_tokens", 101), ("max_new_tokens", 0), ("temperature", -0.5),
                                          ("top_k", 0), ("k", 0), ("every", 0), ("seed", -1)])
async def test_generate_rejects_a_bad_field_with_422_naming_it(tmp_path, field: str, value: Any) -> None:
    _run_folder(tmp_path, "served")
    async with in_process(memory_settings(tmp_path, serve_url=_closed_port_url(), max_new_tokens=100)) as client:
        response = await client.post("/v1/runs/served/generate", json={"prompt": "a", field: value})
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["body", field]]


@pytest.mark.anyio
@pytest.mark.parametrize("body", [b"\xa5C\xb5)", b'{"prompt": "a", "prompt": "b"}', b'{"temperature": NaN}'])
async def test_generate_bodies_that_are_not_strict_json_are_422(tmp_path, body: bytes) -> None:
    _run_folder(tmp_path, "served")
    async with in_process(memory_settings(tmp_path, serve_url=_closed_port_url())) as client:
        response = await client.post("/v1/runs/served/generate", content=body,
                                     headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text


@pytest.mark.anyio
async def test_generate_for_an_unknown_run_is_404_and_for_an_unreachable_serve_503(tmp_path) -> None:
    _run_folder(tmp_path, "served")
    async with in_process(memory_settings(tmp_path, serve_url=_closed_port_url())) as client:
        missing = await client.post("/v1/runs/nothere/generate", json={"prompt": "a"})
        unreachable = await client.post("/v1/runs/served/generate", json={"prompt": "a"})
    assert missing.status_code == 404 and "no run 'nothere'" in missing.json()["detail"]
    assert unreachable.status_code == 503, unreachable.text
    assert "unreachable" in unreachable.json()["detail"]


def test_serve_model_refuses_bad_flags_and_a_run_without_final(tmp_path, capsys) -> None:
    _run_folder(tmp_path, "training")
    cases = [(["--run", "training", "--replicas", "0"], "--replicas: must be >= 1"),
             (["--run", "training", "--num-gpus", "-1"], "--num-gpus: must be >= 0"),
             (["--run", "Bad/Name"], "--run: a run name must match"),
             (["--run", "training"], "no final/ folder")]
    for argv, message in cases:
        assert serve_model.main([*argv, "--storage", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def _decode_all(run: Path, requests: list) -> list[str]:
    from cluster.serving import BatchDecode

    ensemble, tokenizer = load_final(run)
    decode = BatchDecode(ensemble.eval(), tokenizer, requests)
    texts = [""] * len(requests)
    while not decode.finished:
        for i, line in enumerate(decode.step()):
            texts[i] += line["text"] if line else ""
    return texts


def test_a_batch_decodes_each_request_as_the_cli_generates_it(tmp_path, small_corpus) -> None:
    """Requests of equal and unequal prompt lengths, lengths and samplers share one batch; each
    gets the CLI's text for its seed, and k = M (no routing) is the merged model."""
    from cluster.serving import SampleRequest
    from tests.test_evaluate_job import make_run

    run = make_run(tmp_path, small_corpus, merge="mixture")
    requests = [SampleRequest(prompt="def f(x):", max_new_tokens=40, seed=3),  # past the block size (32)
                SampleRequest(prompt="import os", max_new_tokens=12, seed=4, top_k=5),
                SampleRequest(prompt="def g(y):", max_new_tokens=20, temperature=0.0),
                SampleRequest(prompt="", max_new_tokens=8, seed=2, k=4, every=4)]
    texts = _decode_all(run, requests)
    for r, text in zip(requests, texts):
        assert text == generate_text(run, r.prompt, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                     top_k=r.top_k, seed=r.seed), r


def test_a_routed_request_runs_its_own_decoder_and_keeps_its_seed(tmp_path, small_corpus) -> None:
    from cluster.serving import SampleRequest
    from tests.test_evaluate_job import make_run

    run = make_run(tmp_path, small_corpus, merge="mixture")
    routed = SampleRequest(prompt="class A:", max_new_tokens=16, seed=7, k=2, every=4)
    alone = _decode_all(run, [routed])[0]
    shared = _decode_all(run, [routed, SampleRequest(prompt="x", max_new_tokens=3, seed=1)])[0]
    assert alone and alone == shared, (alone, shared)


# ----------------------------------------------------------------------------- live: Ray Serve + uvicorn


def _sse_events(client: httpx.Client, name: str, body: dict[str, Any], events: list[tuple[str, dict]],
                started: threading.Event) -> None:
    """Read one SSE stream into `events`, setting `started` at its first token."""
    with client.stream("POST", f"/v1/runs/{name}/generate", json=body,
                       headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200, response.read()
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind is not None:
                events.append((kind, json.loads(line[len("data: "):])))
                started.set()
    started.set()


def _kill_one_replica(ray_cluster, name: str) -> None:
    import ray
    from ray.util.state import list_actors

    replicas = [a for a in list_actors(address=ray_cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
                if a.class_name.startswith(f"ServeReplica:{app_name(name)}:")]
    assert len(replicas) == 2, [a.class_name for a in replicas]
    ray.kill(ray.get_actor(replicas[0].name, namespace=replicas[0].ray_namespace), no_restart=True)


def test_a_killed_replica_gives_its_stream_a_clean_error_while_the_other_finishes(
    ray_cluster, trained_run, tmp_path
) -> None:
    from ray import serve

    name, storage = trained_run.run.name, trained_run.run.parent
    port = free_port()
    assert serve_model.main(["--run", name, "--storage", str(storage), "--replicas", "2", "--num-cpus", "0.25",
                             "--max-ongoing-requests", "1", "--http-port", str(port)]) == 0
    serve_url = f"http://127.0.0.1:{port}"
    try:
        settings = make_settings(ray_cluster, storage, serve_url=serve_url, max_new_tokens=4000)
        with LiveServer(settings) as server, server.client(timeout=60) as api:
            plain = api.post(f"/v1/runs/{name}/generate", json={"prompt": "def ", "max_new_tokens": 5, "seed": 1})
            assert plain.status_code == 200, plain.text
            assert len(plain.json()["tokens"]) == 5 and plain.json()["routed_members"] is None

            wanted = 600  # long enough that both streams are mid-way when one replica dies
            streams = [([], threading.Event()) for _ in range(2)]
            threads = [threading.Thread(target=_sse_events, daemon=True,
                                        args=(api, name, {"prompt": "import ", "max_new_tokens": wanted, "seed": i},
                                              events, started))
                       for i, (events, started) in enumerate(streams)]
            for t in threads:
                t.start()
            for _, started in streams:
                assert started.wait(60), "a stream sent no token"
            _kill_one_replica(ray_cluster, name)
            for t in threads:
                t.join(120)
                assert not t.is_alive(), "a stream hung after the replica was killed"

        endings = sorted(events[-1][0] for events, _ in streams)
        assert endings == ["done", "error"], endings
        survivor = next(events for events, _ in streams if events[-1][0] == "done")
        broken = next(events for events, _ in streams if events[-1][0] == "error")
        assert sum(kind == "token" for kind, _ in survivor) == wanted == survivor[-1][1]["tokens"]
        detail = broken[-1][1]["detail"]
        assert "stopped after" in detail and "Traceback" not in detail, detail
        assert broken[-1][1]["tokens"] < wanted

        ghost_storage = tmp_path / "runs"
        _run_folder(ghost_storage, "undeployed")
        with LiveServer(make_settings(ray_cluster, ghost_storage, serve_url=serve_url)) as other, \
                other.client() as api:
            undeployed = api.post("/v1/runs/undeployed/generate", json={"prompt": "a"})
        assert undeployed.status_code == 404 and "has no deployment" in undeployed.json()["detail"]
    finally:
        serve.delete(app_name(name))
        serve.shutdown()
