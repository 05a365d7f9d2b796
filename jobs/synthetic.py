"""Synthetic recall suite: `leviathan synthetic --task T [...]` or `--grid`.

One run trains a tiny component on one task in-process (`leviathan.synthetic_train`)
and prints one result line. `--grid` runs the comparison grid:

    1. learning-rate sweep: every (task, mixer) at seed 0, the first layer count and
       the middle width, each lr of --lrs; the lr with the best held-out accuracy wins
    2. the grid: tasks x mixers (attention, correlation at each --windows) x --layer-counts
       x --widths x --seeds, each at its mixer's lr

Both stages are Ray Tune grids (`tune.Tuner` over a function trainable, one CPU
per trial) on the Ray cluster this process is joined to or `RAY_ADDRESS`
names (so also under `ray job submit`); with `--local`, or with no cluster,
they run one after another in this process. Into --out go
results.json (every row, the chosen lrs, goal 4(a) below, the CPU and wall time, the load),
table.md (task x mixer x layers x width: accuracy mean +- sd over seeds,
parameters, CPU ms per step) and plot.png (accuracy against width per task;
plot.md, a text table of the same, when matplotlib is missing).

Goal 4(a) in results.json: on mtk<k> with k >= 2, the (layers, width) cells where a
correlation model with window >= k beats attention of the same shape by >= 20
accuracy points in every seed (paired by seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs.entry import run_cli
from leviathan.run.tables import markdown_table

RESULTS_FILE, TABLE_FILE, PLOT_FILE, PLOT_TEXT_FILE = "results.json", "table.md", "plot.png", "plot.md"
GOAL_MARGIN = 0.20


class SyntheticError(ValueError):
    """A bad flag or value; the message is one line naming it."""


def _ints(text: str, flag: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SyntheticError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise SyntheticError(f"{flag}: expected integers >= {minimum}, got {text!r}")
    return values


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SyntheticError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise SyntheticError(f"{flag}: expected numbers in (0, 1], got {text!r}")
    return values


def _run_dict(run) -> dict[str, Any]:
    return asdict(run)


def _from_dict(d: dict[str, Any]):
    from leviathan.data.synthetic import TaskSettings
    from leviathan.synthetic_train import SyntheticRun

    return SyntheticRun(**{**d, "settings": TaskSettings(**d["settings"])})


def _one(d: dict[str, Any]) -> dict[str, Any]:
    import torch

    from leviathan.synthetic_train import train_synthetic

    torch.set_num_threads(1)  # CPU ms per step comparable between runs
    return train_synthetic(_from_dict(d))


def _tune_trial(config: dict[str, Any]) -> None:
    from ray import tune

    tune.report(_one(config["run"]))


def _ray_reachable() -> bool:
    """Whether a Ray cluster is there to join: this process is connected, or RAY_ADDRESS names one."""
    import ray

    from leviathan.run.ray_address import ray_address

    return ray.is_initialized() or bool(ray_address("cluster"))


def run_all(runs: list, local: bool, folder: Path, stage: str, max_concurrent: int | None = None) -> list[dict]:
    """Every run's result row: a Ray Tune grid search (one CPU per trial), or in-process when `local`."""
    dicts = [_run_dict(r) for r in runs]
    if local:
        return [_one(d) for d in dicts]
    import ray
    from ray import tune

    from cluster.session import init_ray

    init_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    tuner = tune.Tuner(
        tune.with_resources(_tune_trial, {"cpu": 1}),
        param_space={"run": tune.grid_search(dicts)},
        # A trial is seconds of CPU; a fresh actor per trial would import torch hundreds of times.
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or max(1, cpus), reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(folder.resolve()), name=f"tune-{stage}", verbose=0),
    )
    grid = tuner.fit()
    errors = [str(r.error) for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} synthetic trial(s) failed; first: {' '.join(errors[0].split())[:300]}")
    return [{k: v for k, v in r.metrics.items() if k in ROW_KEYS} for r in grid]  # Tune adds its own keys


ROW_KEYS = ("task", "mixer", "window", "n_layer", "n_embd", "seed", "lr", "steps", "batch_size", "eval_rows",
            "weight_decay", "settings", "accuracy", "train_loss", "params", "cpu_s", "cpu_ms_per_step")


