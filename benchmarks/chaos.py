"""Chaos: the demo-sized run under injected faults, each survived or not, against a clean run.

    python benchmarks/chaos.py --seed 0                 # the demo spec, every fault
    python benchmarks/chaos.py --scale 0.2 --faults worker_members,driver_resume

One local Ray cluster (head with dashboard, token auth), a moto S3 server
behind a forwarder that can cut it off, and per fault one run of the spec
(name `chaos-<fault>`) that gets the fault at a step drawn from the seed:

- `worker_members` / `worker_merge`: SIGKILL one Ray Train worker in phase 1 / 2;
- `driver_resume`:  SIGKILL the driver in phase 1, then `python -m jobs.train --resume`;
- `api_restart`:    the run is submitted through the REST API, which is SIGKILLed
                    and started again mid-run; the job must finish and the new
                    API must serve its status and metrics;
- `mlflow_restart`: tracking to a real `mlflow server`, killed and started again;
- `store_pause`:    the run folder on S3, the store cut off for `--outage-s` seconds.

The table: fault, when (phase and step), survived, steps replayed, the final
merged figures against the clean run of the same seed (bit-identical or not),
and metric lines lost (clean run's (phase, step, member) lines missing from the
faulted run's metrics.jsonl; for `mlflow_restart`, also tracked points missing
from MLflow). JSON report on stdout (and `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import emit_report, machine_info  # noqa: E402
from jobs.spec import JobSpec, load_spec  # noqa: E402
from leviathan.run import storage  # noqa: E402
from leviathan.run.records import parse_lines  # noqa: E402
from tests.scripts.proxy import PausableProxy  # noqa: E402

FAULTS = ("worker_members", "worker_merge", "driver_resume", "api_restart", "mlflow_restart", "store_pause")
BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": "chaos", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def answers(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


class Services:
    """The Ray head, the S3 store and the environment every driver and the API get."""

    def __init__(self, work: Path):
        from moto.server import ThreadedMotoServer

        self.work = work
        token_file = Path.home() / ".ray" / "auth_token"
        if not token_file.is_file():
            token_file.parent.mkdir(parents=True, exist_ok=True)
            token_file.write_text(secrets.token_hex(32))
        self.ray_token = token_file.read_text().strip()
        moto_port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
        self.moto.start()
        self.proxy = PausableProxy(moto_port)
        self.gcs, self.dashboard = f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        self.env = {
            **os.environ, **S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.proxy.port}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.ray_token, "RAY_API_SERVER_ADDRESS": self.dashboard,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
            "LEVIATHAN_STAGING_DIR": str(work / "staged"), "LEVIATHAN_HOME": str(work / "home"),
        }
        self.temp_dir = tempfile.mkdtemp(prefix="lvchaos-", dir="/tmp")
        self.head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={self.temp_dir}",
             f"--port={self.gcs.split(':')[1]}", f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             "--disable-usage-stats"],
            env=self.env, stdout=open(work / "ray_start.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        auth = {"Authorization": f"Bearer {self.ray_token}"}
        wait_until(lambda: answers(f"{self.dashboard}/api/jobs/", auth), 180, "the Ray dashboard")
        os.environ.update({k: self.env[k] for k in (*S3_ENV, "AWS_ENDPOINT_URL", "RAY_AUTH_MODE", "RAY_API_SERVER_ADDRESS")})
        self.driver_env = {**self.env, "RAY_ADDRESS": self.gcs}

    def bucket(self) -> str:
        import pyarrow.fs as pafs

        name = f"chaos-{secrets.token_hex(4)}"
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.proxy.port}", scheme="http",
                          access_key="chaos", secret_key="chaos", region="us-east-1",
                          allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    def live_workers(self) -> set[int]:
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard,
                             filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        return {a.pid for a in actors}

    def close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.head.pid, sig)
                self.head.wait(timeout=5)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.proxy.close()
        self.moto.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class MlflowServer:
    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env, self.port, self.proc = folder, env, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--default-artifact-root", (self.folder / "artifacts").as_uri(), "--workers", "1"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_until(lambda: answers(f"{self.uri}/health"), 300, "the MLflow server", poll_s=0.5)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


# ----------------------------------------------------------------------------- one run


def records(run_dir: str) -> list[dict[str, Any]]:
    try:
        return list(parse_lines(storage.AppendLog(storage.join(run_dir, "metrics.jsonl")).read_all()))
    except OSError:  # the store is cut off for us too
        return []


def logged_step(run_dir: str, phase: str) -> int:
    return max((r["step"] for r in records(run_dir) if r["phase"] == phase), default=-1)


def result_of(run_dir: str) -> dict[str, Any] | None:
    text = storage.read_text(storage.join(run_dir, "train_result.json"))
    return None if text is None else json.loads(text)


def start_driver(services: Services, spec_file: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.train", "--spec", str(spec_file), "--no-progress", *extra],
        cwd=REPO, env=services.driver_env, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def fault_step(rng: random.Random, spec: JobSpec, phase: str) -> int:
    """A step after the phase's first checkpoint and before its end, where the fault lands."""
    t = spec.training
    last = t.phase1_steps if phase == "members" else t.phase2_steps
    lo = min(t.checkpoint_interval + 1, last - 1)
    return rng.randint(lo, max(lo, last - t.eval_interval))


