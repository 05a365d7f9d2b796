"""Train an ensemble: `python -m jobs.train --spec FILE` (or `leviathan train`).

One job = one Ray Train run (jobs.plan.build_job_trainer). This entry point:

1. prepares the built-in corpus when the spec asks for it, and checks the
   spec against its manifest and the cluster's resources before any worker
   starts (a bad spec or an unplaceable job is a one-line error, exit 2);
2. connects to the cluster in `RAY_ADDRESS` (a `ray job submit` driver) or
   starts a local Ray;
3. writes `<run>/spec.json` (unless the API wrote it on submission) and runs
   `TorchTrainer.fit()`;
4. assembles `<run>/final/` from the last checkpoint (a `LeviathanEnsemble`
   folder plus the tokenizer and spec.json, loadable without Ray), writes
   `<run>/train_result.json` and prints the final table: every member's val
   loss on its own domain and on the mixed val set, the uniform mixture's and
   the merged model's; then `jobs.evaluate`, run as a Ray task with one
   worker's resources (a GPU when the job uses them), writes `<run>/report.md`,
   which also goes to the run's MLflow run when the spec tracks one (cluster.tracking).

Without `--spec` it runs the built-in demo (jobs/specs/demo.toml).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.plan import Resources
from jobs.spec import BUILTIN_MANIFEST, JobSpec, SpecError, load_spec_dict, with_values
from leviathan.run import storage
from leviathan.run.folder import FINAL_DIR, REPORT_MD, SPEC_FILE, RunFolder
from leviathan.run.report import format_final_table

DEMO_SPEC = Path(__file__).resolve().parent / "specs" / "demo.toml"
EVALUATION_TASK = "leviathan-final-evaluation"


class TrainError(RuntimeError):
    """Training ran but did not finish (workers failed past max_failures)."""


def prepare_data(spec: JobSpec) -> tuple[str, list[str]]:
    """Prepare the built-in corpus if the spec uses it, then check the spec's data:
    (manifest path, module i's domain)."""
    if spec.data.manifest == BUILTIN_MANIFEST:
        from jobs.prepare import ensure_builtin

        ensure_builtin(spec.data.tokenizer)
    from jobs.plan import resolve_data

    return resolve_data(spec)


def check_run_folder(spec: JobSpec) -> bool:
    """A run folder holds one job: a finished run is not trained again, and an
    unfinished one resumes only with the same spec (its checkpoints fit no other).

    Returns whether the folder already holds this spec's spec.json (written by the
    API on submission, or by an earlier attempt of this run)."""
    run_dir = spec.run_dir
    folder = RunFolder(run_dir)
    if folder.is_finished():
        raise SpecError(
            f"name: run {spec.name!r} already finished in {run_dir}; pick another --name or remove the folder"
        )
    old = storage.read_text(folder.spec)
    if old is not None:
        try:
            same = JobSpec.model_validate_json(old) == spec
        except ValueError:
            same = False
        if not same:
            raise SpecError(
                f"name: {run_dir} holds run {spec.name!r} with a different spec; pick another --name or remove the folder"
            )
    return old is not None


def assemble_final(checkpoint, spec: JobSpec, manifest: str, final_dir: str) -> dict[str, Any]:
    """`final/` = the ensemble from the last checkpoint + tokenizer + spec.json.

    Returns the final evaluation table the workers left in that checkpoint (the
    `leviathan.run.report.final_table` view, with the report dict under "report").
    """
    from cluster.checkpointing import assemble
    from cluster.worker import FINAL_TABLE_FILE
    from leviathan.data.staging import load_manifest

    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory(prefix="leviathan-final-") as tmp:
        table_file = Path(d) / FINAL_TABLE_FILE
        if not table_file.is_file():
            raise TrainError(f"the last checkpoint {checkpoint.path} has no {FINAL_TABLE_FILE}: training did not finish")
        table = json.loads(table_file.read_text())
        out = Path(tmp) / FINAL_DIR
        ensemble = assemble(d)
        ensemble.save(out)
        load_manifest(manifest).tokenizer().save(out)
        (out / SPEC_FILE).write_text(spec.to_json() + "\n")
        storage.upload_dir(out, final_dir)
    return table


def failure_line(error: Exception) -> str:
    """One line for a failed fit(): a worker's collective check failure when there is one
    (it names the rank, device, backend and step), else the error's first line."""
    from cluster.preflight import CHECK_FAILED

    lines = str(error).splitlines()
    for line in lines:
        if CHECK_FAILED in line:
            return line[line.index(CHECK_FAILED):]
    return lines[0] if lines else type(error).__name__


def run(spec: JobSpec, *, progress: bool | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run a whole job (prepare, fit, final/, evaluation table) and return the result dict.

    `verbose` shows Ray Train's own per-report and checkpoint INFO lines too."""
    from cluster.metrics import MetricsLog, ProgressBar
    from cluster.session import init_ray
    from cluster.tracking import check_tracking, end_run
    from cluster.trainer import check_placement
    from jobs.plan import build_job_trainer, resources_of, tracking_of
    from leviathan.run.records import done_record

    started = time.time()
    run_dir = spec.run_dir
    folder = RunFolder(run_dir)
    has_spec = check_run_folder(spec)
    manifest, domains = prepare_data(spec)
    tracking = tracking_of(spec)
    check_tracking(tracking)
    init_ray()
    check_placement(resources_of(spec), spec.name)
    if not has_spec:
        storage.write_text(folder.spec, spec.to_json() + "\n")

    trainer = build_job_trainer(spec, verbose=verbose)
    if progress is None:
        progress = sys.stderr.isatty() and not storage.is_uri(run_dir)
    from ray.train import TrainingFailedError

    try:
        if progress:
            with ProgressBar(run_dir, spec.training.phase1_steps, spec.training.phase2_steps):
                result = trainer.fit()
        else:
            result = trainer.fit()
    except TrainingFailedError as e:
        end_run(tracking, run_dir, "FAILED", {})
        raise TrainError(f"training failed: {failure_line(e)}") from e
    if result.checkpoint is None:
        raise TrainError("training ended without a checkpoint")
    table = assemble_final(result.checkpoint, spec, manifest, folder.final)
    out = {
        "name": spec.name,
        "run_dir": run_dir,
        "final_dir": folder.final,
        "checkpoint": result.checkpoint.path,
        "wall_time_s": round(time.time() - started, 1),
        "domains": domains,
        **table,
    }
    storage.write_text(folder.result, json.dumps(out, indent=2) + "\n")
    MetricsLog(run_dir).append([done_record(spec.training.phase2_steps)])
    write_report(run_dir, resources_of(spec))
    report = storage.read_text(folder.report_md)
    end_run(tracking, run_dir, "FINISHED", {REPORT_MD: report} if report is not None else {})
    print(format_final_table(table), flush=True)
    print(f"run folder: {run_dir} ({out['wall_time_s']:.0f} s)", flush=True)
    return out


def write_report(run_dir: str, resources: Resources) -> None:
    """`report.md` / `report.json` by jobs.evaluate (every baseline, bits per byte); the
    training result stands even when this fails, so a failure is a warning.

    The evaluation runs where the job's GPUs are, not on the driver (which may have
    none): a Ray task asking for one worker's CPUs and, when the job uses GPUs,
    one GPU, evaluating on it. It reads `final/` from the run folder and writes the
    reports back there, so on a multi-node cluster the run folder is shared storage."""
    import ray
    from ray.exceptions import RayTaskError

    from jobs.evaluate import evaluate_run

    task = ray.remote(evaluate_run).options(
        name=EVALUATION_TASK,
        num_cpus=resources.cpus_per_worker,
        num_gpus=1 if resources.use_gpu else 0,
        max_retries=0,
    )
    try:
        report = ray.get(task.remote(run_dir))
    except RayTaskError as e:
        if not isinstance(e.cause, ValueError):  # RunError: one line naming the problem
            raise
        print(f"leviathan train: warning: evaluation report not written: {e.cause}", file=sys.stderr)
        return
    print(f"evaluation report: {RunFolder(run_dir).report_md} (evaluated on {report['run']['device']})", flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise SpecError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leviathan train", description="Train a Leviathan ensemble on Ray.")
    p.add_argument("--spec", default=str(DEMO_SPEC), help="JobSpec file (.toml or .json); default: the built-in demo")
    p.add_argument("--storage", default=None, help="override the spec's storage (runs go to <storage>/<name>)")
    p.add_argument("--name", default=None, help="override the spec's run name")
    p.add_argument("--manifest", default=None, help="override the spec's data.manifest (a prepared corpus)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="also show Ray Train's per-report and checkpoint log lines")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        overrides = {"name": args.name, "storage": args.storage, "data.manifest": args.manifest}
        # Overrides apply before validation, so they can replace a spec file's placeholders.
        spec = with_values(load_spec_dict(args.spec), {k: v for k, v in overrides.items() if v is not None})
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