def mixer_label(row: dict[str, Any]) -> str:
    return "attention" if row["mixer"] == "attention" else f"correlation w={row['window']}"


def summarise(rows: list[dict]) -> list[dict]:
    """One cell per (task, mixer, layers, width): accuracy mean and sd over seeds, params, CPU ms per step."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], mixer_label(r), r["n_layer"], r["n_embd"]), []).append(r)
    out = []
    for (task, mixer, layers, width), rs in sorted(cells.items()):
        acc = [r["accuracy"] for r in rs]
        out.append({
            "task": task, "mixer": mixer, "layers": layers, "width": width, "lr": rs[0]["lr"],
            "seeds": len(rs), "accuracy_mean": statistics.fmean(acc),
            "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "accuracy_min": min(acc), "params": rs[0]["params"],
            "cpu_ms_per_step": statistics.fmean(r["cpu_ms_per_step"] for r in rs),
        })
    return out


def goal_4a(rows: list[dict]) -> list[dict]:
    """mtk<k>, k >= 2: per (correlation window >= k, layers, width), the seed-paired gains over attention."""
    from leviathan.data.synthetic import key_len

    attention = {(r["task"], r["n_layer"], r["n_embd"], r["seed"]): r["accuracy"] for r in rows if r["mixer"] == "attention"}
    found: dict[tuple, dict[int, float]] = {}
    for r in rows:
        if r["mixer"] != "correlation" or not r["task"].startswith("mtk") or key_len(r["task"]) < 2:
            continue
        if r["window"] < key_len(r["task"]):
            continue
        base = attention.get((r["task"], r["n_layer"], r["n_embd"], r["seed"]))
        if base is not None:
            found.setdefault((r["task"], r["window"], r["n_layer"], r["n_embd"]), {})[r["seed"]] = r["accuracy"] - base
    return [
        {"task": t, "window": w, "layers": L, "width": D, "gains": [gains[s] for s in sorted(gains)],
         "holds": len(gains) >= 3 and min(gains.values()) >= GOAL_MARGIN}
        for (t, w, L, D), gains in sorted(found.items())
    ]


def format_table(cells: list[dict]) -> str:
    header = ["task", "mixer", "layers", "width", "lr", "accuracy (mean ± sd)", "min", "params", "CPU ms/step"]
    body = [[c["task"], c["mixer"], str(c["layers"]), str(c["width"]), f"{c['lr']:g}",
             f"{100 * c['accuracy_mean']:.1f} ± {100 * c['accuracy_sd']:.1f}", f"{100 * c['accuracy_min']:.1f}",
             f"{c['params']:,}", f"{c['cpu_ms_per_step']:.1f}"] for c in cells]
    return markdown_table(header, body)


def write_plot(cells: list[dict], folder: Path) -> Path:
    """Accuracy against width, one panel per task, one line per (mixer, layers)."""
    try:
        import matplotlib
    except ImportError:
        lines = [f"| {c['task']} | {c['mixer']} | {c['layers']} | {c['width']} | {'#' * round(40 * c['accuracy_mean'])} "
                 f"{100 * c['accuracy_mean']:.0f}% |" for c in cells]
        path = folder / PLOT_TEXT_FILE
        path.write_text("| task | mixer | layers | width | accuracy |\n|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
        return path
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c["task"] for c in cells})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        lines: dict[tuple, list[dict]] = {}
        for c in cells:
            if c["task"] == task:
                lines.setdefault((c["mixer"], c["layers"]), []).append(c)
        for (mixer, layers), cs in sorted(lines.items()):
            cs.sort(key=lambda c: c["width"])
            ax.errorbar([c["width"] for c in cs], [100 * c["accuracy_mean"] for c in cs],
                        yerr=[100 * c["accuracy_sd"] for c in cs], marker="o", capsize=3,
                        linestyle="-" if layers == 1 else "--", label=f"{mixer}, {layers}L")
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("model width")
        ax.set_ylim(0, 102)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = folder / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _variants(windows: list[int]) -> list[tuple[str, int]]:
    return [("attention", 1)] + [("correlation", w) for w in windows]


def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    from leviathan.synthetic_train import SyntheticRun

    tasks = _tasks(args.tasks)
    windows = _ints(args.windows, "--windows")
    layer_counts = _ints(args.layer_counts, "--layer-counts")
    widths = _ints(args.widths, "--widths", 16)
    seeds = _ints(args.seeds, "--seeds", 0) if "," in args.seeds else list(range(_ints(args.seeds, "--seeds")[0]))
    lrs = _floats(args.lrs, "--lrs")
    settings = _settings(args)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    local = args.local or not _ray_reachable()

    def make(task: str, mixer: str, w: int, layers: int, width: int, seed: int, lr: float) -> SyntheticRun:
        return _checked(SyntheticRun, task=task, mixer=mixer, window=w, n_layer=layers, n_embd=width, seed=seed,
                        lr=lr, steps=args.steps, batch_size=args.batch_size, settings=settings)

    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SyntheticError(f"--max-concurrent: must be >= 1, got {args.max_concurrent}")
    for D in widths:
        make(tasks[0], "attention", 1, layer_counts[0], D, seeds[0], lrs[0])  # refuse bad flags before any run

    cpu_start = time.process_time()
    wall_start = time.time()
    load_start = os.getloadavg()[1]  # the machine's 5-minute load: CPU time is the run's own, wall time is not
    ref_width = sorted(widths)[len(widths) // 2]
    sweep = [make(t, m, w, layer_counts[0], ref_width, seeds[0], lr)
             for t in tasks for m, w in _variants(windows) for lr in lrs]
    sweep_rows = run_all(sweep, local, folder, "lr", args.max_concurrent) if len(lrs) > 1 else []
    chosen: dict[tuple[str, str], float] = {}
    for t in tasks:
        for m, w in _variants(windows):
            label = mixer_label({"mixer": m, "window": w})
            rs = [r for r in sweep_rows if r["task"] == t and mixer_label(r) == label]
            chosen[(t, label)] = max(rs, key=lambda r: r["accuracy"])["lr"] if rs else lrs[0]
    grid = [make(t, m, w, L, D, s, chosen[(t, mixer_label({"mixer": m, "window": w}))])
            for t in tasks for m, w in _variants(windows) for L in layer_counts for D in widths for s in seeds]
    rows = run_all(grid, local, folder, "grid", args.max_concurrent)
    cells = summarise(rows)
    cpu_s = sum(r["cpu_s"] for r in sweep_rows + rows)
    out = {
        "tasks": tasks, "windows": windows, "layers": layer_counts, "widths": widths, "seeds": seeds,
        "lrs": lrs, "steps": args.steps, "batch_size": args.batch_size, "settings": asdict(settings),
        "chosen_lr": [{"task": t, "mixer": m, "lr": lr} for (t, m), lr in sorted(chosen.items())],
        "runner": "local" if local else "ray tune",
        "training_cpu_s": cpu_s, "driver_cpu_s": time.process_time() - cpu_start, "wall_s": time.time() - wall_start,
        "load_5min": [load_start, os.getloadavg()[1]],
        "goal_4a": goal_4a(rows), "cells": cells, "sweep": sweep_rows, "rows": rows,
    }
    (folder / RESULTS_FILE).write_text(json.dumps(out, indent=2) + "\n")
    goal = out["goal_4a"]
    held = [g for g in goal if g["holds"]]
    md = (f"# Synthetic recall: accuracy on held-out sequences (%, mean ± sd over {len(seeds)} seeds)\n\n"
          f"{format_table(cells)}\n\nTraining CPU time: {cpu_s:.0f} s over {len(sweep_rows) + len(rows)} runs "
          f"({args.steps} steps each, batch {args.batch_size}); wall {out['wall_s']:.0f} s at a 5-minute load of "
          f"{out['load_5min'][0]:.1f} (start) and {out['load_5min'][1]:.1f} (end).\n")
    if goal:
        md += (f"\nGoal 4(a) (correlation w >= k beats attention by >= {100 * GOAL_MARGIN:.0f} points in every seed): "
               + ("; ".join(f"{g['task']} w={g['window']} {g['layers']}L width {g['width']}" for g in held)
                  if held else "holds nowhere") + ".\n")
    (folder / TABLE_FILE).write_text(md)
    write_plot(cells, folder)
    return out


def _tasks(text: str, flag: str = "--tasks") -> list[str]:
    from leviathan.data.synthetic import check_task

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise SyntheticError(f"{flag}: name at least one task")
    for t in tasks:
        try:
            check_task(t)
        except ValueError as e:
            raise SyntheticError(f"{flag}: {str(e).partition(': ')[2]}") from None
    return tasks


def _settings(args: argparse.Namespace):
    from leviathan.data.synthetic import TaskSettings

    try:
        return TaskSettings(vocab_size=args.vocab, pairs=args.pairs)
    except ValueError as e:
        raise SyntheticError(f"--{str(e).split(':')[0].replace('_size', '').replace('_', '-')}: {str(e).split(': ', 1)[1]}") from None


FLAGS = {"n_layer": "layers", "n_embd": "width", "batch_size": "batch-size"}


def _checked(cls, **fields: Any):
    """cls(**fields), its ValueError re-worded to name the command-line flag."""
    try:
        return cls(**fields)
    except ValueError as e:
        name, _, why = str(e).partition(": ")
        raise SyntheticError(f"--{FLAGS.get(name, name)}: {why}") from None


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    from leviathan.synthetic_train import SyntheticRun

    if args.task is None:
        raise SyntheticError("--task: required without --grid")
    _tasks(args.task, "--task")
    run = _checked(SyntheticRun, task=args.task, mixer=args.mixer, window=args.window, n_layer=args.layers,
                   n_embd=args.width, seed=args.seed, lr=args.lr, steps=args.steps,
                   batch_size=args.batch_size, settings=_settings(args))
    row = _one(_run_dict(run))
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESULTS_FILE).write_text(json.dumps({"rows": [row]}, indent=2) + "\n")
    return row


def result_line(row: dict[str, Any]) -> str:
    return (f"{row['task']} {mixer_label(row)} layers={row['n_layer']} width={row['n_embd']} seed={row['seed']} "
            f"lr={row['lr']:g} steps={row['steps']}: accuracy {100 * row['accuracy']:.1f}% "
            f"params {row['params']:,} cpu {row['cpu_s']:.1f}s ({row['cpu_ms_per_step']:.1f} ms/step)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leviathan synthetic",
                                description="Synthetic recall tasks: attention against correlation (one run, or --grid).")
    p.add_argument("--task", default=None, help="mqar, mtk1..mtk4, block or induction (one run)")
    p.add_argument("--mixer", default="correlation", help="attention or correlation")
    p.add_argument("--window", type=int, default=4, help="correlation's lag window w")
    p.add_argument("--layers", type=int, default=2, help="blocks")
    p.add_argument("--width", type=int, default=64, help="model width (heads of 16)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and training-data seed")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (one-cycle cosine)")
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--vocab", type=int, default=64, help="vocabulary of the recall and induction tasks")
    p.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence (recall tasks)")
    p.add_argument("--out", default=None, help="folder for results.json (and, with --grid, table.md, plot.png)")
    p.add_argument("--grid", action="store_true", help="run the comparison grid (see --tasks ... --lrs)")
    p.add_argument("--tasks", default="mqar,mtk1,mtk2,mtk3,mtk4,block,induction", help="grid: tasks")
    p.add_argument("--windows", default="2,4,8", help="grid: correlation windows (attention always runs)")
    p.add_argument("--layer-counts", default="1,2", help="grid: layer counts")
    p.add_argument("--widths", default="32,64,128", help="grid: widths")
    p.add_argument("--seeds", default="3", help="grid: a count (3 = seeds 0,1,2) or a list (0,1,2)")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="grid: learning rates swept per mixer at seed 0")
    p.add_argument("--local", action="store_true", help="grid: run in this process instead of Ray Tune")
    p.add_argument("--max-concurrent", type=int, default=None, help="grid: trials at once (default: cluster CPUs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> None:
        if args.grid:
            if args.out is None:
                raise SyntheticError("--out: required with --grid (the folder for results.json, table.md, the plot)")
            out = run_grid(args)
            print((Path(args.out) / TABLE_FILE).read_text(), end="")
            print(f"runner {out['runner']}, wall {out['wall_s']:.0f} s; results in {args.out}")
        else:
            print(result_line(run_one(args)))

    return run_cli("leviathan synthetic", work, (SyntheticError,))


if __name__ == "__main__":
    sys.exit(main())
