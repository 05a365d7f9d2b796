"""`leviathan runs list|show|delete`: the run folders under a storage root, as the
API's `/v1/runs` shows them.

The CLI has no API client, so this reads the storage root directly (`--storage`,
default the API's `LEVIATHAN_STORAGE`) through the very service the API uses, as
an admin: whoever can read the storage can read every run in it. Ray is asked only
which runs a job that has not ended writes (state `running`, and `delete`'s
refusal); when Ray cannot be reached, `list` and `show` say so and go on from the
storage alone, and `delete` refuses unless `--force`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from api.auth import Principal
from api.errors import ApiError
from api.metrics import MetricsReader
from api.ray_jobs import RayGateway, RayJob
from api.schemas import RunSummary
from api.services import run_resources as service
from api.services.runs import storage_root
from api.settings import Settings
from leviathan.run.names import MERGED

OPERATOR = Principal("operator", "admin")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leviathan runs",
        description="List, show and delete the runs under a storage root (what GET/DELETE /v1/runs serve).",
    )
    parser.add_argument("action", choices=["list", "show", "delete"])
    parser.add_argument("name", nargs="?", help="the run (show, delete)")
    parser.add_argument("--storage", default=None, help="the storage root (default: $LEVIATHAN_STORAGE, as the API)")
    parser.add_argument("--state", choices=["running", "finished", "stopped", "failed"], help="list: only these")
    parser.add_argument("--json", action="store_true", help="list: JSON lines instead of a table")
    parser.add_argument("--force", action="store_true",
                        help="delete even when Ray cannot be asked whether a job writes the run")
    return parser


def ray_jobs(settings: Settings) -> list[RayJob]:
    """Ray's job list (what says which runs are being written); ApiError when unreachable."""

    async def ask() -> list[RayJob]:
        gateway = RayGateway(settings)
        await gateway.start()
        try:
            return await gateway.jobs()
        finally:
            await gateway.aclose()

    return asyncio.run(ask())


def _row(run: RunSummary) -> str:
    merged = run.figures.mixed_val_loss.get(MERGED) if run.figures else None
    figure = f"{merged:.4f}" if merged is not None else "-"
    return "\t".join([run.name, run.state, run.phase or "-", str(run.step if run.step is not None else "-"),
                      run.owner or "-", figure])


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.action == "list") != (args.name is None):
        parser.error("list takes no run name; show and delete take one")
    try:
        settings = Settings(**({"storage": args.storage} if args.storage else {}))
    except ValueError as e:
        print(f"error: bad settings: {e}", file=sys.stderr)
        return 2
    root = storage_root(settings)
    try:
        jobs = ray_jobs(settings)
    except ApiError as e:
        if args.action == "delete" and not args.force:
            print(f"error: cannot ask Ray whether a job writes {args.name!r} ({e.message}); "
                  "pass --force to delete anyway", file=sys.stderr)
            return 1
        print(f"warning: cannot ask Ray which runs are being written ({e.message}); "
              "a running run shows as stopped or failed", file=sys.stderr)
        jobs = []
    try:
        if args.action == "list":
            runs = service.list_runs(root, jobs, OPERATOR, MetricsReader())
            for run in runs:
                if args.state is None or run.state == args.state:
                    print(run.model_dump_json() if args.json else _row(run))
        elif args.action == "show":
            folder, owner, job = service.visible_run(root, args.name, jobs, OPERATOR)
            detail = service.summarize(folder, owner, job, MetricsReader(), detailed=True)
            print(json.dumps(detail.model_dump(mode="json"), indent=2))
        else:
            folder, _, job = service.visible_run(root, args.name, jobs, OPERATOR)
            service.delete_run(folder, job)
            print(f"deleted {folder.root}", file=sys.stderr)
    except ApiError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    return 0
