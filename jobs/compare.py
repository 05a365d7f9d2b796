"""Correlation vs attention: `leviathan compare --spec FILE [--mixers ...] [--budget steps|time|flops]`.

Trains the same spec once per mixer and reports the runs side by side. The
runs differ in `ensemble.mixer` only (members' token mixers and the merger's
scoring), so they share the data, the domains, the step counts, the batch
shapes, the seeds (every weight that exists in both is initialised from the
same derived seed) and, up to the lag weights, the parameters: a correlation
mixer has n_head * window lag weights per layer (and the merger merge_heads *
merge_window) that the attention twin does not; compare.json states the exact
counts.

Each run is a normal training run (`jobs.train.run`) named `<name>-<mixer>`
in the spec's storage, evaluated with `jobs.evaluate.evaluate_run` on the same
windows (the report the training wrote is reused when its settings match);
each run's report.md then gains the other run's merged model as its twin row.
Into `<storage>/<name>-compare/` go `compare.json`, `compare.md` and the loss
curves: `loss-<mixer>.png` per run, `loss-together.png` (against steps), and
`loss-vs-time.png` and `loss-vs-flops.png` (the members' curve against the
compute budgets below).

Budgets. Both mixers train the same number of steps; `--budget` says at what
cost their losses are compared, on the members' curve of phase 1 (the mean
over members of their own-domain val loss, evaluated every eval_interval):

    steps   the step count (the runs' final members loss);
    time    the training steps' process CPU time, summed over the workers
            (metrics.jsonl `cpu_s`, evaluation excluded): on shared CPUs,
            wall-clock time would count waiting for the other tenants;
    flops   step * sum over members of `leviathan.model.flops.flops(member, seq_len,
            batch_size, device)`, the FLOPs of each run's own mixer path.

The equal-budget loss of each run is read at the largest budget both runs
reached (the cheaper run's total), interpolating linearly between evaluation
points. At that budget the cheaper run has finished its learning-rate decay
while the dearer one is read mid-schedule, before its decay ends: the reading
favours the cheaper mixer, so a win for the dearer one is a conservative
result, a loss for it an upper bound on the gap. Phase 2 is left out of the
budgets (`flops()` counts component models, not the merger); with
`--seed N` the spec's seed is N and the runs are named `<name>-seed<N>-<mixer>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from jobs.evaluate import add_twin, evaluate_run, write_reports
from jobs.entry import add_spec_overrides, load_spec_with_overrides
from jobs.spec import JobSpec, SpecError, with_values
from leviathan.config import MIXERS
from leviathan.run.folder import RunFolder
from leviathan.run.names import MERGED, MIXED, UNIFORM
from leviathan.run.storage import is_uri
from leviathan.run.tables import markdown_table


BUDGETS = ("steps", "time", "flops")


class CompareError(ValueError):
    """Comparison settings that cannot be used; the message is one line."""


def parse_mixers(text: str) -> list[str]:
    mixers = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in mixers if m not in MIXERS]
    if bad or not mixers:
        raise CompareError(f"--mixers: {bad or text!r} not in {', '.join(MIXERS)}")
    if len(set(mixers)) != len(mixers):
        raise CompareError(f"--mixers: {text!r} names a mixer twice")
    return mixers


def spec_for_mixer(spec: JobSpec, mixer: str) -> JobSpec:
    """The same spec with `ensemble.mixer` set and its own run name `<name>-<mixer>`."""
    try:
        return with_values(spec, {"ensemble.mixer": mixer, "name": f"{spec.name}-{mixer}"})
    except SpecError as e:
        raise CompareError(f"spec for mixer {mixer}: {e}") from None


def with_seed(spec: JobSpec, seed: int) -> JobSpec:
    """The spec with another seed, named `<name>-seed<N>` so each seed's runs have their own folders."""
    try:
        return with_values(spec, {"seed": seed, "name": f"{spec.name}-seed{seed}"})
    except SpecError as e:
        raise CompareError(f"--seed: {e}") from None


