"""Train an ensemble: `python -m jobs.train --spec FILE` (or `leviathan train`).

A thin entry: parse the arguments, plan, run, print.

1. parse: the spec file with the command line's overrides, validated;
2. plan: the run folder is checked (a finished run is not trained again), the
   built-in corpus is prepared when the spec asks for it, and `build_plan`
   resolves the spec once into the `RunPlan` (a bad spec is a one-line error,
   exit 2); only the plan goes on;
3. run: `cluster.finalize.run_plan` connects to the cluster in `RAY_ADDRESS`
   (or starts a local Ray), checks placement, fits the job's TorchTrainer,
   assembles `<run>/final/`, writes `<run>/train_result.json` and runs
   `jobs.evaluate` as a Ray task that writes `<run>/report.md`;
4. print: the final table (every member's val loss on its own domain and on the
   mixed val set, the baselines and the merged model) and the run folder.

Without `--spec` it runs the built-in demo (jobs/specs/demo.toml).

`--resume NAME` continues a failed or stopped run from its latest checkpoint: the
spec is the one in `<storage>/NAME/spec.json` (`--storage`, default the spec's
default storage), so `ray job submit ... -- python -m jobs.train --resume NAME
--storage S` needs nothing else. Given `--spec` as well, that spec must equal the
run's (the differing fields are named). A finished run is not resumed. Resuming
is the ordinary re-run of the same spec in the same folder: Ray Train finds the
run's checkpoints in `<run>/checkpoints/` and the workers continue from the latest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cluster.finalize import EVALUATION_TASK, TrainError, failure_line  # noqa: F401  (this entry's errors)
from jobs.spec import JobSpec, SpecError, default_storage, load_spec_dict, with_values
from leviathan.run import storage
from leviathan.run.folder import RunFolder
from leviathan.run.report import format_final_table

DEMO_SPEC = Path(__file__).resolve().parent / "specs" / "demo.toml"


def spec_differences(old: JobSpec, new: JobSpec) -> list[str]:
    """The dotted fields (`training.phase1_steps`, `ensemble.members.0.preset`) whose
    values differ between two specs, sorted; `storage` is where the run lies, not
    what it trains, and is left out."""
    from jobs.plan import flatten

    a = flatten(old.model_dump(mode="json", exclude={"storage"}))
    b = flatten(new.model_dump(mode="json", exclude={"storage"}))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _fields(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_run_folder(spec: JobSpec) -> bool:
    """A run folder holds one job: a finished run is not trained again, and an
    unfinished one resumes only with the same spec (its checkpoints fit no other).

    Returns whether the folder already holds this spec's spec.json (written by the
    API on submission, or by an earlier attempt of this run)."""
    folder = RunFolder(spec.run_dir)
    if folder.is_finished():
        raise SpecError(
            f"name: run {spec.name!r} already finished in {folder.root}; pick another --name or remove the folder"
        )
    old = storage.read_text(folder.spec)
    if old is not None:
        try:
            differing = spec_differences(JobSpec.model_validate_json(old), spec)
        except ValueError:
            differing = ["spec.json (unreadable)"]
        if differing:
            raise SpecError(
                f"name: {folder.root} holds run {spec.name!r} with a different spec "
                f"(differs in {_fields(differing)}); pick another --name or remove the folder"
            )
    return old is not None


def resume_spec(name: str, storage_root: str | None, given: JobSpec | None = None) -> JobSpec:
    """The spec that resumes run `name` under `storage_root` (default: `given`'s storage,
    else the default storage): the run folder's spec.json, placed where it was found.

    Raises SpecError (one line) when there is no such run, when it finished, or when
    `given` (a --spec file) differs from it, naming the differing fields."""
    root = storage_root or (given.storage if given is not None else default_storage())
    folder = RunFolder.of(root, name)
    text = storage.read_text(folder.spec)
    if text is None:
        raise SpecError(f"resume: no run {name!r} under {root} (no {folder.spec})")
    if folder.is_finished():
        raise SpecError(f"resume: run {name!r} already finished in {folder.root}; nothing to resume")
    try:
        spec = JobSpec.model_validate_json(text)
    except ValueError as e:
        raise SpecError(f"resume: {folder.spec} is not a valid spec: {str(e).splitlines()[0]}") from None
    if given is not None:
        differing = spec_differences(spec, given.model_copy(update={"name": name}))
        if differing:
            raise SpecError(
                f"resume: --spec differs from the spec.json of run {name!r} in {_fields(differing)}; "
                "resume with the run's own spec (leave out --spec)"
            )
    return spec.model_copy(update={"storage": folder.storage_root})


def run(spec: JobSpec, *, progress: bool | None = None, verbose: bool = False) -> dict[str, Any]:
    """Plan a job once and run it to its end (fit, final/, report); print its table and
    return train_result.json's dict.

    `verbose` shows Ray Train's own per-report and checkpoint INFO lines."""
    from cluster.finalize import run_plan
    from jobs.evaluate import evaluate_run
    from jobs.plan import build_plan, ensure_data

    has_spec = check_run_folder(spec)
    ensure_data(spec)
    plan = build_plan(spec)
    out = run_plan(plan, evaluate_run, write_spec=not has_spec, progress=progress, verbose=verbose)
    print(format_final_table(out), flush=True)
    print(f"run folder: {plan.run_dir} ({out['wall_time_s']:.0f} s)", flush=True)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise SpecError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leviathan train", description="Train a Leviathan ensemble on Ray.")
    p.add_argument("--spec", default=None, help="JobSpec file (.toml or .json); default: the built-in demo")
    p.add_argument("--resume", default=None, metavar="NAME",
                   help="continue the failed or stopped run NAME (under --storage) from its latest checkpoint, "
                        "with the spec in its run folder")
    p.add_argument("--storage", default=None, help="override the spec's storage (runs go to <storage>/<name>)")
    p.add_argument("--name", default=None, help="override the spec's run name")
    p.add_argument("--manifest", default=None, help="override the spec's data.manifest (a prepared corpus)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="also show Ray Train's per-report and checkpoint log lines")
    return p


def _spec_of(args: argparse.Namespace) -> JobSpec:
    """The spec to run: the --spec file (or the demo) with the command line's overrides,
    or with --resume the run folder's own spec."""
    if args.resume is not None:
        if args.name is not None or args.manifest is not None:
            raise SpecError("--resume: the run's spec.json fixes its name and data; leave out --name and --manifest")
        given = None
        if args.spec is not None:
            given = with_values(load_spec_dict(args.spec), {"name": args.resume} | (
                {"storage": args.storage} if args.storage is not None else {}))
        spec = resume_spec(args.resume, args.storage, given)
        print(f"resuming run {spec.name!r} in {spec.run_dir} from its latest checkpoint", flush=True)
        return spec
    overrides = {"name": args.name, "storage": args.storage, "data.manifest": args.manifest}
    # Overrides apply before validation, so they can replace a spec file's placeholders.
    return with_values(load_spec_dict(args.spec or str(DEMO_SPEC)),
                       {k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        spec = _spec_of(args)
        run(spec, progress=False if args.no_progress else None, verbose=args.verbose)
    except ValueError as e:  # SpecError, PlacementError, data errors: the job cannot start
        print(f"leviathan train: error: {e}", file=sys.stderr)
        return 2
    except TrainError as e:
        print(f"leviathan train: error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
