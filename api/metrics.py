"""Reading a run's `metrics.jsonl` (written by rank 0 of the training job).

The log is the job's own output, not API state: every answer is derived from it.
A job's status page needs only the latest figures per member, so the reader folds
the log incrementally: it keeps a cursor per run (a byte offset in a local file,
the next part file on an object store; `leviathan.run.storage.AppendLog`) and parses
only what was appended since (a long run's log grows to many MB; re-parsing it on
every poll would cost O(log) per request). Only complete lines are consumed, so a
line rank 0 is still writing is read on the next call. Lines that are not valid
records are skipped.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

from pydantic import ValidationError

from api.schemas import MetricRecord
from leviathan.run.folder import RunFolder
from leviathan.run.progress import RunProgress
from leviathan.run.records import MetricsLog
from leviathan.run.storage import LogCursor, read_bytes

log = logging.getLogger(__name__)

_LATEST_FIELDS = ("train_loss", "val_loss", "mixed_val_loss", "lr", "tokens_per_s")


def read_run_spec(run_dir: str) -> dict[str, Any] | None:
    """`<run_dir>/spec.json` (the job writes it when it starts) as a dict; None if absent or unreadable."""
    try:
        spec = json.loads(read_bytes(RunFolder(run_dir).spec))
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def _valid(records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The records that are valid metric lines (`MetricsLog` already read NaN as null)."""
    for raw in records:
        try:
            yield MetricRecord.model_validate(raw).model_dump()
        except (ValueError, ValidationError, TypeError):
            continue


@dataclass
class MetricsSummary:
    """The latest state of a run, folded from its records in file order."""

    cursor: LogCursor = LogCursor()  # how far the log is consumed (complete lines only)
    records: int = 0
    phase: str | None = None
    step: int | None = None
    updated_at: float | None = None
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: RunProgress = field(default_factory=RunProgress)  # tokens/s per phase, ETA

    def snapshot(self) -> "MetricsSummary":
        """A copy callers may keep while the reader folds more lines into the original
        (the reader hands the same snapshot to every poll until the log grows)."""
        return MetricsSummary(self.cursor, self.records, self.phase, self.step, self.updated_at,
                              {name: dict(m) for name, m in self.members.items()}, copy.deepcopy(self.progress))

    def fold(self, rec: dict[str, Any]) -> None:
        self.records += 1
        self.progress.fold(rec)
        if rec.get("phase") is not None:
            self.phase = rec["phase"]
        if rec.get("step") is not None:
            self.step = rec["step"]
        if rec.get("time") is not None:
            self.updated_at = rec["time"]
        name = rec.get("member")
        if not name:
            return
        m = self.members.setdefault(
            name,
            {"member": name, "module": None, "phase": None, "step": None, "domain": None,
             "updated_at": None, **{k: None for k in _LATEST_FIELDS}},
        )
        for key in ("module", "phase", "step", "domain"):
            if rec.get(key) is not None:
                m[key] = rec[key]
        if rec.get("time") is not None:
            m["updated_at"] = rec["time"]
        # Train and eval records carry different losses: keep the latest of each.
        for key in _LATEST_FIELDS:
            if rec.get(key) is not None:
                m[key] = rec[key]


@dataclass
class _Run:
    """A followed run: its log, the summary folded so far, and the snapshot last handed out."""

    log: MetricsLog
    state: MetricsSummary = field(default_factory=MetricsSummary)
    snapshot: MetricsSummary | None = None


class MetricsReader:
    """Incremental summaries of many runs (bounded LRU), safe across threads.

    A status poll usually finds nothing new in the log: it then costs one stat and
    returns the snapshot the previous poll got. Snapshots are shared and never
    changed afterwards, so callers must treat them as read-only.
    """

    def __init__(self, max_runs: int = 256) -> None:
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._max_runs = max_runs

    def summary(self, run_dir: str) -> MetricsSummary | None:
        """A snapshot of the run's latest figures; None while it has no metrics file."""
        with self._lock:
            run = self._runs.get(run_dir) or _Run(MetricsLog(run_dir))
            try:
                got = run.log.read_from(run.state.cursor)
            except (OSError, ValueError) as e:  # status pages still show Ray's view
                log.warning("cannot read %s: %s", RunFolder(run_dir).metrics, e)
                got = None
            if got is None:
                self._runs.pop(run_dir, None)
                return None
            data, cursor = got
            if cursor < run.state.cursor:  # the log was replaced and read from its start
                run.state, run.snapshot = MetricsSummary(), None
            if run.snapshot is None or cursor != run.state.cursor:
                for rec in _valid(data):
                    run.state.fold(rec)
                run.state.cursor = cursor
                run.snapshot = run.state.snapshot()
            self._runs[run_dir] = run
            self._runs.move_to_end(run_dir)
            while len(self._runs) > self._max_runs:
                self._runs.popitem(last=False)
            return run.snapshot


def read_records(run_dir: str, since_step: int | None = None) -> list[dict[str, Any]]:
    """All complete records (file order), those with step > since_step when given."""
    records = list(_valid(MetricsLog(run_dir).read()))
    if since_step is not None:
        records = [r for r in records if r.get("step") is not None and r["step"] > since_step]
    return records
