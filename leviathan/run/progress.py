"""Throughput and time left of a training run, folded from its metrics records.

The API's job detail, the CLI's progress line and the tracking runs show the
same two figures, computed here once from `leviathan.run.records` lines (so this
module is torch-free and importable by every layer):

- tokens/s per phase: the job's training throughput at its latest report. In
  phase 1 every module trains on its own batch, so the job's figure is the sum
  over modules of each module's latest `tokens_per_s` (the members of one module
  share a batch and report the same figure). In phase 2 the whole job trains on
  one mixed batch per step: the merged row's `tokens_per_s`.
- ETA: the steps left in the schedule (phase1_steps + phase2_steps minus the
  steps done) at the recent step rate, i.e. steps per second between the two
  latest reports of the phase. That rate includes evaluation and checkpoints,
  which `tokens_per_s` leaves out. A phase that has not reported twice yet is
  assumed to run at the rate of the phase before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from leviathan.run.names import MERGED
from leviathan.run.records import DONE_PHASE

TRAINING_PHASES = ("members", "merge")


@dataclass
class RunProgress:
    """Fold records in log order with `fold`; read `tokens_per_s` and `eta_s`."""

    tokens_per_s: dict[str, float] = field(default_factory=dict)  # phase -> job tokens/s
    steps_per_s: dict[str, float] = field(default_factory=dict)  # phase -> recent step rate
    phase: str | None = None  # latest phase seen (members, merge, final, done)
    step: dict[str, int] = field(default_factory=dict)  # training phase -> latest step
    _report: dict[str, tuple[int, float]] = field(default_factory=dict)  # phase -> (step, time) of its latest report
    _module_tps: dict[int, float] = field(default_factory=dict)  # module -> its latest phase-1 tokens/s

    def fold(self, r: dict[str, Any]) -> None:
        phase, step, t = r.get("phase"), r.get("step"), r.get("time")
        if phase is None:
            return
        self.phase = phase
        if phase not in TRAINING_PHASES or not isinstance(step, int):
            return
        self.step[phase] = step
        self._fold_rate(phase, step, t)
        tps = r.get("tokens_per_s")
        if tps is None:
            return
        if phase == "members" and r.get("module") is not None:
            self._module_tps[r["module"]] = tps
            self.tokens_per_s["members"] = sum(self._module_tps.values())
        elif phase == "merge" and r.get("member") == MERGED:
            self.tokens_per_s["merge"] = tps

    def _fold_rate(self, phase: str, step: int, t: float | None) -> None:
        """A report's records share its step: the first of them dates the report."""
        if t is None:
            return
        last = self._report.get(phase)
        if last is not None and step == last[0]:
            return
        # A step at or below the last one is a replay after a restart: no rate across the gap.
        if last is not None and step > last[0] and t > last[1]:
            self.steps_per_s[phase] = (step - last[0]) / (t - last[1])
        self._report[phase] = (step, t)

    @property
    def current_phase(self) -> str:
        """The training phase running now, or the last one once training is over."""
        return "members" if self.phase in (None, "members") else "merge"

    @property
    def current_tokens_per_s(self) -> float | None:
        return self.tokens_per_s.get(self.current_phase)

    def eta_s(self, phase1_steps: int, phase2_steps: int) -> float | None:
        """Seconds left as of the latest record; None until a step rate is known."""
        if self.phase in ("final", DONE_PHASE):
            return 0.0
        totals = {"members": phase1_steps, "merge": phase2_steps}
        current = self.current_phase
        rate = self.steps_per_s.get(current)
        if rate is None or rate <= 0:
            return None
        eta = 0.0
        for p in TRAINING_PHASES[TRAINING_PHASES.index(current):]:
            left = max(0, totals[p] - self.step.get(p, 0))
            eta += left / self.steps_per_s.get(p, rate)
        return eta


def format_duration(seconds: float) -> str:
    """Seconds as `1h02m`, `4m05s` or `12s`."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
