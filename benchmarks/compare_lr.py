"""`leviathan compare` at a learning rate of the command line: one point of a per-mixer lr sweep.

    python benchmarks/compare_lr.py --spec jobs/specs/compare-long.toml --lr 3e-3 --seed 0 \\
        [--manifest DIR] [--mixers correlation]

The spec with `training.lr` and `seed` replaced, named `<name>-lr<LR>-seed<N>`
(LR as written, a point written p: 1e-3 or 0p001), so each point of the sweep has its own run folders and its
own `<name>-lr<LR>-seed<N>-compare/compare.json`; `benchmarks/compare_seeds.py`
pools those files, picks each mixer's lr and pairs the mixers seed by seed.
With `--mixers` one mixer trains alone (when the mixers' best lrs differ).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.compare import compare, parse_mixers
from jobs.entry import load_spec_with_overrides
from jobs.spec import with_values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--lr", required=True, help="training.lr, also written into the run names")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--manifest", default=None, help="override the spec's data.manifest")
    ap.add_argument("--mixers", default="correlation,attention")
    args = ap.parse_args(argv)
    try:
        lr = float(args.lr)
    except ValueError:
        ap.error(f"--lr: {args.lr!r} is not a number")
    spec = load_spec_with_overrides(args.spec, manifest=args.manifest)
    tag = args.lr.replace(".", "p").replace("+", "")
    spec = with_values(spec, {"training.lr": lr, "seed": args.seed, "name": f"{spec.name}-lr{tag}-seed{args.seed}"})
    result = compare(spec, parse_mixers(args.mixers), progress=False, budget="time")
    print((Path(result["folder"]) / "compare.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