def run_fault(fault: str, spec: JobSpec, services: Services, rng: random.Random, work: Path, outage_s: float) -> dict:
    """Run `spec` with `fault` injected; returns the row's raw facts (the run dir and what happened)."""
    phase = "merge" if fault == "worker_merge" else "members"
    at = fault_step(rng, spec, phase)
    folder = work / fault
    folder.mkdir()
    storage_root = services.bucket() + "/runs" if fault == "store_pause" else str(folder / "runs")
    mlflow = None
    data = json.loads(spec.to_json())
    data.update(name=f"chaos-{fault}", storage=storage_root)
    if fault == "mlflow_restart":
        mlflow = MlflowServer(folder, services.env)
        mlflow.start()
        data["tracking"] = {"mlflow_uri": mlflow.uri, "experiment": "chaos"}
    run_spec = JobSpec.model_validate(data)
    spec_file = folder / "spec.json"
    spec_file.write_text(run_spec.to_json())
    run_dir, log = run_spec.run_dir, folder / "driver.log"
    row: dict[str, Any] = {"fault": fault, "when": f"{phase} step {at}", "run_dir": run_dir, "error": None}
    try:
        if fault == "api_restart":
            row.update(api_run(services, run_spec, folder, phase, at))
        else:
            spared = services.live_workers()  # workers of earlier runs still shutting down
            driver = start_driver(services, spec_file, log)
            wait_until(lambda: logged_step(run_dir, phase) >= at or driver.poll() is not None, 1800, f"{phase} step {at}")
            if fault.startswith("worker_"):
                os.kill(max(services.live_workers() - spared), signal.SIGKILL)
            elif fault == "driver_resume":
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
                time.sleep(5)  # Ray notices the dead driver and ends its Train run
                driver = start_driver(services, spec_file, log, "--resume", run_spec.name, "--storage", storage_root)
            elif fault == "mlflow_restart":
                mlflow.stop()
                time.sleep(outage_s)
                mlflow.start()
            elif fault == "store_pause":
                services.proxy.pause(outage_s)
            driver.wait(timeout=3600)
        if mlflow is not None:
            row["mlflow_points"] = mlflow_points(mlflow.uri)
    except Exception as e:  # a fault that was not survived is a row, not a crash of the benchmark
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        if mlflow is not None and mlflow.proc.poll() is None:
            mlflow.stop()
    return row


def api_run(services: Services, spec: JobSpec, folder: Path, phase: str, at: int) -> dict[str, Any]:
    """Submit through the REST API, SIGKILL the API mid-run, start it again, follow the job to its end."""
    import httpx

    port, token = free_port(), secrets.token_hex(16)
    env = {**services.env, "LEVIATHAN_API_TOKEN": token, "LEVIATHAN_RAY_ADDRESS": services.dashboard,
           "LEVIATHAN_STORAGE": str(Path(spec.storage)), "LEVIATHAN_WORKING_DIR": ""}
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}

    def start_api() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], cwd=REPO, env=env,
                                stdout=open(folder / "api.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: answers(f"{url}/healthz"), 120, "the API")
        return proc

    api = start_api()
    try:
        body = json.loads(spec.to_json())
        body.pop("storage", None)
        r = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=60)
        r.raise_for_status()
        job, run_dir = r.json()["job_id"], r.json()["run_dir"]  # the API gives every submission its own run name
        wait_until(lambda: logged_step(run_dir, phase) >= at, 1800, f"{phase} step {at}")
        os.killpg(api.pid, signal.SIGKILL)
        api.wait()
        time.sleep(2)
        api = start_api()

        def status() -> str:
            return httpx.get(f"{url}/v1/jobs/{job}", headers=headers, timeout=30).json().get("status", "")

        wait_until(lambda: status() in ("SUCCEEDED", "FAILED", "STOPPED"), 3600, "the job's end", poll_s=2)
        metrics = httpx.get(f"{url}/v1/jobs/{job}/metrics", headers=headers, timeout=30)
        return {"run_dir": run_dir, "api_status": status(), "api_metrics_served": metrics.status_code == 200}
    finally:
        os.killpg(api.pid, signal.SIGKILL)


