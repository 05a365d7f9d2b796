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
"""

from __future__ import annotations

import math
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"
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
