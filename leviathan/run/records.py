"""The metrics record: one line of a run's `metrics.jsonl`, defined once.

Training (rank 0 of `cluster/`) writes these lines and the API reads them, so
this module is torch-free and importable by every layer (DESIGN section 1).

    {"time": unix_s, "step": int, "phase": "members" | "merge" | "final",
     "module": int | null, "member": "m0.1" | "merged" | "uniform",
     "domain": str | null, "train_loss": float | null, "val_loss": float | null,
     "mixed_val_loss": float | null, "lr": float | null,
     "tokens_per_s": float | null, "cpu_s": float | null, "replayed": bool}

`tokens_per_s` and `cpu_s` cover the training steps since the previous report
(evaluation excluded); `cpu_s` is the process CPU time those steps took,
summed over the workers: the compute a step costs on shared CPUs, where
wall-clock time also counts waiting for the other tenants.

and a last `{"phase": "done", ...}` line when the job finishes.

`MetricsLog` is the one reader and writer of that file (training writes, the
API and the CLIs read). Its NaN policy: a non-finite number (a diverged
loss) is written and read as null, so every line is strict JSON and JSON
responses can carry it.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Iterable, Iterator

from leviathan.run.folder import METRICS_FILE, RunFolder
from leviathan.run.storage import AppendLog, LogCursor
PHASES = ("members", "merge", "final")
DONE_PHASE = "done"

# Field -> type of its value when not null; the order is the order of a line's keys.
RECORD_TYPES: dict[str, type] = {
    "time": float,
    "step": int,
    "phase": str,
    "module": int,
    "member": str,
    "domain": str,
    "train_loss": float,
    "val_loss": float,
    "mixed_val_loss": float,
    "lr": float,
    "tokens_per_s": float,
    "cpu_s": float,
    "replayed": bool,
}
RECORD_FIELDS = tuple(RECORD_TYPES)


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
    cpu_s: float | None = None,
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
        "cpu_s": _num(cpu_s),
        "replayed": bool(replayed),
        **({"val_by_domain": val_by_domain} if val_by_domain is not None else {}),
    }


def done_record(step: int) -> dict[str, Any]:
    """The last line of a finished job's metrics.jsonl."""
    return {**dict.fromkeys(RECORD_FIELDS), "time": time.time(), "step": int(step), "phase": DONE_PHASE, "replayed": False}


def _finite(value: Any) -> Any:
    """Non-finite floats -> None, inside dicts and lists too (the NaN policy)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _finite_float(text: str) -> float | None:
    x = float(text)
    return x if math.isfinite(x) else None


def parse_lines(data: bytes) -> Iterator[dict[str, Any]]:
    """The records in complete metrics lines: NaN and Infinity read as null; lines that are
    not JSON objects are skipped."""
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line, parse_constant=lambda _: None, parse_float=_finite_float)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict):
            yield rec


class MetricsLog:
    """A run's `metrics.jsonl` (local path or URI; `leviathan.run.storage.AppendLog`)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir.rstrip("/")
        self.log = AppendLog(RunFolder(self.run_dir).metrics)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Add records, one line each (non-finite numbers as null)."""
        self.log.append("".join(json.dumps(_finite(r), allow_nan=False) + "\n" for r in records).encode())

    def read(self) -> list[dict[str, Any]]:
        """Every complete record so far."""
        return list(parse_lines(self.log.read_all()))

    def read_from(self, cursor: LogCursor = LogCursor()) -> tuple[list[dict[str, Any]], LogCursor] | None:
        """The records after `cursor` and the cursor after them; None while the log does not
        exist (`AppendLog.read_from`: a returned cursor below the given one means the log was
        replaced and read from its start)."""
        got = self.log.read_from(cursor)
        if got is None:
            return None
        data, after = got
        return list(parse_lines(data)), after

    def exists(self) -> bool:
        return self.log.exists()

    def logged_steps(self) -> dict[str, int]:
        """Largest step already logged per phase ({} for a fresh run)."""
        steps: dict[str, int] = {}
        for r in self.read():
            phase, step = r.get("phase"), r.get("step")
            if phase in PHASES and isinstance(step, int):
                steps[phase] = max(steps.get(phase, -1), step)
        return steps
