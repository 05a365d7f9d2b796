"""Serving throughput: a run on Ray Serve at 1, 8 and 32 concurrent clients against
the CLI's single-process generate, side by side in one run.

    python benchmarks/serving.py --run NAME --storage ROOT --replicas 1 --tokens 32

Joins the cluster at RAY_ADDRESS (else starts a local Ray), deploys the run with
`leviathan serve-model`'s own code, and sends N concurrent requests (one per client,
distinct seeds) straight to Serve's HTTP proxy, streaming. Figures per N: generated
tokens per second over the wall time of all N requests, and p50 / p99 time to first
token. The CLI row runs `jobs.generate.generate_text` (which loads final/ and
decodes one request, every member every token) N times one after another in this
process, as N users of the CLI on one machine would wait for each other; it does
not stream, so its "first token" is its whole answer, and each call loads final/
first, as the command does. The `decode_only` row is the same decode with final/
loaded once (`ensemble.generate` per request): what batching alone adds. The
deployment is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit_report, machine_info  # noqa: E402
from jobs import serve_model  # noqa: E402
from jobs.evaluate import load_final  # noqa: E402
from jobs.generate import generate_text  # noqa: E402
from leviathan.run.folder import RunFolder  # noqa: E402
from leviathan.run.serving import app_name  # noqa: E402

PROMPT = "def main():\n    "


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, tokens: int, seed: int) -> tuple[float, int]:
    """(time to first token, tokens received) of one streamed request."""
    start, first, count = time.perf_counter(), None, 0
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "seed": seed}
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.strip() and "token" in json.loads(line):
                first = first if first is not None else time.perf_counter() - start
                count += 1
    return (first if first is not None else float("nan")), count


async def served(url: str, clients: int, tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, tokens, seed) for seed in range(clients)))
        wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    return {"tokens_per_s": round(sum(r[1] for r in results) / wall, 1), "ttft_p50_s": round(percentile(ttft, 0.5), 3),
            "ttft_p99_s": round(percentile(ttft, 0.99), 3), "wall_s": round(wall, 2)}


def cli(run_dir: str, clients: int, tokens: int) -> dict[str, float]:
    done: list[float] = []
    start = time.perf_counter()
    for seed in range(clients):
        generate_text(run_dir, PROMPT, max_new_tokens=tokens, seed=seed)
        done.append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    return {"tokens_per_s": round(clients * tokens / wall, 1), "ttft_p50_s": round(percentile(done, 0.5), 3),
            "ttft_p99_s": round(percentile(done, 0.99), 3), "wall_s": round(wall, 2)}


def decode_only(run_dir: str, clients: int, tokens: int) -> dict[str, float]:
    """The CLI's decode without its per-call load: final/ loaded once, then `generate` per request."""
    import torch

    ensemble, tokenizer = load_final(run_dir)
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    done: list[float] = []
    start = time.perf_counter()
    for seed in range(clients):
        ensemble.generate(idx, tokens, generator=torch.Generator().manual_seed(seed))
        done.append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    return {"tokens_per_s": round(clients * tokens / wall, 1), "ttft_p50_s": round(percentile(done, 0.5), 3),
            "ttft_p99_s": round(percentile(done, 0.99), 3), "wall_s": round(wall, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run name")
    p.add_argument("--storage", required=True, help="storage root holding the run")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--tokens", type=int, default=32, help="max_new_tokens of every request")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--max-ongoing-requests", type=int, default=32)
    p.add_argument("--http-port", type=int, default=8011)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")
    argv = ["--run", args.run, "--storage", args.storage, "--replicas", str(args.replicas),
            "--num-cpus", str(args.num_cpus), "--max-ongoing-requests", str(args.max_ongoing_requests),
            "--http-port", str(args.http_port)]
    if serve_model.main(argv) != 0:
        return 2
    url = f"http://127.0.0.1:{args.http_port}/runs/{args.run}/generate"
    run_dir = RunFolder.of(args.storage, args.run).root
    rows = []
    try:
        asyncio.run(served(url, 1, 4))  # warm the replicas and the proxy
        for n in (int(c) for c in args.clients.split(",")):
            rows.append({"clients": n, "serve": asyncio.run(served(url, n, args.tokens)),
                         "cli_generate": cli(run_dir, n, args.tokens),
                         "decode_only": decode_only(run_dir, n, args.tokens)})
    finally:
        serve.delete(app_name(args.run))
    for row in rows:
        for base in ("cli_generate", "decode_only"):
            row[f"speedup_vs_{base}"] = round(row["serve"]["tokens_per_s"] / row[base]["tokens_per_s"], 2)
    report = {"machine": machine_info(load_avg=os.getloadavg()), "run": args.run, "tokens": args.tokens,
              "replicas": args.replicas, "max_ongoing_requests": args.max_ongoing_requests, "rows": rows}
    return emit_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
