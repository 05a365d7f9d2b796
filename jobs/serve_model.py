"""Serve a trained run on Ray Serve: `leviathan serve-model --run NAME`.

Joins the Ray cluster (`RAY_ADDRESS`, as a job driver does), starts Serve's HTTP
proxy if it is not running (`--host`, `--http-port`; an already running Serve keeps
its own), and deploys `<storage>/<NAME>/final/` as the Serve application named
after the run, at the route prefix `/runs/<NAME>` (`leviathan.run.serving`).
Returns once the application is healthy, printing its generate URL. `--delete`
removes the application. The replicas read final/ from the path given, so the
storage must be a local (or shared) folder every node sees.
"""

from __future__ import annotations

import argparse
import re
import sys

from jobs.entry import run_cli
from jobs.evaluate import RunError, resolve_final
from jobs.spec import RUN_NAME_PATTERN, default_storage
from leviathan.run.folder import RunFolder
from leviathan.run.ray_address import ray_address
from leviathan.run.serving import DEFAULT_SERVE_PORT, app_name, route_prefix


class ServeModelError(ValueError):
    """A flag or run that cannot be served; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leviathan serve-model",
                                description="Deploy a trained run's final/ ensemble on Ray Serve (or remove it).")
    p.add_argument("--run", required=True, help="run name (the folder <storage>/<name>)")
    p.add_argument("--storage", default=None, help="storage root holding the run (default: LEVIATHAN_STORAGE)")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas, each holding the whole ensemble")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs reserved per replica")
    p.add_argument("--max-ongoing-requests", type=int, default=8,
                   help="requests one replica holds at once (also its largest decode batch)")
    p.add_argument("--k", type=int, default=None, help="default members per sequence (sparse routing; default all)")
    p.add_argument("--every", type=int, default=16, help="default R: tokens between routing choices")
    p.add_argument("--host", default="127.0.0.1", help="Serve HTTP proxy host, when this starts Serve")
    p.add_argument("--http-port", type=int, default=DEFAULT_SERVE_PORT,
                   help="Serve HTTP proxy port, when this starts Serve")
    p.add_argument("--delete", action="store_true", help="remove the run's Serve application")
    return p


def check_args(args: argparse.Namespace) -> str:
    """The run's final/ folder, after checking every flag (before Ray is touched)."""
    if not re.match(RUN_NAME_PATTERN, args.run):
        raise ServeModelError(f"--run: a run name must match {RUN_NAME_PATTERN}, got {args.run!r}")
    for flag, value, low in (("--replicas", args.replicas, 1), ("--max-ongoing-requests", args.max_ongoing_requests, 1),
                             ("--every", args.every, 1), ("--http-port", args.http_port, 1)):
        if value < low:
            raise ServeModelError(f"{flag}: must be >= {low}, got {value}")
    if args.k is not None and args.k < 1:
        raise ServeModelError(f"--k: must be >= 1, got {args.k}")
    for flag, value in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus)):
        if value < 0:
            raise ServeModelError(f"{flag}: must be >= 0, got {value}")
    if args.delete:
        return ""
    run_dir = RunFolder.of(args.storage or default_storage(), args.run).root
    return str(resolve_final(run_dir))


def _connect() -> None:
    import logging

    import ray

    if not ray.is_initialized():
        try:
            address = ray_address("cluster") or "auto"
        except ValueError as e:  # a Jobs server URL in RAY_ADDRESS
            raise ServeModelError(str(e)) from None
        ray.init(address=address, logging_level=logging.WARNING)


def deploy(args: argparse.Namespace, final_dir: str) -> str:
    """Deploy the run; returns its generate URL once Serve reports it healthy."""
    from ray import serve

    from cluster.serving import EnsembleServer

    _connect()
    serve.start(http_options={"host": args.host, "port": args.http_port})
    if args.k is not None:  # checked against the run's members before any replica starts
        from leviathan.model.checkpoint import read_meta

        members = len(read_meta(final_dir)["config"]["members"])
        if args.k > members:
            raise ServeModelError(f"--k: must be in [1, {members}] (the run's members), got {args.k}")
    app = EnsembleServer.options(
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
    ).bind(final_dir, args.k, args.every, args.max_ongoing_requests)
    serve.run(app, name=app_name(args.run), route_prefix=route_prefix(args.run))
    return f"http://{args.host}:{args.http_port}{route_prefix(args.run)}/generate"


def delete(run: str) -> None:
    from ray import serve

    _connect()
    if app_name(run) not in serve.status().applications:
        raise ServeModelError(f"--run: no Serve application {app_name(run)!r} to delete")
    serve.delete(app_name(run))


def _serve_model(args: argparse.Namespace) -> None:
    final_dir = check_args(args)
    if args.delete:
        delete(args.run)
        print(f"deleted Serve application {app_name(args.run)!r}")
        return
    print(f"serving {args.run} at {deploy(args, final_dir)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from leviathan.model.checkpoint import CheckpointError

    return run_cli("leviathan serve-model", lambda: _serve_model(args), (RunError, ServeModelError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
