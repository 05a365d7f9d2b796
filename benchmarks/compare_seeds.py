"""Pool `leviathan compare` results over seeds and learning rates: mean, spread, paired gaps.

    python benchmarks/compare_seeds.py RUNS/*-compare/compare.json \\
        [--lr correlation=3e-3 --lr attention=3e-3] [--out summary.json]

Every compare.json given holds both mixers' runs of one seed at one learning
rate (`training.lr`). The runs are pooled by (seed length, lr, mixer, seed):
first a table of every run's final members val loss (the learning-rate sweep),
then, per context length, each mixer at its own lr (`--lr`, else the lr with
the lowest final val loss at the smallest seed, the sweep seed) paired seed by
seed at equal steps, equal training CPU time and equal FLOPs. The pairing
re-reads both runs' budget curves with `jobs.compare.equal_budget`, so a pair
of runs trained at different lrs (two compare.json files) is read exactly as
`compare` reads the runs of one file. Differences are correlation minus
attention: negative means correlation is better.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from jobs.compare import BUDGETS, equal_budget

Key = tuple[int, float, str, int]  # seq_len, lr, mixer, seed


def pool(paths: list[str]) -> dict[Key, dict[str, Any]]:
    """Every run of every compare.json, keyed by (seq_len, lr, mixer, seed); a repeat is an error."""
    runs: dict[Key, dict[str, Any]] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        training = result["training"]
        for mixer, run in result["runs"].items():
            key = (int(training["seq_len"]), float(training["lr"]), mixer, int(result["seed"]))
            if key in runs:
                raise SystemExit(f"compare_seeds: {key} appears twice ({path})")
            runs[key] = run
    return runs


def final_loss(run: dict[str, Any]) -> float:
    return run["budget_curves"]["steps"][-1][1]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def chosen_lrs(runs: dict[Key, dict[str, Any]], seq_len: int, fixed: dict[str, float]) -> dict[str, float]:
    """Each mixer's lr: given, else the best final loss at the sweep seed (the smallest seed)."""
    out = {}
    for mixer in sorted({k[2] for k in runs if k[0] == seq_len}):
        if mixer in fixed:
            out[mixer] = fixed[mixer]
            continue
        seed = min(k[3] for k in runs if k[0] == seq_len and k[2] == mixer)
        swept = {k[1]: final_loss(r) for k, r in runs.items() if k[0] == seq_len and k[2] == mixer and k[3] == seed}
        out[mixer] = min(swept, key=swept.get)
    return out


def paired(runs: dict[Key, dict[str, Any]], seq_len: int, lrs: dict[str, float]) -> dict[str, Any]:
    """Per seed with both mixers at their lrs: each budget's equal reading and the gap."""
    seeds = sorted({k[3] for k in runs if k[0] == seq_len}
                   & {k[3] for k in runs if k[:3] == (seq_len, lrs["correlation"], "correlation")}
                   & {k[3] for k in runs if k[:3] == (seq_len, lrs["attention"], "attention")})
    per_seed = {}
    for seed in seeds:
        pair = {m: runs[(seq_len, lrs[m], m, seed)] for m in ("correlation", "attention")}
        per_seed[seed] = {
            b: {**(e := equal_budget(pair, b)), "gap": e["loss"]["correlation"] - e["loss"]["attention"]}
            for b in BUDGETS
        }
        per_seed[seed]["cpu_s_per_step"] = {
            m: r["phase1_cpu_s"] / r["budget_curves"]["steps"][-1][0] for m, r in pair.items()
        }
    return {"seq_len": seq_len, "lrs": lrs, "seeds": seeds, "per_seed": per_seed}


def format_sweep(runs: dict[Key, dict[str, Any]]) -> list[str]:
    lines = ["| T | lr | mixer | seed | final val loss | CPU s |", "|---:|---:|---|---:|---:|---:|"]
    for (t, lr, mixer, seed), run in sorted(runs.items()):
        lines.append(f"| {t} | {lr:g} | {mixer} | {seed} | {final_loss(run):.4f} | {run['phase1_cpu_s']:.1f} |")
    return lines


def format_paired(p: dict[str, Any]) -> list[str]:
    seeds = p["seeds"]
    lines = [
        f"T = {p['seq_len']}, lr: correlation {p['lrs']['correlation']:g}, attention {p['lrs']['attention']:g}, "
        f"seeds {seeds}",
        "",
        "| budget | correlation | attention | correlation - attention, per seed | mean gap |",
        "|---|---:|---:|---|---:|",
    ]
    for b in BUDGETS:
        loss = {m: [p["per_seed"][s][b]["loss"][m] for s in seeds] for m in ("correlation", "attention")}
        gaps = [p["per_seed"][s][b]["gap"] for s in seeds]
        lines.append(f"| {b} | {mean_sd(loss['correlation'])} | {mean_sd(loss['attention'])} | "
                     f"{' / '.join(f'{g:+.4f}' for g in gaps)} | {statistics.mean(gaps):+.4f} |")
    ratios = [p["per_seed"][s]["cpu_s_per_step"]["correlation"] / p["per_seed"][s]["cpu_s_per_step"]["attention"]
              for s in seeds]
    lines += ["", f"training CPU per step, correlation / attention: {' / '.join(f'{r:.2f}x' for r in ratios)}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("compare_json", nargs="+")
    ap.add_argument("--lr", action="append", default=[], metavar="MIXER=LR", help="fix a mixer's lr")
    ap.add_argument("--out", default=None, help="write the pooled summary as JSON")
    args = ap.parse_args(argv)
    fixed = {}
    for item in args.lr:
        mixer, _, value = item.partition("=")
        try:
            fixed[mixer] = float(value)
        except ValueError:
            ap.error(f"--lr: {item!r} is not MIXER=LR")
    runs = pool(args.compare_json)
    lines = format_sweep(runs)
    summaries = []
    for seq_len in sorted({k[0] for k in runs}):
        summaries.append(paired(runs, seq_len, chosen_lrs(runs, seq_len, fixed)))
        lines += ["", *format_paired(summaries[-1])]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(summaries, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
