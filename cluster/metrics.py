"""Training metrics: the run's `metrics.jsonl`, Ray gauges, and a progress bar.

`metrics.jsonl` (DESIGN section 7) has one `leviathan.run.records` record per
line, written by rank 0 only. After a restart the steps between the checkpoint
and the failure run again; their lines carry `"replayed": true` (rank 0 reads
the largest step already logged per phase).

The run folder may be a local path or a pyarrow.fs URI (shared storage on a
multi-node cluster). On an object store the log is a folder of part files,
`metrics/part-000000.jsonl`, one per append (`leviathan.run.storage.AppendLog`).
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

from leviathan.run.names import MERGED
from leviathan.run.progress import RunProgress, format_duration
from leviathan.run.records import PHASES, MetricsLog  # noqa: F401  (MetricsLog: the one reader and writer)


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
    "mixed_val_loss": "Validation loss on the mixed-domain validation set (member 'merged': the merged model)",
    "tokens_per_s": "Training throughput of a member or the merger (tokens/s)",
    "step": "Current step within the phase",
}
"""Gauges tagged by run, phase, module and member; exported as `ray_leviathan_<name>`."""

PHASE_GAUGE = "phase"
PHASE_NUMBER = {phase: i + 1 for i, phase in enumerate(PHASES)}
"""The `ray_leviathan_phase` gauge, tagged by run only: 1 members, 2 merge, 3 final."""


def format_progress(progress: RunProgress, phase1_steps: int, phase2_steps: int) -> str:
    """The run's progress line: `[progress] members 50/200 merge 0/100 | 10.2k tok/s | ETA 1m20s`
    (tokens/s of the current phase, ETA from the steps left at the recent step rate)."""
    steps = f"members {progress.step.get('members', 0)}/{phase1_steps} merge {progress.step.get('merge', 0)}/{phase2_steps}"
    tps = progress.current_tokens_per_s
    speed = f" | {tps / 1000:.1f}k tok/s" if tps else ""
    eta = progress.eta_s(phase1_steps, phase2_steps)
    return f"[progress] {steps}{speed} | ETA {'-' if eta is None else format_duration(eta)}"


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
    (phase-1 steps, then phase-2 steps) and shows the latest losses, the current
    phase's tokens/s and the ETA (`leviathan.run.progress`).
    """

    def __init__(self, run_dir: str, phase1_steps: int, phase2_steps: int, interval_s: float = 1.0):
        self.log = MetricsLog(run_dir)
        self.phase1_steps = phase1_steps
        self.total = phase1_steps + phase2_steps
        self.interval_s = interval_s
        # Records of earlier runs of the same folder, counted before this run can add any.
        self.start = len(self.log.read())
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

        with tqdm(total=self.total, unit="step", desc="train", dynamic_ncols=True) as bar:
            while True:
                stopping = self._stop.is_set()  # one more look after the stop: the last records show
                self._show(bar)
                if stopping:
                    return
                self._stop.wait(self.interval_s)

    def _show(self, bar: Any) -> None:
        done = 0
        postfix: dict[str, str] = {}
        progress = RunProgress()
        for r in self.log.read()[self.start:]:
            progress.fold(r)
            if r.get("phase") == "members":
                done = max(done, r["step"])
                if r.get("train_loss") is not None:
                    postfix["member"] = f"{r['train_loss']:.3f}"
            elif r.get("phase") == "merge":
                done = max(done, self.phase1_steps + r["step"])
                if r.get("member") == MERGED and r.get("train_loss") is not None:
                    postfix[MERGED] = f"{r['train_loss']:.3f}"
        if progress.current_tokens_per_s:
            postfix["tok/s"] = f"{progress.current_tokens_per_s / 1000:.1f}k"
        eta = progress.eta_s(self.phase1_steps, self.total - self.phase1_steps)
        if eta is not None:
            postfix["eta"] = format_duration(eta)
        bar.n = min(done, self.total)
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()
