"""Reading a run's `metrics.jsonl` (written by rank 0 of the training job).

The file is the job's own output, not API state: every answer is derived from it.
A job's status page needs only the latest figures per member, so the reader folds
the file incrementally: it remembers how far it has read each file and parses
only the bytes appended since (a long run's file grows to many MB; re-parsing it on
every poll would cost O(file) per request). Only complete lines are consumed, so a
line rank 0 is still writing is read on the next call. Lines that are not valid
records are skipped.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import ValidationError

from api.schemas import MetricRecord

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
_LATEST_FIELDS = ("train_loss", "val_loss", "mixed_val_loss", "lr", "tokens_per_s")


def _read_from(run_dir: str, offset: int) -> tuple[bytes, int] | None:
    """Bytes of `<run_dir>/metrics.jsonl` from `offset`, and the file size; None if absent."""
    if "://" in run_dir:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(run_dir)
        path = f"{path}/{METRICS_FILE}"
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return None
        size = info.size
        if size <= offset:
            return b"", size
        with fs.open_input_file(path) as f:
            f.seek(offset)
            return f.read(size - offset), size
    path = Path(run_dir) / METRICS_FILE
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            if size <= offset:
                return b"", size
            f.seek(offset)
            return f.read(size - offset), size
    except FileNotFoundError:
        return None


def read_run_spec(run_dir: str) -> dict[str, Any] | None:
    """`<run_dir>/spec.json` (the job writes it when it starts) as a dict; None if absent or unreadable."""
    path = f"{run_dir}/spec.json"
    try:
        if "://" in run_dir:
            import pyarrow.fs as pafs

            fs, p = pafs.FileSystem.from_uri(path)
            with fs.open_input_stream(p) as f:
                data = f.read()
        else:
            data = Path(path).read_bytes()
        spec = json.loads(data)
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def _finite_float(text: str) -> float | None:
    x = float(text)
    return x if math.isfinite(x) else None


def _parse_lines(data: bytes) -> Iterator[dict[str, Any]]:
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            # NaN/Infinity (a diverged loss) -> null: JSON responses cannot carry them.
            raw = json.loads(line, parse_constant=lambda _: None, parse_float=_finite_float)
            yield MetricRecord.model_validate(raw).model_dump()
        except (ValueError, ValidationError, TypeError):
            continue


@dataclass
class MetricsSummary:
    """The latest state of a run, folded from its records in file order."""

    offset: int = 0  # bytes consumed (complete lines only)
    records: int = 0
    phase: str | None = None
    step: int | None = None
    updated_at: float | None = None
    members: dict[str, dict[str, Any]] = field(default_factory=dict)

    def snapshot(self) -> "MetricsSummary":
        """A copy callers may keep while the reader folds more lines into the original."""
        return MetricsSummary(self.offset, self.records, self.phase, self.step, self.updated_at,
                              {name: dict(m) for name, m in self.members.items()})

    def fold(self, rec: dict[str, Any]) -> None:
        self.records += 1
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


class MetricsReader:
    """Incremental summaries of many runs (bounded LRU), safe across threads."""

    def __init__(self, max_runs: int = 256) -> None:
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, MetricsSummary] = OrderedDict()
        self._max_runs = max_runs

    def summary(self, run_dir: str) -> MetricsSummary | None:
        """A snapshot of the run's latest figures; None while it has no metrics file."""
        with self._lock:
            state = self._runs.get(run_dir) or MetricsSummary()
            try:
                got = _read_from(run_dir, state.offset)
            except (OSError, ValueError) as e:  # status pages still show Ray's view
                log.warning("cannot read %s/%s: %s", run_dir, METRICS_FILE, e)
                got = None
            if got is None:
                self._runs.pop(run_dir, None)
                return None
            data, size = got
            if size < state.offset:  # the file was replaced: start over
                state = MetricsSummary()
                data, size = _read_from(run_dir, 0) or (b"", 0)
            end = data.rfind(b"\n") + 1
            for rec in _parse_lines(data[:end]):
                state.fold(rec)
            state.offset += end
            self._runs[run_dir] = state
            self._runs.move_to_end(run_dir)
            while len(self._runs) > self._max_runs:
                self._runs.popitem(last=False)
            return state.snapshot()


def read_records(run_dir: str, since_step: int | None = None) -> list[dict[str, Any]]:
    """All complete records (file order), those with step > since_step when given."""
    got = _read_from(run_dir, 0)
    if got is None:
        return []
    data = got[0]
    data = data[: data.rfind(b"\n") + 1]
    records = list(_parse_lines(data))
    if since_step is not None:
        records = [r for r in records if r.get("step") is not None and r["step"] > since_step]
    return records