def _read_metrics(run_dir: str) -> list[dict[str, Any]]:
    from cluster.metrics import MetricsLog

    return [r for r in MetricsLog(run_dir).read() if not r.get("replayed")]


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def curves(records: list[dict[str, Any]], phase1_steps: int) -> dict[str, list[tuple[int, float]]]:
    """Validation curves of a run on one step axis (phase 2 steps follow phase 1's).

    `members`: the mean over members of their own-domain val loss; `uniform`:
    the uniform mixture's mixed val loss; `merged`: the merger's mixed val
    loss; and one curve per member (own-domain val loss).
    """
    out: dict[str, list[tuple[int, float]]] = {}
    by_step: dict[int, list[float]] = {}
    for r in records:
        phase = r.get("phase")
        if phase not in ("members", "merge") or r.get("step") is None:
            continue
        x = r["step"] + (phase1_steps if phase == "merge" else 0)
        member = r.get("member")
        if member == MERGED and r.get("mixed_val_loss") is not None:
            out.setdefault(MERGED, []).append((x, r["mixed_val_loss"]))
        elif member == UNIFORM and r.get("mixed_val_loss") is not None:
            out.setdefault(UNIFORM, []).append((x, r["mixed_val_loss"]))
        elif phase == "members" and r.get("val_loss") is not None:
            out.setdefault(member, []).append((x, r["val_loss"]))
            by_step.setdefault(x, []).append(r["val_loss"])
    out["members"] = sorted((x, sum(v) / len(v)) for x, v in by_step.items())
    return {k: sorted(v) for k, v in out.items()}


def plot_curves(runs: dict[str, dict[str, Any]], folder: Path, phase1_steps: int) -> list[Path]:
    """loss-<mixer>.png per run (every member, uniform, merged) and loss-together.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for mixer, run in runs.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, pts in run["curves"].items():
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = {"members": dict(lw=2.5, color="black"), "uniform": dict(lw=2, ls="--"),
                     MERGED: dict(lw=2.5, marker="o", ms=4)}.get(name, dict(lw=1, alpha=0.6))
            ax.plot(xs, ys, label=name if name != "members" else "members (mean, own domain)", **style)
        ax.axvline(phase1_steps, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="step (phase 1 members, then phase 2 merge)", ylabel="val loss (nats/token)",
               title=f"{run['name']}: validation loss")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = folder / f"loss-{mixer}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mixer, run in runs.items():
        line = None
        for name, ls in (("members", "-"), (UNIFORM, "--"), (MERGED, "-")):
            pts = run["curves"].get(name)
            if not pts:
                continue
            xs, ys = zip(*pts)
            kw = {"color": line.get_color()} if line is not None else {}
            (h,) = ax.plot(xs, ys, ls=ls, lw=2.5 if name == MERGED else 1.5, marker="o" if name == MERGED else None,
                           ms=4, label=f"{mixer}: {name}", **kw)
            line = line or h
    ax.axvline(phase1_steps, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="step (phase 1 members, then phase 2 merge)", ylabel="val loss (nats/token)",
           title="correlation vs attention" if set(runs) == set(MIXERS) else "validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "loss-together.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [*paths, path]


def budget_curves(
    records: list[dict[str, Any]], flops_per_step: int
) -> dict[str, list[tuple[float, float]]]:
    """The members' curve of phase 1 against each budget: {budget: [(spent, mean val loss)]}.

    Time is the running sum of the phase-1 reports' `cpu_s` (each report covers
    the steps since the previous one), FLOPs are step * flops_per_step.
    """
    members = dict(curves(records, 0)["members"])
    cpu_by_step: dict[int, float] = {}
    for r in records:
        if r.get("phase") == "members" and r.get("member") == "uniform" and r.get("cpu_s") is not None:
            cpu_by_step[r["step"]] = r["cpu_s"]
    out: dict[str, list[tuple[float, float]]] = {"steps": [], "time": [], "flops": []}
    spent = 0.0
    for step in sorted(members):
        loss = members[step]
        out["steps"].append((float(step), loss))
        out["flops"].append((float(step * flops_per_step), loss))
        if step in cpu_by_step:
            spent += cpu_by_step[step]
            out["time"].append((spent, loss))
    return out


def loss_at(curve: list[tuple[float, float]], spent: float) -> float:
    """The loss at budget `spent`, linearly interpolated between the curve's evaluation points."""
    if not curve or not curve[0][0] <= spent <= curve[-1][0]:
        span = f"{curve[0][0]:.4g}..{curve[-1][0]:.4g}" if curve else "no points"
        raise CompareError(f"budget {spent:.4g} is outside the evaluated range ({span}): evaluate more often")
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= spent <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (spent - x0) / (x1 - x0)
    return curve[-1][1]  # a single point, spent == its budget


