"""Evaluate a finished run: `python -m jobs.evaluate --run DIR` (or `leviathan evaluate`).

Loads `<run>/final/` (no Ray needed), evaluates the merged ensemble, every
member, the uniform mixture and the BTM-style posterior mixture on every
domain's val split and the mixed val set (`leviathan.evaluation`), writes
`report.json` and `report.md` into the run folder and prints the table.
`jobs.train` calls `evaluate_run` at the end of every run.

The run folder may be a local path or a pyarrow.fs URI (s3://, gs://, file://):
remote runs are copied to a temporary folder, and the reports are written back.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.entry import run_cli
from jobs.spec import BUILTIN_MANIFEST, JobSpec, SpecError, load_spec
from leviathan.run import storage
from leviathan.run.folder import REPORT_JSON, REPORT_MD, SPEC_FILE, RunFolder
from leviathan.run.names import MERGED


class RunError(ValueError):
    """A run folder that cannot be evaluated; the message is one line naming the file."""


def resolve_final(run_dir: str | Path) -> Path:
    """`<run>/final`, checked to exist (a run still training has none)."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise RunError(f"run folder not found: {run}")
    final = Path(RunFolder(str(run)).final)
    if not final.is_dir():
        raise RunError(f"{final}: no final/ folder (the run has not finished training)")
    return final


def load_run_spec(run_dir: str | Path) -> JobSpec:
    """The run's JobSpec: `<run>/spec.json`, else the copy in `<run>/final/spec.json`."""
    run = Path(run_dir).expanduser()
    folder = RunFolder(str(run))
    for path in (Path(folder.spec), Path(folder.final_file(SPEC_FILE))):
        if path.is_file():
            return load_spec(path)
    raise RunError(f"{run}: no spec.json in the run folder or in final/")


def load_final(run_dir: str | Path, device: str = "cpu"):
    """(ensemble, tokenizer) of a finished run, from `<run>/final/`."""
    from leviathan.model.ensemble import LeviathanEnsemble
    from leviathan.data.tokenizer import load_tokenizer

    final = resolve_final(run_dir)
    try:
        ensemble = LeviathanEnsemble.load(final, map_location=device)
        tokenizer = load_tokenizer(final)
    except (ValueError, OSError, RuntimeError) as e:
        raise RunError(f"cannot load the trained ensemble: {_one_line(e)}") from None
    return ensemble, tokenizer


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _manifest_for(spec: JobSpec, manifest: str | None):
    from leviathan.data.staging import load_manifest

    if manifest is None:
        manifest = spec.data.manifest
    if manifest == BUILTIN_MANIFEST:
        from jobs.prepare import ensure_builtin

        manifest = str(ensure_builtin(spec.data.tokenizer))
    try:
        return load_manifest(manifest)
    except (ValueError, OSError) as e:
        raise RunError(f"manifest {manifest}: {_one_line(e)}") from None


def _evaluate_local(
    run: Path,
    *,
    max_batches: int | None,
    batch_size: int | None,
    seq_len: int | None,
    prefix_tokens: int | None,
    manifest: str | None,
    device: str | None,
    twin: str | None = None,
) -> dict[str, Any]:
    from leviathan.evaluation import evaluate_ensemble

    final = resolve_final(run)
    spec = load_run_spec(run)
    ensemble, tokenizer = load_final(run)
    m = _manifest_for(spec, manifest)
    ours, theirs = tokenizer.spec(), m.tokenizer_spec
    if (ours.get("kind"), ours.get("vocab_size")) != (theirs.get("kind"), theirs.get("vocab_size")):
        raise RunError(
            f"{m.location}: the manifest's tokenizer ({theirs.get('kind')}, vocab {theirs.get('vocab_size')}) "
            f"is not the run's ({ours.get('kind')}, vocab {ours.get('vocab_size')} in {final})"
        )
    domains = spec.data.domains if manifest is None else None
    settings = dict(
        batch_size=batch_size or spec.training.batch_size,
        seq_len=seq_len or min(spec.training.seq_len, ensemble.config.block_size),
        max_batches=max_batches or spec.training.eval_batches,
        prefix_tokens=prefix_tokens,
        device=device or _default_device(),
    )
    try:
        # Without phase 2 the merger never trained: the report has no merged row.
        report = evaluate_ensemble(ensemble, m, domains, merged=spec.training.phase2_steps > 0, **settings)
        report["run"] = {
            "name": spec.name, "dir": str(run), "manifest": m.location, "time": time.time(), "device": settings["device"],
        }
        if twin is not None:
            twin_ensemble, _ = load_final(twin)
            if twin_ensemble.config.vocab_size != ensemble.config.vocab_size:
                raise RunError(f"--twin {twin}: vocab size {twin_ensemble.config.vocab_size} is not the run's")
            twin_spec = load_run_spec(twin)
            twin_report = evaluate_ensemble(
                twin_ensemble, m, report["domains"], merged=twin_spec.training.phase2_steps > 0, **settings
            )
            twin_report["run"] = {"name": twin_spec.name, "dir": str(twin)}
            add_twin(report, twin_report)
    except RunError:
        raise
    except ValueError as e:  # EvaluationError, or DataError from a shard too short to evaluate
        raise RunError(f"{run}: {_one_line(e)}") from None
    write_reports(run, report)
    return report


