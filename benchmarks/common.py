"""What every benchmark script shares: the machine it ran on and the JSON ending.

A benchmark prints one JSON report on stdout (and saves it with --out), and the
report names its machine, so figures from different machines are never
compared blind.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine_info(**extra: Any) -> dict[str, Any]:
    """Platform, Python version and CPU count, then `extra` (library versions, device, load)."""
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(), **extra}


def emit_report(report: dict[str, Any], out: str | Path | None, indent: int = 2) -> int:
    """Print `report` as JSON, also write it to `out` when given; the script's exit code (0)."""
    text = json.dumps(report, indent=indent)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0
