"""Training metrics: the run's `metrics.jsonl`, Ray gauges, and a progress bar.

`metrics.jsonl` (DESIGN section 7) has one JSON object per line, written by
rank 0 only:

    {"time": unix_s, "step": int, "phase": "members" | "merge" | "final",
     "module": int | null, "member": "m0.1" | "merger" | "uniform",
     "domain": str | null, "train_loss": float | null, "val_loss": float | null,
     "mixed_val_loss": float | null, "lr": float | null,
     "tokens_per_s": float | null, "replayed": bool}

and a last `{"phase": "done", ...}` line when the job finishes. After a restart
the steps between the checkpoint and the failure run again; their lines carry
`"replayed": true` (rank 0 reads the largest step already logged per phase).

The run folder may be a local path or a pyarrow.fs URI (shared storage on a
multi-node cluster); URIs without append support are rewritten whole.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable

METRICS_FILE = "metrics.jsonl"
PHASES = ("members", "merge", "final")

RECORD_FIELDS = (
    "time", "step", "phase", "module", "member", "domain", "train_loss", "val_loss",
    "mixed_val_loss", "lr", "tokens_per_s", "replayed",
)


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def record(
    *,
    step: int,
    phase: str,
    member: str,
    module: int | None = None,
    domain: str | None = None,
    train_loss: float | None = None,
    val_loss: float | None = None,
    mixed_val_loss: float | None = None,
    lr: float | None = None,
    tokens_per_s: float | None = None,
    replayed: bool = False,
    val_by_domain: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One metrics.jsonl record (every field present, non-finite numbers as null).

    `val_by_domain` (domain -> val loss) rides along in memory for the final
    table; it is not part of the metrics.jsonl line.
    """
    if phase not in PHASES:
        raise ValueError(f"phase: {phase!r} is not one of {PHASES}")
    return {
        "time": time.time(),
        "step": int(step),
        "phase": phase,
        "module": module,
        "member": member,
        "domain": domain,
        "train_loss": _num(train_loss),
        "val_loss": _num(val_loss),
        "mixed_val_loss": _num(mixed_val_loss),
        "lr": _num(lr),
        "tokens_per_s": _num(tokens_per_s),
        "replayed": bool(replayed),
        **({"val_by_domain": val_by_domain} if val_by_domain is not None else {}),
    }


def _is_uri(path: str) -> bool:
    return "://" in path


class MetricsLog:
    """Appends records to `<run_dir>/metrics.jsonl` (local path or URI)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir.rstrip("/")
        self.path = f"{self.run_dir}/{METRICS_FILE}"

    def read(self) -> list[dict[str, Any]]:
        """Every complete record so far (a torn last line is skipped)."""
        text = self._read_text()
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def logged_steps(self) -> dict[str, int]:
        """Largest step already logged per phase ({} for a fresh run)."""
        steps: dict[str, int] = {}
        for r in self.read():
            phase, step = r.get("phase"), r.get("step")
            if phase in PHASES and isinstance(step, int):
                steps[phase] = max(steps.get(phase, -1), step)
        return steps

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if not lines:
            return
        if not _is_uri(self.path):
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
            return
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(self.path)
        old = self._read_text()
        if old and not old.endswith("\n"):
            old += "\n"
        with fs.open_output_stream(path) as f:
            f.write((old + lines).encode())

    def _read_text(self) -> str:
        if not _is_uri(self.path):
            p = Path(self.path)
            return p.read_text() if p.is_file() else ""
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(self.path)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return ""
        with fs.open_input_stream(path) as f:
            return f.read().decode()


def format_line(r: dict[str, Any]) -> str:
    """A log line for one record: `[members] step 50 m0.1 (python) train 2.41 val 2.38 mixed 2.90 | 10.2k tok/s`."""

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    where = f" ({r['domain']})" if r.get("domain") else ""
    tps = r.get("tokens_per_s")
    speed = f" | {tps / 1000:.1f}k tok/s" if tps else ""
    replay = " (replayed)" if r.get("replayed") else ""
    return (
        f"[{r['phase']}] step {r['step']} {r['member']}{where}: train {f(r.get('train_loss'))} "
        f"val {f(r.get('val_loss'))} mixed-val {f(r.get('mixed_val_loss'))}{speed}{replay}"
    )


GAUGES = {
    "train_loss": "Training loss (nats/token) of a member or the merger",
    "val_loss": "Validation loss on the member's own domain",
    "mixed_val_loss": "Validation loss on the mixed-domain validation set (member 'merger': the merged model)",
    "tokens_per_s": "Training throughput of a member or the merger (tokens/s)",
    "step": "Current step within the phase",
}
"""Gauges tagged by run, phase, module and member; exported as `ray_leviathan_<name>`."""

PHASE_GAUGE = "phase"
PHASE_NUMBER = {phase: i + 1 for i, phase in enumerate(PHASES)}
"""The `ray_leviathan_phase` gauge, tagged by run only: 1 members, 2 merge, 3 final."""


class Gauges:
    """`ray.util.metrics` gauges for the dashboard (`GAUGES`, plus the run's phase).

    Exported as `ray_leviathan_*` on each node's metrics port; Ray adds the
    worker's own tags. Created lazily in the worker process (Ray metrics need
    a connected worker).
    """

    TAGS = ("run", "phase", "module", "member")

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.run = run
        self._gauges = {
            name: Gauge(f"leviathan_{name}", description=desc, tag_keys=self.TAGS) for name, desc in GAUGES.items()
        }
        self._phase = Gauge(f"leviathan_{PHASE_GAUGE}", description="Training phase: 1 members, 2 merge, 3 final",
                            tag_keys=("run",))

    def update(self, r: dict[str, Any]) -> None:
        tags = {
            "run": self.run,
            "phase": r["phase"],
            "module": "" if r.get("module") is None else str(r["module"]),
            "member": r["member"],
        }
        self._phase.set(PHASE_NUMBER[r["phase"]], tags={"run": self.run})
        self._gauges["step"].set(r["step"], tags=tags)
        for name in ("train_loss", "val_loss", "mixed_val_loss", "tokens_per_s"):
            if r.get(name) is not None:
                self._gauges[name].set(r[name], tags=tags)


class ProgressBar:
    """Driver-side progress bar: tails `metrics.jsonl` while `fit()` runs.

    Workers log at every eval interval; the bar moves to the largest step seen
    (phase-1 steps, then phase-2 steps) and shows the latest losses.
    """

    def __init__(self, run_dir: str, phase1_steps: int, phase2_steps: int, interval_s: float = 1.0):
        self.log = MetricsLog(run_dir)
        self.phase1_steps = phase1_steps
        self.total = phase1_steps + phase2_steps
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leviathan-progress", daemon=True)

    def __enter__(self) -> "ProgressBar":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm import tqdm

        start = len(self.log.read())  # earlier runs of the same folder
        with tqdm(total=self.total, unit="step", desc="train", dynamic_ncols=True) as bar:
            while True:
                records = self.log.read()[start:]
                done = 0
                postfix: dict[str, str] = {}
                for r in records:
                    if r.get("phase") == "members":
                        done = max(done, r["step"])
                        if r.get("train_loss") is not None:
                            postfix["member"] = f"{r['train_loss']:.3f}"
                    elif r.get("phase") == "merge":
                        done = max(done, self.phase1_steps + r["step"])
                        if r.get("member") == "merger" and r.get("train_loss") is not None:
                            postfix["merger"] = f"{r['train_loss']:.3f}"
                bar.n = min(done, self.total)
                bar.set_postfix(postfix, refresh=False)
                bar.refresh()
                if self._stop.wait(self.interval_s):
                    return
