"""Run a planned job to its end on the driver: fit, then `final/`, `train_result.json`
and the report task.

    run_plan(plan, evaluate)
      checks tracking and placement (unless LEVIATHAN_ALLOW_UNSCHEDULABLE=1), writes spec.json (unless already there),
      fits the job's one TorchTrainer (cluster.trainer), then
      assemble_final   <run>/final/: the ensemble of the last checkpoint, the
                       tokenizer and spec.json, loadable without Ray;
      train_result.json the workers' final table and where everything is;
      start_report     `evaluate(run_dir)` as a Ray task with one worker's
                       resources (a GPU when the job uses them), which writes
                       report.md / report.json into the run folder.

The evaluation function comes from the caller (the job layer's report writer),
so this layer does not import the one above it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from cluster.plan import RunPlan
from leviathan.run import storage
from leviathan.run.capacity import allow_unschedulable
from leviathan.run.folder import REPORT_MD

EVALUATION_TASK = "leviathan-final-evaluation"

Evaluate = Callable[[str], dict[str, Any]]
"""run folder -> the report dict (report.md / report.json written there)."""


class TrainError(RuntimeError):
    """Training ran but did not finish (workers failed past max_failures)."""


def failure_line(error: Exception) -> str:
    """One line for a failed fit(): a worker's collective check failure when there is one
    (it names the rank, device, backend and step), else the error's first line."""
    from cluster.preflight import CHECK_FAILED

    lines = str(error).splitlines()
    for line in lines:
        if CHECK_FAILED in line:
            return line[line.index(CHECK_FAILED):]
    return lines[0] if lines else type(error).__name__


def assemble_final(checkpoint, plan: RunPlan) -> dict[str, Any]:
    """`final/` = the ensemble from the last checkpoint + tokenizer + spec.json.

    Returns the final evaluation table the workers left in that checkpoint (the
    `leviathan.run.report.final_table` view, with the report dict under "report").
    """
    from cluster.checkpointing import assemble
    from cluster.worker import FINAL_TABLE_FILE
    from leviathan.data.staging import load_manifest
    from leviathan.run.folder import FINAL_DIR, SPEC_FILE

    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory(prefix="leviathan-final-") as tmp:
        table_file = Path(d) / FINAL_TABLE_FILE
        if not table_file.is_file():
            raise TrainError(f"the last checkpoint {checkpoint.path} has no {FINAL_TABLE_FILE}: training did not finish")
        table = json.loads(table_file.read_text())
        out = Path(tmp) / FINAL_DIR
        assemble(d).save(out)
        load_manifest(plan.manifest).tokenizer().save(out)
        (out / SPEC_FILE).write_text(plan.spec_json + "\n")
        storage.upload_dir(out, plan.folder.final)
    return table


def start_report(plan: RunPlan, evaluate: Evaluate) -> dict[str, Any] | None:
    """report.md / report.json by `evaluate` (every baseline, bits per byte); the
    training result stands even when this fails, so a failure is a warning (None).

    The evaluation runs where the job's GPUs are, not on the driver (which may have
    none): a Ray task asking for one worker's CPUs and, when the job uses GPUs,
    one GPU, evaluating on it. It reads `final/` from the run folder and writes the
    reports back there, so on a multi-node cluster the run folder is shared storage."""
    import ray
    from ray.exceptions import RayTaskError

    resources = plan.resources
    task = ray.remote(evaluate).options(
        name=EVALUATION_TASK,
        num_cpus=resources.cpus_per_worker,
        num_gpus=1 if resources.use_gpu else 0,
        max_retries=0,
    )
    try:
        report = ray.get(task.remote(plan.run_dir))
    except RayTaskError as e:
        if not isinstance(e.cause, ValueError):  # RunError: one line naming the problem
            raise
        print(f"leviathan train: warning: evaluation report not written: {e.cause}", file=sys.stderr)
        return None
    print(f"evaluation report: {plan.folder.report_md} (evaluated on {report['run']['device']})", flush=True)
    return report


def finalize(plan: RunPlan, result, started: float, evaluate: Evaluate) -> dict[str, Any]:
    """After a successful fit: final/, train_result.json, the done record, the report
    task and the tracking run's end. Returns train_result.json's dict."""
    from cluster.metrics import MetricsLog
    from cluster.tracking import end_run
    from leviathan.run.records import done_record

    folder = plan.folder
    if result.checkpoint is None:
        raise TrainError("training ended without a checkpoint")
    table = assemble_final(result.checkpoint, plan)
    out = {
        "name": plan.name,
        "run_dir": plan.run_dir,
        "final_dir": folder.final,
        "checkpoint": result.checkpoint.path,
        "wall_time_s": round(time.time() - started, 1),
        "domains": list(plan.domains),
        **table,
    }
    storage.write_text(folder.result, json.dumps(out, indent=2) + "\n")
    MetricsLog(plan.run_dir).append([done_record(plan.training.phase2_steps)])
    start_report(plan, evaluate)
    report = storage.read_text(folder.report_md)
    end_run(plan.tracking, plan.run_dir, "FINISHED", {REPORT_MD: report} if report is not None else {})
    return out


def run_plan(
    plan: RunPlan, evaluate: Evaluate, *, write_spec: bool = True, progress: bool | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Run a planned job on the cluster in `RAY_ADDRESS` (or a local Ray) to its end.

    `write_spec`: write `<run>/spec.json` from the plan (false when the folder already
    holds it). `progress`: a progress bar (default: on a terminal, for a local run
    folder). `verbose` shows Ray Train's own per-report and checkpoint INFO lines."""
    from ray.train import TrainingFailedError

    from cluster.metrics import ProgressBar
    from cluster.session import init_ray
    from cluster.tracking import check_tracking, end_run
    from cluster.trainer import build_trainer, check_placement

    started = time.time()
    check_tracking(plan.tracking)
    init_ray()
    if not allow_unschedulable():  # an autoscaling cluster adds the nodes (leviathan.run.capacity)
        check_placement(plan.resources, plan.name)
    if write_spec:
        storage.write_text(plan.folder.spec, plan.spec_json + "\n")
    trainer = build_trainer(plan, verbose=verbose)
    if progress is None:
        progress = sys.stderr.isatty() and not storage.is_uri(plan.run_dir)
    try:
        if progress:
            with ProgressBar(plan.run_dir, plan.training.phase1_steps, plan.training.phase2_steps):
                result = trainer.fit()
        else:
            result = trainer.fit()
    except TrainingFailedError as e:
        end_run(plan.tracking, plan.run_dir, "FAILED", {})
        raise TrainError(f"training failed: {failure_line(e)}") from e
    return finalize(plan, result, started, evaluate)
