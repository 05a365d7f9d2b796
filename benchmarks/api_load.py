"""Load on `GET /v1/jobs/{id}`: latency percentiles and requests/s under concurrent clients.

    python benchmarks/api_load.py [--ray-address http://127.0.0.1:8265] [--job-id ID]
        [--clients 50] [--requests 5000] [--seconds 30] [--rounds 2]
        [--single-requests 500] [--out result.json]

Loopback only, bounded: each measured block stops after --requests requests or
--seconds seconds, whichever comes first. Without --ray-address the script starts
its own Ray with `ray start --head` (dashboard + Jobs server, 2 CPUs). The API runs as a
real `uvicorn api.app:app` subprocess (its own cores and GIL), with an API token
set. Without --job-id a tiny Leviathan job is submitted through the API and run to
the end first, so the measured GET reads a finished run's Ray record and its
metrics.jsonl, and no training competes for the CPUs.

Three targets, interleaved round by round under the same client load:
- `api_job`: GET /v1/jobs/{id} (auth, Ray's GET /api/jobs/{id}, metrics summary);
- `ray_job`: Ray's own GET /api/jobs/{id} on the Jobs server: what the API pays Ray;
- `api_floor`: GET /openapi.json (cached by FastAPI): uvicorn + FastAPI with no Ray.
Medians over rounds of p50/p90/p99 (ms) and requests/s, and ratios of api_job to
the other two. JSON to stdout (and --out); progress to stderr.

On one machine a proxied call costs both the API's own work and Ray's, so the
most the API can serve is `ceiling = 1 / (1/floor + 1/ray)` requests/s (floor and
ray: the api_floor and ray_job rates measured in the same run); the figure to
watch is `api_job_rps_over_ceiling` (goal: >= 0.9). Under many closed-loop clients
latency only follows throughput (p50 ~ clients / rate), so each round also runs a
single client against api_job and ray_job: `single_client_api_p50_over_ray_p50`
(goal: <= 1.5) is the latency the API adds to one call. Status calls for one job
share one Ray request in the API and its answer for LEVIATHAN_STATUS_CACHE_S
(default 0.5 s), so the API asks Ray less often than it answers and can pass the
ceiling. A second API server with that cache off (`api_job_uncached`, a proxied
Ray call every time) runs in the same rounds: its ratios are the cost of the hop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import emit_report, machine_info  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_ms) - 1, round(q / 100 * len(sorted_ms) + 0.5) - 1))
    return sorted_ms[k]


async def load(url: str, headers: dict[str, str], clients: int, max_requests: int, max_seconds: float) -> dict:
    """`clients` concurrent connections, each looping GET url until the shared budget ends.

    Every client connects (one unmeasured request) before the clock starts, so the
    block measures requests on open connections, not 50 TCP handshakes at once.
    """
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    issued = 0
    connected = 0
    go = asyncio.Event()
    deadline = float("inf")

    async def client_loop() -> None:
        nonlocal issued, errors, connected
        async with httpx.AsyncClient(headers=headers, timeout=30.0) as c:
            try:
                await c.get(url)
            finally:
                connected += 1
            await go.wait()
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                try:
                    r = await c.get(url)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)

    tasks = [asyncio.create_task(client_loop()) for _ in range(clients)]
    while connected < clients:
        await asyncio.sleep(0.01)
    start = time.perf_counter()
    deadline = start + max_seconds
    go.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "requests": len(lat) + errors,
        "seconds": elapsed,
        "rps": len(lat) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(lat, 50) if lat else None,
        "p90_ms": percentile(lat, 90) if lat else None,
        "p99_ms": percentile(lat, 99) if lat else None,
        "max_ms": lat[-1] if lat else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors,
    }


def start_local_ray(temp_dir: str) -> tuple[str, subprocess.Popen]:
    """A `ray start --head` cluster of our own (dashboard + Jobs server), as users run.

    Its own --temp-dir matters: a job's driver finds its cluster through
    `<temp dir>/ray_current_cluster`, which the default /tmp/ray shares with every
    other Ray on the machine. This interpreter's folder leads PATH so the job's
    `python` is this environment's.
    """
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    dashboard_port = free_port()
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}",
           f"--port={free_port()}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--num-cpus=2", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {head.returncode}")
        try:
            if httpx.get(f"{url}/api/jobs/", headers=ray_headers(), timeout=2).status_code == 200:
                return url, head
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process(head)
    raise RuntimeError("the local Ray dashboard did not come up")


def stop_process(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def ray_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def start_api(ray_address: str, storage: str, token: str, port: int, status_cache_s: float | None = None) -> subprocess.Popen:
    """`uvicorn api.app:app` on loopback; status_cache_s sets LEVIATHAN_STATUS_CACHE_S (None: the environment's)."""
    cache = {} if status_cache_s is None else {"LEVIATHAN_STATUS_CACHE_S": str(status_cache_s)}
    env = {
        **os.environ,
        **cache,
        "LEVIATHAN_RAY_ADDRESS": ray_address,
        "LEVIATHAN_API_TOKEN": token,
        "LEVIATHAN_STORAGE": storage,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    cmd = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--no-access-log"]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env)


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).json().get("ray") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise RuntimeError("the API did not become healthy (is Ray's Jobs server reachable?)")


def run_tiny_job(api: httpx.Client, timeout: float) -> str:
    spec = {
        "name": "api-load",
        "ensemble": {"modules": 1, "members_per_module": 1, "members": [{"preset": "tiny"}],
                     "merge_width": 32, "merge_heads": 2},
        "training": {"phase1_steps": 4, "phase2_steps": 4, "batch_size": 2, "seq_len": 32,
                     "warmup_steps": 1, "eval_interval": 2, "eval_batches": 1, "checkpoint_interval": 2},
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
    }
    deadline = time.monotonic() + 60
    r = api.post("/v1/jobs", json=spec)
    while r.status_code == 503 and time.monotonic() < deadline:  # a fresh cluster's job agent
        time.sleep(2)
        r = api.post("/v1/jobs", json=spec)
    if r.status_code != 201:
        raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text}")
    job_id = r.json()["job_id"]
    log(f"submitted {job_id}; waiting for it to finish")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.get(f"/v1/jobs/{job_id}").json()["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            log(f"{job_id}: {status}")
            if status != "SUCCEEDED":
                log(api.get(f"/v1/jobs/{job_id}/logs", params={"tail": 30}).text)
            return job_id
        time.sleep(1)
    api.post(f"/v1/jobs/{job_id}/stop")
    raise RuntimeError(f"{job_id} did not finish in {timeout:.0f}s")


def machine() -> dict:
    import fastapi
    import ray
    import uvicorn

    return machine_info(
        ray=ray.__version__, fastapi=fastapi.__version__, uvicorn=uvicorn.__version__, httpx=httpx.__version__
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ray-address", help="Ray Jobs server URL on loopback; default: start a local Ray")
    p.add_argument("--job-id", help="job to query; default: run a tiny Leviathan job first")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=5000, help="per measured block")
    p.add_argument("--seconds", type=float, default=30.0, help="per measured block")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--single-requests", type=int, default=500, help="per single-client block")
    p.add_argument("--job-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.ray_address and urlparse(args.ray_address).hostname not in LOOPBACK:
        print("api_load: --ray-address must be on loopback (127.0.0.1)", file=sys.stderr)
        return 2
    if min(args.clients, args.requests, args.rounds, args.single_requests) < 1 or args.seconds <= 0:
        print("api_load: --clients, --requests, --rounds, --single-requests and --seconds must be positive",
              file=sys.stderr)
        return 2

    load_at_start = os.getloadavg()  # the machine is shared: note what else ran
    own_ray = args.ray_address is None
    head = ray_temp = None
    if own_ray:
        ray_temp = tempfile.mkdtemp(prefix="lvray-", dir="/tmp")  # short: Ray's socket paths live here
        ray_address, head = start_local_ray(ray_temp)
    else:
        ray_address = args.ray_address.rstrip("/")
    token = secrets.token_urlsafe(24)
    port, uncached_port = free_port(), free_port()
    base, uncached_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{uncached_port}"
    auth = {"Authorization": f"Bearer {token}"}
    with tempfile.TemporaryDirectory(prefix="api-load-") as storage:
        proc = start_api(ray_address, storage, token, port)
        uncached = start_api(ray_address, storage, token, uncached_port, status_cache_s=0)
        try:
            wait_healthy(base, proc)
            wait_healthy(uncached_base, uncached)
            with httpx.Client(base_url=base, headers=auth, timeout=60) as api:
                job_id = args.job_id or run_tiny_job(api, args.job_timeout)
                detail = api.get(f"/v1/jobs/{job_id}")
                if detail.status_code != 200:
                    print(f"api_load: GET /v1/jobs/{job_id} answered {detail.status_code}", file=sys.stderr)
                    return 2
            targets = {
                "api_job": (f"{base}/v1/jobs/{job_id}", auth),
                "api_job_uncached": (f"{uncached_base}/v1/jobs/{job_id}", auth),
                "ray_job": (f"{ray_address}/api/jobs/{job_id}", ray_headers()),
                "api_floor": (f"{base}/openapi.json", auth),
            }
            blocks = [(name, args.clients, args.requests) for name in targets]
            blocks += [(f"{name}_single", 1, args.single_requests) for name in ("api_job", "api_job_uncached", "ray_job")]
            rounds: dict[str, list[dict]] = {name: [] for name, _, _ in blocks}
            for i in range(args.rounds):
                for name, clients, requests in blocks:
                    url, headers = targets[name.removesuffix("_single")]
                    res = asyncio.run(load(url, headers, clients, requests, args.seconds))
                    rounds[name].append(res)
                    log(f"round {i} {name}: {res['rps']:.0f} req/s, p50 {res['p50_ms']:.1f} ms, "
                        f"p99 {res['p99_ms']:.1f} ms, statuses {res['statuses']}, errors {res['errors']}")
        finally:
            stop_process(proc)
            stop_process(uncached)
            if head is not None:
                stop_process(head)
                shutil.rmtree(ray_temp, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    summary = {
        name: {key: med(name, key) for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms")}
        for name in rounds
    }
    ceiling = 1 / (1 / summary["api_floor"]["rps"] + 1 / summary["ray_job"]["rps"])
    result = {
        "benchmark": "api_load",
        "machine": machine(),
        "setup": {
            "endpoint": "GET /v1/jobs/{id}",
            "job_id": job_id,
            "job_detail": detail.json(),
            "clients": args.clients,
            "single_client_requests_per_block": args.single_requests,
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
            "max_requests_per_block": args.requests,
            "max_seconds_per_block": args.seconds,
            "rounds": args.rounds,
            "own_ray": own_ray,
            "status_cache_s": {"api_job": os.environ.get("LEVIATHAN_STATUS_CACHE_S", "default (0.5)"), "api_job_uncached": 0},
        },
        "median_over_rounds": summary,
        "ceiling_rps": ceiling,
        "ratios": {
            "api_job_rps_over_ceiling": summary["api_job"]["rps"] / ceiling,
            "api_job_uncached_rps_over_ceiling": summary["api_job_uncached"]["rps"] / ceiling,
            "single_client_api_p50_over_ray_p50": (
                summary["api_job_single"]["p50_ms"] / summary["ray_job_single"]["p50_ms"]
            ),
            "single_client_api_uncached_p50_over_ray_p50": (
                summary["api_job_uncached_single"]["p50_ms"] / summary["ray_job_single"]["p50_ms"]
            ),
            "api_job_p50_over_ray_job_p50": summary["api_job"]["p50_ms"] / summary["ray_job"]["p50_ms"],
            "api_job_rps_over_ray_job_rps": summary["api_job"]["rps"] / summary["ray_job"]["rps"],
            "api_job_rps_over_api_floor_rps": summary["api_job"]["rps"] / summary["api_floor"]["rps"],
        },
        "rounds": rounds,
    }
    return emit_report(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
