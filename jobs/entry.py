"""The shared ending of the run-folder job CLIs (`evaluate`, `generate`).

Both turn an expected failure (a bad run folder, bad settings) into one line
on stderr and exit code 2, so a user never sees a traceback for bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_cli(prog: str, work: Callable[[], None], errors: tuple[type[Exception], ...]) -> int:
    """Exit code of `work()`: 0, or 2 after printing `<prog>: error: <message>` for one of `errors`."""
    try:
        work()
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
