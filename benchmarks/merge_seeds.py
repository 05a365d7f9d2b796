"""The merged model's gaps over seeds: the demo and the custom corpus, 3 seeds each.

The spec's `seed` reaches the members' init (`cluster.members.build_member`), the
data order (every sampler's seed is derived from it) and the merger's init
(`build_merger`), so each seed is a fresh run of the whole recipe. Every run
writes report.json; from each this script takes, per column (each domain, mixed,
switch, switch pre):

- `best baseline`: merged minus the best training-free row, with the report's paired
  bootstrap 95% CI over windows (`leviathan.evaluation.merged_gaps`);
- merged minus each training-free row and minus `merged (no state)`.

and prints, per corpus, the mean and spread (sample standard deviation, min, max)
of every gap over the seeds, and how many seeds' CIs exclude zero.

    python benchmarks/merge_seeds.py [--specs jobs/specs/demo.toml jobs/specs/custom.toml] \
        [--seeds 0 1 2] [--storage DIR] [--out FILE]
    python benchmarks/merge_seeds.py --reports demo=RUN/report.json demo=RUN2/report.json ...

With --reports it trains nothing and summarises the given reports (label=path).
Negative gaps mean the merged model is better.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leviathan.run.names import BASELINES, MERGED, NO_STATE  # noqa: E402
from leviathan.run.report import best_baselines  # noqa: E402
from leviathan.run.tables import markdown_table  # noqa: E402

BEST = "best baseline"


def report_gaps(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{column: {versus: gap}} of one report, plus {column: {"best baseline ci95": [lo, hi],
    "best baseline name": name}}; versus: BEST, every training-free row and NO_STATE.
    A report written before the CIs existed gives the best-baseline gap without a CI."""
    losses = {r["name"]: r["loss"] for r in report["rows"]}
    if MERGED not in losses:
        raise ValueError("report has no merged row (a run with phase2_steps = 0)")
    best = best_baselines(report)
    out: dict[str, dict[str, Any]] = {}
    for c in report["columns"]:
        merged = losses[MERGED][c]
        gaps: dict[str, Any] = {v: merged - losses[v][c] for v in (*BASELINES, NO_STATE) if v in losses}
        gap = (report.get("gaps") or {}).get(c)
        gaps[BEST] = gap["gap"] if gap else merged - best[c][1]
        gaps[f"{BEST} name"] = gap["best_baseline"] if gap else best[c][0]
        gaps[f"{BEST} ci95"] = gap["ci95"] if gap else None
        out[c] = gaps
    return out


def summarise(reports: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{column: {versus: {mean, sd, min, max, n, ci_excludes_zero?}}} over the reports (one corpus)."""
    per = [report_gaps(r) for r in reports]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for c in per[0]:
        out[c] = {}
        for versus in [k for k in per[0][c] if not k.startswith(f"{BEST} ")]:
            values = [p[c][versus] for p in per if c in p and versus in p[c]]
            stats: dict[str, Any] = {
                "mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "n": len(values),
            }
            if versus == BEST:
                cis = [p[c][f"{BEST} ci95"] for p in per if p[c][f"{BEST} ci95"]]
                stats["with_ci"] = len(cis)
                stats["ci_excludes_zero"] = sum(1 for ci in cis if ci[0] > 0 or ci[1] < 0)
                stats["best_baselines"] = sorted({p[c][f"{BEST} name"] for p in per})
            out[c][versus] = stats
    return out


def format_summary(label: str, summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    body = []
    for c, by_versus in summary.items():
        for versus, s in by_versus.items():
            note = ""
            if versus == BEST:
                note = ", ".join(s["best_baselines"]) + (
                    f"; CI excludes 0 in {s['ci_excludes_zero']}/{s['with_ci']}" if s["with_ci"] else "; no CI in the reports")
            body.append([c, versus, f"{s['mean']:+.4f}", f"{s['sd']:.4f}", f"{s['min']:+.4f}", f"{s['max']:+.4f}",
                         str(s["n"]), note])
    table = markdown_table(["column", "merged minus", "mean", "sd", "min", "max", "seeds", "note"], body)
    return f"## {label}\n\n{table}\n"


def seeded_spec(spec: Path, seed: int, folder: Path) -> tuple[Path, str]:
    """A copy of `spec` with `seed` and a run name of its own: (path, run name)."""
    text = spec.read_text()
    name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M)
    if name is None or not re.search(r"^seed\s*=", text, re.M):
        raise SystemExit(f"{spec}: needs top-level `name` and `seed` keys")
    run = f"{name.group(1)}-seed{seed}"
    text = re.sub(r'^name\s*=.*$', f'name = "{run}"', text, count=1, flags=re.M)
    text = re.sub(r"^seed\s*=.*$", f"seed = {seed}", text, count=1, flags=re.M)
    path = folder / f"{run}.toml"
    path.write_text(text)
    return path, run


def train(spec: Path, seed: int, storage: Path, folder: Path) -> dict[str, Any]:
    path, run = seeded_spec(spec, seed, folder)
    subprocess.run([sys.executable, "-m", "jobs.train", "--spec", str(path), "--storage", str(storage),
                    "--no-progress"], check=True, cwd=ROOT)
    return json.loads((storage / run / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", nargs="+", type=Path, default=[Path("jobs/specs/demo.toml"), Path("jobs/specs/custom.toml")])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--storage", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--reports", nargs="+", default=None, metavar="LABEL=PATH",
                   help="summarise these report.json files instead of training")
    p.add_argument("--out", type=Path, default=None, help="also write the summary as JSON")
    args = p.parse_args(argv)

    by_label: dict[str, list[dict[str, Any]]] = {}
    if args.reports:
        for item in args.reports:
            label, sep, path = item.partition("=")
            if not sep:
                p.error(f"--reports: expected LABEL=PATH, got {item!r}")
            by_label.setdefault(label, []).append(json.loads(Path(path).read_text()))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            storage = args.storage or Path(tmp) / "runs"
            for spec in args.specs:
                by_label[spec.stem] = [train(spec, seed, storage, Path(tmp)) for seed in args.seeds]
    summary = {label: summarise(reports) for label, reports in by_label.items()}
    for label, s in summary.items():
        print(format_summary(label, s))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