def equal_budget(runs: dict[str, dict[str, Any]], budget: str) -> dict[str, Any]:
    """Each run's members loss at the largest `budget` every run reached."""
    ends = {m: run["budget_curves"][budget][-1][0] if run["budget_curves"][budget] else 0.0
            for m, run in runs.items()}
    spent = min(ends.values())
    return {
        "budget": budget,
        "at": spent,
        "spent": ends,
        "loss": {m: loss_at(run["budget_curves"][budget], spent) for m, run in runs.items()},
    }


def plot_budgets(runs: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    """loss-vs-time.png and loss-vs-flops.png: the members' curve of every run against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"time": ("training CPU time, all workers (s)", 1.0), "flops": ("training FLOPs (TFLOP)", 1e12)}
    paths = []
    for budget, (xlabel, scale) in labels.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mixer, run in runs.items():
            pts = run["budget_curves"][budget]
            if pts:
                xs, ys = zip(*pts)
                ax.plot([x / scale for x in xs], ys, marker="o", ms=3, lw=2, label=mixer)
        ax.set(xlabel=xlabel, ylabel="members' val loss (mean, own domain)", title=f"phase 1: loss against {budget}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"loss-vs-{budget}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _load_ensemble(run_dir: str):
    from jobs.evaluate import load_final

    return load_final(run_dir)[0]


def _params(ensemble) -> dict[str, Any]:
    lag = sum(p.numel() for n, p in ensemble.named_parameters() if "lag" in n)
    return {
        "total": ensemble.num_params(),
        "members": {n: m.num_params() for n, m in zip(ensemble.member_names, ensemble.members)},
        "lag_weights": lag,
    }


def phase1_flops_per_step(ensemble, spec: JobSpec) -> int:
    """FLOPs of one phase-1 step: every member trains on its own batch, on its own mixer path."""
    from leviathan.model.flops import flops

    device = "cuda" if spec.resources.use_gpu else "cpu"
    t = spec.training
    return sum(flops(m, t.seq_len, t.batch_size, device) for m in ensemble.config.members)


def _report_for(run_dir: str, max_batches: int | None) -> dict[str, Any]:
    """The run's report.json when the training already wrote it with these settings
    (max_batches None: the run's own), else a fresh one."""
    path = Path(RunFolder(run_dir).report_json)
    if path.is_file():
        report = json.loads(path.read_text())
        if max_batches is None or report.get("settings", {}).get("max_batches") == max_batches:
            return report
    return evaluate_run(run_dir, max_batches=max_batches)


def summarise_run(spec: JobSpec, wall_s: float, report: dict[str, Any]) -> dict[str, Any]:
    """One run's line of the comparison: evaluation, speed, wall time, parameters."""
    records = _read_metrics(spec.run_dir)
    times = [r["time"] for r in records if r.get("time") is not None]
    merged = next((r for r in report["rows"] if r["name"] == MERGED), None)  # none without phase 2
    ensemble = _load_ensemble(spec.run_dir)
    flops_per_step = phase1_flops_per_step(ensemble, spec)
    phase1_cpu = [r["cpu_s"] for r in records
                  if r.get("phase") == "members" and r.get("member") == "uniform" and r.get("cpu_s") is not None]
    return {
        "name": spec.name,
        "run_dir": spec.run_dir,
        "mixer": spec.ensemble.mixer,
        "params": _params(ensemble),
        "phase1_flops_per_step": flops_per_step,
        "phase1_cpu_s": sum(phase1_cpu) if phase1_cpu else None,
        "budget_curves": budget_curves(records, flops_per_step),
        "wall_s": wall_s,
        "train_span_s": (max(times) - min(times)) if len(times) > 1 else None,
        "tokens_per_s": {
            "members": _median([r.get("tokens_per_s") for r in records
                                if r.get("phase") == "members" and r.get("member") not in (UNIFORM, MERGED)]),
            "merge": _median([r.get("tokens_per_s") for r in records
                              if r.get("phase") == "merge" and r.get("member") == MERGED]),
        },
        "merged": None if merged is None else {"loss": merged["loss"], "bpb": merged["bpb"]},
        "rows": {r["name"]: {"loss": r["loss"], "bpb": r["bpb"], "domain": r["domain"]}
                 for r in report["rows"] if r["kind"] != "twin"},
        "curves": curves(records, spec.training.phase1_steps),
    }


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_compare(result: dict[str, Any]) -> str:
    """compare.md: the merged model per mixer, then every evaluation row's mixed loss per mixer."""
    runs = result["runs"]
    cols = result["columns"]
    t = result["training"]
    lines = [
        f"# {result['name']}: {' vs '.join(runs)}",
        "",
        f"Same spec, data, steps ({t['phase1_steps']} member + {t['phase2_steps']} merge steps, "
        f"batch {t['batch_size']} x {t['seq_len']} tokens) and seed {result['seed']}; only "
        f"`ensemble.mixer` differs. Evaluation: at most {result['eval']['max_batches']} batch(es) "
        "per domain, the same windows for every run.",
        "",
        "## Merged ensemble",
        "",
    ]
    head = ["mixer", "params", *(f"{c} loss" for c in cols), f"{MIXED} bpb", "member tok/s", "merge tok/s", "wall s"]
    body = []
    for mixer, run in runs.items():
        merged = run["merged"] or {"loss": {}, "bpb": {}}  # no merged row: a run without phase 2
        body.append([
            mixer, f"{run['params']['total']:,}", *(_fmt(merged["loss"].get(c)) for c in cols),
            _fmt(merged["bpb"].get(MIXED)), _fmt(run["tokens_per_s"]["members"], 0),
            _fmt(run["tokens_per_s"]["merge"], 0), _fmt(run["wall_s"], 1),
        ])
    lines += [markdown_table(head, body), ""]
    first = next(iter(runs.values()))
    lines += ["## Every row, mixed val set (loss / bits per byte)", ""]
    body = []
    for name, r in first["rows"].items():
        label = f"{name} ({r['domain']})" if r["domain"] else name
        body.append([label] + [
            f"{_fmt(run['rows'][name]['loss'][MIXED])} / {_fmt(run['rows'][name]['bpb'][MIXED])}"
            for run in runs.values()
        ])
    lines += [markdown_table(["model", *runs], body), ""]
    p = {m: run["params"] for m, run in runs.items()}
    lines.append(
        "Parameters: " + "; ".join(f"{m} {v['total']:,} ({v['lag_weights']:,} lag weights)" for m, v in p.items())
        + ". Wall time: the whole training run (`jobs.train.run`, Ray Train worker start-up included); "
        "tok/s: the median of the training's own figures, batch x seq_len tokens per step over the step time "
        "(a phase-1 step trains every member of a worker on its own batch; a phase-2 step is one merged batch)."
    )
    figures = ", ".join(f"`{Path(f).name}`" for f in result["figures"])
    lines += ["", *format_budgets(result), "", f"Loss curves: {figures}"]
    return "\n".join(lines) + "\n"


def format_budgets(result: dict[str, Any]) -> list[str]:
    """The members' val loss of every run at each equal budget, the chosen budget first."""
    runs = result["runs"]
    chosen = result["budget"]
    order = [chosen] + [b for b in BUDGETS if b != chosen]
    units = {"steps": ("steps", 1.0, 0), "time": ("CPU s", 1.0, 1), "flops": ("TFLOP", 1e12, 2)}
    body = []
    for b in order:
        e = result["equal"][b]
        unit, scale, digits = units[b]
        body.append([b + (" (chosen)" if b == chosen else ""), f"{e['at'] / scale:.{digits}f} {unit}",
                     *(f"{_fmt(e['loss'][m])} ({e['spent'][m] / scale:.{digits}f})" for m in runs)])
    head = ["equal budget", "read at", *(f"{m} loss (its total)" for m in runs)]
    steps = result["training"]["phase1_steps"]
    per_step = "; ".join(
        f"{m} {run['phase1_flops_per_step'] / 1e9:.2f} GFLOP/step, "
        f"{_fmt(run['phase1_cpu_s'] / steps if run['phase1_cpu_s'] else None, 3)} CPU s/step"
        for m, run in runs.items()
    )
    return [
        f"## Members at equal budgets (phase 1, {chosen} chosen)",
        "",
        markdown_table(head, body),
        "",
        f"Members' val loss: the mean over members of their own-domain val loss, read at the largest budget "
        f"both runs reached, interpolated between evaluation points. Cost: {per_step}.",
    ]


def compare(
    spec: JobSpec,
    mixers: list[str] | tuple[str, ...] = MIXERS,
    *,
    max_batches: int | None = None,
    progress: bool | None = None,
    budget: str = "steps",
) -> dict[str, Any]:
    """Train `spec` once per mixer, evaluate each run, write the comparison; returns compare.json's dict."""
    if budget not in BUDGETS:
        raise CompareError(f"--budget: {budget!r} is not one of {', '.join(BUDGETS)}")
    import jobs.train

    from cluster.session import init_ray

    if is_uri(spec.storage):
        raise CompareError(f"storage: compare writes its figures to a local folder, got {spec.storage}")
    init_ray()  # started once, before the first run, so no run's wall time includes it
    runs: dict[str, dict[str, Any]] = {}
    reports: dict[str, dict[str, Any]] = {}
    for mixer in mixers:
        s = spec_for_mixer(spec, mixer)
        print(f"[compare] training {s.name} ({mixer}) into {s.run_dir}", flush=True)
        t0 = time.perf_counter()
        jobs.train.run(s, progress=progress)
        wall = time.perf_counter() - t0
        reports[mixer] = _report_for(s.run_dir, max_batches)
        runs[mixer] = summarise_run(s, wall, reports[mixer])
    if len(mixers) == 2:  # each run's report.md gains the other's merged model as its twin row
        for mixer, other in (mixers, mixers[::-1]):
            write_reports(Path(runs[mixer]["run_dir"]), add_twin(reports[mixer], reports[other]))
    folder = Path(spec.storage).expanduser() / f"{spec.name}-compare"
    folder.mkdir(parents=True, exist_ok=True)
    figures = plot_curves(runs, folder, spec.training.phase1_steps) + plot_budgets(runs, folder)
    first = next(iter(runs.values()))
    result = {
        "name": spec.name,
        "seed": spec.seed,
        "mixers": list(mixers),
        "budget": budget,
        "equal": {b: equal_budget(runs, b) for b in BUDGETS},
        "columns": list(next(iter(reports.values()))["columns"]),
        "training": spec.training.model_dump(),
        "eval": {"max_batches": next(iter(reports.values()))["settings"]["max_batches"]},
        "runs": runs,
        "figures": [str(f) for f in figures],
    }
    (folder / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "compare.md").write_text(format_compare(result))
    result["folder"] = str(folder)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leviathan compare",
        description="Train a spec once per token mixer (correlation vs attention) and compare the runs.",
    )
    p.add_argument("--spec", required=True, help="job spec (TOML or JSON)")
    add_spec_overrides(p)
    p.add_argument("--mixers", default=",".join(MIXERS), help="comma-separated mixers (default: correlation,attention)")
    p.add_argument("--budget", choices=BUDGETS, default="steps",
                   help="compare the losses at equal steps, training CPU time or FLOPs (default: steps)")
    p.add_argument("--seed", type=int, default=None,
                   help="train with this seed instead of the spec's; the runs are named <name>-seed<N>-<mixer>")
    p.add_argument("--max-batches", type=int, default=None,
                   help="eval batches per domain (default: the spec's training.eval_batches)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_batches is not None and args.max_batches < 1:
            raise CompareError(f"--max-batches: must be >= 1, got {args.max_batches}")
        spec = load_spec_with_overrides(args.spec, args.storage, args.manifest)
        if args.seed is not None:
            spec = with_seed(spec, args.seed)
        result = compare(spec, parse_mixers(args.mixers), max_batches=args.max_batches,
                         progress=False if args.no_progress else None, budget=args.budget)
    except ValueError as e:  # SpecError, CompareError, RunError, PlacementError: a run could not start
        print(f"leviathan compare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # jobs.train.TrainError: a run started and failed
        print(f"leviathan compare: error: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        return 1
    print((Path(result["folder"]) / "compare.md").read_text(), end="")
    print(f"wrote {result['folder']}/compare.json, compare.md and the loss curves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