def add_twin(report: dict[str, Any], twin_report: dict[str, Any]) -> dict[str, Any]:
    """Add the twin run's merged row (e.g. the attention twin of a correlation run) to `report`.

    Both reports must come from the same windows (same domains and settings);
    the row is named "twin" and carries the twin's mixer and run name. A twin without a
    merged row (no phase 2) adds nothing.
    """
    same = ("batch_size", "seq_len", "max_batches", "prefix_tokens", "windows")
    if report["domains"] != twin_report["domains"] or any(
        report["settings"][k] != twin_report["settings"][k] for k in same
    ):
        raise RunError("twin: its evaluation used other domains or windows than the run's")
    merged = next((r for r in twin_report["rows"] if r["name"] == MERGED), None)
    if merged is None:
        return report
    twin_row = {
        **merged,
        "name": "twin",
        "kind": "twin",
        "mixer": twin_report["settings"]["mixer"],
        "run": twin_report.get("run", {}).get("name"),
    }
    report["rows"] = [r for r in report["rows"] if r["kind"] != "twin"] + [twin_row]
    report["twin"] = twin_report.get("run")
    return report


def write_reports(run: Path, report: dict[str, Any]) -> None:
    """`report.json` and `report.md` into the (local) run folder."""
    from leviathan.run.report import format_report

    folder = RunFolder(str(run))
    Path(folder.report_json).write_text(json.dumps(report, indent=2) + "\n")
    Path(folder.report_md).write_text(format_report(report, title=f"Evaluation of run {report['run']['name']}"))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_run(
    run_dir: str | Path,
    max_batches: int | None = None,
    batch_size: int | None = None,
    *,
    seq_len: int | None = None,
    prefix_tokens: int | None = None,
    manifest: str | None = None,
    device: str | None = None,
    twin: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run and write `report.json` + `report.md` into its folder.

    batch_size, seq_len and max_batches default to the run's training values
    (batch_size, seq_len capped at the members' block size, eval_batches) and
    prefix_tokens to seq_len // 4: the windows and dev prefix the workers scored
    during training, so the report's figures equal the final table's. `manifest` evaluates on another prepared corpus with
    the same tokenizer (its first `modules` domains). `twin`: a local run folder
    of the same ensemble with the other mixer (the attention twin, DESIGN
    section 4); its merged model becomes the row "twin", scored on the same
    windows. Returns the report dict
    (report.json). Raises RunError (a ValueError) with a one-line message.
    """
    kwargs = dict(
        max_batches=max_batches,
        batch_size=batch_size,
        seq_len=seq_len,
        prefix_tokens=prefix_tokens,
        manifest=manifest,
        device=device,
        twin=None if twin is None else str(twin),
    )
    run_dir = str(run_dir)
    if not storage.is_uri(run_dir):
        return _evaluate_local(Path(run_dir).expanduser(), **kwargs)
    try:
        remote = RunFolder(run_dir)
        if not storage.is_dir(remote.final):
            raise RunError(f"{remote.final}: no final/ folder (the run has not finished training)")
        with tempfile.TemporaryDirectory(prefix="leviathan-eval-") as tmp:
            local = Path(tmp) / "run"
            local.mkdir()
            mine = RunFolder(str(local))
            storage.download(remote.final, mine.final)
            if storage.is_file(remote.spec):
                storage.download(remote.spec, mine.spec)
            report = _evaluate_local(local, **kwargs)
            report["run"]["dir"] = run_dir
            write_reports(local, report)
            for name in (REPORT_JSON, REPORT_MD):
                storage.write_bytes(remote.path(name), Path(mine.path(name)).read_bytes())
            return report
    except OSError as e:
        raise RunError(f"{run_dir}: {_one_line(e)}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leviathan evaluate",
        description="Evaluate a finished run: merged ensemble vs members vs uniform vs posterior mixture.",
    )
    p.add_argument("--run", required=True, help="run folder (<storage>/<name>) containing final/")
    p.add_argument("--max-batches", type=_positive, default=None,
                   help="eval batches per domain (default: the run's training.eval_batches)")
    p.add_argument("--batch-size", type=_positive, default=None, help="windows per batch (default: the run's)")
    p.add_argument("--seq-len", type=_positive, default=None, help="tokens per window (default: the run's)")
    p.add_argument("--prefix-tokens", type=int, default=None,
                   help="posterior dev prefix per window, excluded from scoring (default seq_len // 4)")
    p.add_argument("--manifest", default=None, help="evaluate on another prepared corpus (same tokenizer)")
    p.add_argument("--twin", default=None,
                   help="run folder of the same ensemble with the other mixer (attention twin): adds its merged row")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print report.json instead of the table")
    return p


def _evaluate_and_print(args: argparse.Namespace) -> None:
    """Evaluate `args.run` and print its report (JSON or the table)."""
    report = evaluate_run(
        args.run,
        args.max_batches,
        args.batch_size,
        seq_len=args.seq_len,
        prefix_tokens=args.prefix_tokens,
        manifest=args.manifest,
        device=args.device,
        twin=args.twin,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from leviathan.run.report import format_report

        print(format_report(report, title=f"Evaluation of run {report['run']['name']}"), end="")
        folder = RunFolder(args.run)
        print(f"wrote {folder.report_md} and {folder.report_json}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("leviathan evaluate", lambda: _evaluate_and_print(args), (RunError, SpecError))


if __name__ == "__main__":
    sys.exit(main())