def mlflow_points(uri: str) -> set[tuple[str, int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("chaos")
    out: set[tuple[str, int]] = set()
    for run in client.search_runs([experiment.experiment_id]) if experiment else []:
        for tag in run.data.metrics:
            out.update((tag, m.step) for m in client.get_metric_history(run.info.run_id, tag))
    return out


def line_keys(recs: list[dict[str, Any]]) -> set[tuple[str, int, str]]:
    return {(r["phase"], r["step"], r["member"]) for r in recs if r["phase"] not in ("done",)}


def merged_figures(result: dict[str, Any] | None) -> dict[str, float] | None:
    if result is None:
        return None
    row = next((r for r in result["report"]["rows"] if r["kind"] == "merged"), None)
    return None if row is None else row["loss"]


def summarize(row: dict[str, Any], clean: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    from cluster.tracking import scalars

    result = result_of(row["run_dir"])
    recs = records(row["run_dir"])
    replayed = {(r["phase"], r["step"]) for r in recs if r["replayed"]}
    figures = merged_figures(result)
    lost = len(line_keys(clean["records"]) - line_keys(recs))
    out = {
        "fault": row["fault"], "when": row["when"], "survived": result is not None and row["error"] is None,
        "steps_replayed": len(replayed), "merged": figures,
        "bit_identical": figures is not None and figures == clean["merged"], "metric_lines_lost": lost,
        "error": row["error"],
    }
    if "mlflow_points" in row:
        expected = {(tag, step) for step, values in scalars(recs, spec.training.phase1_steps).items() for tag in values}
        out["tracked_points_lost"] = len(expected - row["mlflow_points"])
    for key in ("api_status", "api_metrics_served"):
        if key in row:
            out[key] = row[key]
            out["survived"] = out["survived"] and row.get("api_status") == "SUCCEEDED" and row.get("api_metrics_served")
    return out


def scaled(spec: JobSpec, scale: float) -> JobSpec:
    data = json.loads(spec.to_json())
    t = data["training"]
    for key in ("phase1_steps", "phase2_steps"):
        t[key] = max(4 * t["checkpoint_interval"] * scale, round(t[key] * scale))
    for key in ("checkpoint_interval", "eval_interval"):
        t[key] = max(2, round(t[key] * scale))
    t["phase1_steps"], t["phase2_steps"] = int(t["phase1_steps"]), int(t["phase2_steps"])
    return JobSpec.model_validate(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(REPO / "jobs" / "specs" / "demo.toml"))
    p.add_argument("--seed", type=int, default=0, help="draws the step each fault lands at")
    p.add_argument("--scale", type=float, default=1.0, help="scale the spec's steps and intervals (0.2: a quick pass)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from {', '.join(FAULTS)}")
    p.add_argument("--outage-s", type=float, default=8.0, help="how long the MLflow server and the store stay away")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temp folder, removed)")
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        p.error(f"--faults: unknown {unknown}; choose from {', '.join(FAULTS)}")
    spec = scaled(load_spec(args.spec), args.scale)
    data = json.loads(spec.to_json())
    data["resources"]["max_failures"] = max(3, data["resources"].get("max_failures", 0))  # room for the kills
    spec = JobSpec.model_validate({**data, "seed": args.seed})
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="leviathan-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    services = Services(work)
    rng = random.Random(args.seed)
    started = time.monotonic()
    try:
        folder = work / "clean"
        folder.mkdir()
        data = {**json.loads(spec.to_json()), "name": "chaos-clean", "storage": str(folder / "runs")}
        clean_spec = JobSpec.model_validate(data)
        (folder / "spec.json").write_text(clean_spec.to_json())
        code = start_driver(services, folder / "spec.json", folder / "driver.log").wait()
        if code != 0:
            raise SystemExit(f"the clean run failed (exit {code}); see {folder / 'driver.log'}")
        clean = {"records": records(clean_spec.run_dir), "merged": merged_figures(result_of(clean_spec.run_dir))}
        rows = []
        for fault in faults:
            rows.append(summarize(run_fault(fault, spec, services, rng, work, args.outage_s), clean, spec))
            r = rows[-1]
            print(f"{r['fault']:>15} at {r['when']:<18} survived {r['survived']!s:<5} replayed {r['steps_replayed']:>3} "
                  f"bit-identical {r['bit_identical']!s:<5} lines lost {r['metric_lines_lost']}"
                  + (f" tracked points lost {r['tracked_points_lost']}" if "tracked_points_lost" in r else "")
                  + (f" ({r['error']})" if r["error"] else ""), file=sys.stderr, flush=True)
    finally:
        services.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "chaos", "seed": args.seed, "scale": args.scale,
        "steps": {"phase1": spec.training.phase1_steps, "phase2": spec.training.phase2_steps},
        "clean_merged": clean["merged"], "rows": rows, "wall_s": time.monotonic() - started,
        "all_survived": all(r["survived"] for r in rows),
        "all_bit_identical": all(r["bit_identical"] for r in rows),
        "metric_lines_lost": sum(r["metric_lines_lost"] for r in rows),
        "machine": machine_info(load=os.getloadavg()),
    }
    return emit_report(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
