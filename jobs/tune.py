"""Hyper-parameter sweeps: `python -m jobs.tune --spec FILE --trials N --param NAME=DIST ...`.

Ray Tune over a spec's fields, one training run per trial (Ray 2.60, Train V2):
`tune.Tuner(driver_fn, ...)` where `driver_fn(config)` applies the trial's
values to the spec, builds the job's TorchTrainer named `train-<trial id>`
(`jobs.plan.build_job_trainer`) with Tune's `TuneReportCallback` and fits it.
Every evaluation of the training reports `mixed_val_loss` (the uniform
mixture's in phase 1, the merged model's in phase 2), so ASHA compares trials
at equal report counts and stops the worse ones early.

Parameters are dotted spec fields with a distribution, parsed strictly:

    training.lr=loguniform(1e-4,1e-2)    uniform(a,b)    loguniform(a,b)  (0 < a < b)
    ensemble.window=choice(1,2,4)        randint(a,b)    (integers a <= x < b)
    ensemble.merge_width=choice(32,64)   choice(v1,v2,...) (numbers, true/false, words)

`lr`, `merge_lr`, `window`, `merge_window`, `merge_width` are short for their
dotted names. Every value a distribution can take at its bounds is validated
against the JobSpec before Ray starts.

Everything lands in `<storage>/<name>-tune/`: Tune's experiment folder, each
trial's checkpoints and metrics.jsonl (`train-<trial id>/`), `results.json`,
`results.md` (trials sorted by mixed val loss) and the best trial's spec as
`best_spec.toml` + `best_spec.json` (named `<name>-best`, ready for
`leviathan train --spec`).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.entry import add_spec_overrides, load_spec_with_overrides
from jobs.spec import JobSpec, SpecError, with_values
from leviathan.run.storage import is_uri
from leviathan.run.tables import markdown_table

METRIC = "mixed_val_loss"
ALIASES = {
    "lr": "training.lr",
    "merge_lr": "training.merge_lr",
    "window": "ensemble.window",
    "merge_window": "ensemble.merge_window",
    "merge_width": "ensemble.merge_width",
}
FIXED = ("name", "storage")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
_DIST_RE = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.S)
_WORD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class TuneError(ValueError):
    """A sweep that cannot run; the message is one line naming the parameter or file."""


@dataclass(frozen=True)
class Param:
    """One swept spec field: `name` (dotted), `kind` (a DISTRIBUTIONS entry) and its arguments."""

    name: str
    kind: str
    args: tuple[Any, ...]

    def domain(self):
        """The Ray Tune search space of this parameter."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def bounds(self) -> list[Any]:
        """The values to validate against the spec: every choice, or both ends of a range."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def __str__(self) -> str:
        return f"{self.name}={self.kind}({','.join(map(str, self.args))})"


def _literal(text: str, where: str) -> Any:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if _WORD_RE.match(text):
            return text  # a bare word, e.g. choice(gelu4,relu3)
        raise TuneError(f"{where}: cannot read value {text!r}") from None
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        return value
    raise TuneError(f"{where}: {text!r} is not a number, true/false or a word")


def parse_param(text: str) -> Param:
    """`NAME=DIST` -> Param, checking the distribution's arguments (TuneError otherwise)."""
    name, sep, dist = text.partition("=")
    name = name.strip()
    where = f"--param {text!r}"
    if not sep or not name or not dist.strip():
        raise TuneError(f"{where}: expected NAME=DIST, e.g. training.lr=loguniform(1e-4,1e-2)")
    name = ALIASES.get(name, name)
    m = _DIST_RE.match(dist)
    if not m or m.group(1) not in DISTRIBUTIONS:
        raise TuneError(f"{where}: distribution must be one of {', '.join(d + '(...)' for d in DISTRIBUTIONS)}")
    kind, inner = m.group(1), m.group(2)
    args = tuple(_literal(a, where) for a in inner.split(",")) if inner.strip() else ()
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if kind == "choice":
        if not args:
            raise TuneError(f"{where}: choice needs at least one value")
        if len(set(map(repr, args))) != len(args):
            raise TuneError(f"{where}: choice lists a value twice")
    elif len(args) != 2 or not numbers or not all(math.isfinite(a) for a in args):
        raise TuneError(f"{where}: {kind} takes two numbers (low, high)")
    elif not args[0] < args[1]:
        raise TuneError(f"{where}: {kind} needs low < high, got {args[0]} and {args[1]}")
    elif kind == "loguniform" and args[0] <= 0:
        raise TuneError(f"{where}: loguniform needs 0 < low, got {args[0]}")
    elif kind == "randint" and not all(isinstance(a, int) for a in args):
        raise TuneError(f"{where}: randint takes two integers")
    return Param(name, kind, args)


def trial_spec(base: JobSpec | dict[str, Any], values: dict[str, Any]) -> JobSpec:
    """The base spec (a JobSpec, or its dict inside a trial) with the trial's values set, validated.
    Given a JobSpec, a name the schema lacks is refused by name before validation."""
    try:
        return with_values(base, values)
    except SpecError as e:
        raise TuneError(f"{', '.join(f'{k}={v!r}' for k, v in values.items())}: {e}") from None


def check_params(spec: JobSpec, params: list[Param]) -> None:
    """Every bound of every parameter gives a valid spec (one at a time, others at the base value)."""
    names = [p.name for p in params]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TuneError(f"--param {dupes[0]}: given twice")
    for p in params:
        if p.name in FIXED or p.name.split(".")[0] in FIXED:
            raise TuneError(f"--param {p.name}: cannot be swept (every trial shares the run's {p.name})")
        for value in p.bounds():
            try:
                trial_spec(spec, {p.name: value})
            except TuneError as e:
                raise TuneError(f"--param {p}: {e}") from None


def _trial(config: dict[str, Any], base: dict[str, Any], tune_dir: str) -> None:
    """Tune's driver function: one training run with this trial's values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.plan import build_job_trainer

    spec = trial_spec(base, config)
    trainer = build_job_trainer(
        spec,
        run_name=f"train-{tune.get_context().get_trial_id()}",
        storage_path=tune_dir,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def reports_per_run(spec: JobSpec) -> int:
    """An upper bound on the `ray.train.report` calls of one run (ASHA's max_t)."""
    return max(1, spec.training.phase1_steps + spec.training.phase2_steps)


def default_concurrency(spec: JobSpec) -> int:
    """How many trials the cluster's CPUs hold at once (each trial = its Train workers)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    need = spec.num_workers * spec.resources.cpus_per_worker
    return max(1, int(cpus // need))


def results_table(result_grid, params: list[Param], spec: JobSpec) -> list[dict[str, Any]]:
    """One row per trial, sorted: finished trials by mixed val loss, then the ones ASHA stopped or that failed."""
    rows = []
    for r in result_grid:
        metrics = r.metrics or {}
        finished = metrics.get("phase") == ("merge" if spec.training.phase2_steps else "members") and metrics.get(
            "step"
        ) == (spec.training.phase2_steps or spec.training.phase1_steps)
        status = "error" if r.error else ("finished" if finished else "stopped")
        rows.append({
            "trial_id": metrics.get("trial_id") or Path(r.path).name,
            "status": status,
            "params": {p.name: (r.config or {}).get(p.name) for p in params},
            METRIC: metrics.get(METRIC),
            "reports": metrics.get("training_iteration"),
            "phase": metrics.get("phase"),
            "step": metrics.get("step"),
            "error": None if r.error is None else " ".join(str(r.error).split())[:300],
            "path": r.path,
        })
    order = {"finished": 0, "stopped": 1, "error": 2}
    rows.sort(key=lambda x: (order[x["status"]], x[METRIC] if x[METRIC] is not None else math.inf))
    return rows


def format_results(rows: list[dict[str, Any]], params: list[Param]) -> str:
    header = ["#", "trial", "status", *(p.name for p in params), METRIC, "reports", "last phase/step"]
    body = []
    for i, r in enumerate(rows, 1):
        loss = "-" if r[METRIC] is None else f"{r[METRIC]:.4f}"
        vals = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r["params"].values()]
        body.append([str(i), r["trial_id"], r["status"], *vals, loss, str(r["reports"]), f"{r['phase']}/{r['step']}"])
    return markdown_table(header, body)


def _strip_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_strip_none(v) for v in x]
    return x


def write_spec(spec: JobSpec, folder: Path, stem: str) -> tuple[Path, Path]:
    """`<stem>.toml` and `<stem>.json` (TOML has no null: unset optional fields are left out)."""
    import tomli_w

    data = spec.model_dump(mode="json")
    toml_path, json_path = folder / f"{stem}.toml", folder / f"{stem}.json"
    toml_path.write_text(tomli_w.dumps(_strip_none(data)))
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    return toml_path, json_path


def tune_spec(
    spec: JobSpec,
    params: list[Param],
    trials: int,
    *,
    max_concurrent: int | None = None,
    grace_period: int = 1,
    reduction_factor: float = 2,
) -> dict[str, Any]:
    """Run the sweep; returns results.json's dict (rows sorted best first, the best spec's path)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from cluster.session import init_ray
    from cluster.trainer import check_placement
    from jobs.plan import build_plan, ensure_data

    if trials < 1:
        raise TuneError(f"--trials: must be >= 1, got {trials}")
    if not params:
        raise TuneError("no --param given: name at least one spec field to sweep")
    if is_uri(spec.storage):
        raise TuneError(f"storage: jobs.tune writes its tables to a local folder, got {spec.storage}")
    check_params(spec, params)
    ensure_data(spec)
    plan = build_plan(spec)  # the base spec's data and resources, checked once; each trial plans its own
    base = spec.model_dump(mode="json")
    base["data"]["manifest"] = plan.manifest  # the built-in corpus as the prepared folder it resolved to
    init_ray()
    check_placement(plan.resources, spec.name)

    storage = Path(spec.storage).expanduser().resolve()
    experiment = f"{spec.name}-tune"
    tune_dir = storage / experiment
    concurrency = max_concurrent or default_concurrency(spec)
    driver = tune.with_resources(
        tune.with_parameters(_trial, base=base, tune_dir=str(tune_dir)),
        {"cpu": 0.01},  # the driver only waits on its TorchTrainer; Tune refuses 0
    )
    tuner = tune.Tuner(
        driver,
        param_space={p.name: p.domain() for p in params},
        tune_config=tune.TuneConfig(
            num_samples=trials,
            metric=METRIC,
            mode="min",
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=reports_per_run(spec),
                grace_period=grace_period,
                reduction_factor=reduction_factor,
            ),
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(storage_path=str(storage), name=experiment, verbose=1),
    )
    grid = tuner.fit()
    rows = results_table(grid, params, spec)
    best = next((r for r in rows if r["status"] == "finished"), None)
    out: dict[str, Any] = {
        "name": spec.name,
        "metric": METRIC,
        "mode": "min",
        "trials": trials,
        "params": [str(p) for p in params],
        "scheduler": {"kind": "ASHA", "max_t": reports_per_run(spec), "grace_period": grace_period,
                      "reduction_factor": reduction_factor},
        "max_concurrent_trials": concurrency,
        "rows": rows,
        "best": None,
        "folder": str(tune_dir),
    }
    if best is not None:
        best_spec = trial_spec(base, best["params"])
        best_spec = best_spec.model_copy(update={"name": f"{spec.name}-best"[:63], "storage": spec.storage,
                                                 "data": spec.data})
        toml_path, json_path = write_spec(JobSpec.model_validate(best_spec.model_dump()), tune_dir, "best_spec")
        out["best"] = {**best, "spec_toml": str(toml_path), "spec_json": str(json_path)}
    tune_dir.mkdir(parents=True, exist_ok=True)
    (tune_dir / "results.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    md = f"# Sweep {spec.name}: trials sorted by {METRIC}\n\n{format_results(rows, params)}\n"
    if out["best"]:
        md += f"\nBest: {out['best']['trial_id']} -> `{out['best']['spec_toml']}`\n"
    (tune_dir / "results.md").write_text(md)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leviathan tune",
        description="Sweep a spec's hyper-parameters with Ray Tune (ASHA), one training run per trial.",
    )
    p.add_argument("--spec", required=True, help="base job spec (TOML or JSON)")
    add_spec_overrides(p)
    p.add_argument("--trials", type=int, required=True, help="number of trials (samples)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=DIST",
                   help="a swept field, e.g. training.lr=loguniform(1e-4,1e-2) (repeatable)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: what the cluster's CPUs hold)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: reports before a trial may be stopped")
    p.add_argument("--reduction-factor", type=float, default=2, help="ASHA: keep 1/factor of trials per rung")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = load_spec_with_overrides(args.spec, args.storage, args.manifest)
        params = [parse_param(t) for t in args.param]
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise TuneError(f"--max-concurrent: must be >= 1, got {args.max_concurrent}")
        if args.grace_period < 1 or args.reduction_factor <= 1:
            raise TuneError("--grace-period must be >= 1 and --reduction-factor > 1")
        out = tune_spec(spec, params, args.trials, max_concurrent=args.max_concurrent,
                        grace_period=args.grace_period, reduction_factor=args.reduction_factor)
    except ValueError as e:  # TuneError, SpecError, PlacementError, data errors: nothing ran
        print(f"leviathan tune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(Path(out["folder"], "results.md").read_text(), end="")
    if out["best"] is None:
        print("no trial finished; no best spec written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
