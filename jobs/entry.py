"""What the job entrypoints' command lines share.

- `run_cli`: the ending of the run-folder CLIs (`evaluate`, `generate`): an
  expected failure (a bad run folder, bad settings) is one line on stderr and
  exit code 2, so a user never sees a traceback for bad input.
- `add_spec_overrides` / `load_spec_with_overrides`: `--storage` and
  `--manifest` for every command that reads a spec file (`train`, `deploy`,
  `tune`, `compare`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from jobs.spec import JobSpec, load_spec_dict, with_values


def run_cli(prog: str, work: Callable[[], None], errors: tuple[type[Exception], ...]) -> int:
    """Exit code of `work()`: 0, or 2 after printing `<prog>: error: <message>` for one of `errors`."""
    try:
        work()
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_spec_overrides(parser: argparse.ArgumentParser) -> None:
    """`--storage` and `--manifest`, for every command that reads a spec file: the
    spec check's placeholder errors name these flags, so each such command takes them."""
    parser.add_argument("--storage", default=None, help="override the spec's storage (runs go to <storage>/<name>)")
    parser.add_argument("--manifest", default=None, help="override the spec's data.manifest (a prepared corpus)")


def load_spec_with_overrides(path: str, storage: str | None = None, manifest: str | None = None,
                             **more: str | None) -> JobSpec:
    """The spec file with `--storage` / `--manifest` (and any other dotted field in `more`)
    applied before validation, so they can replace a spec file's placeholders."""
    overrides = {"storage": storage, "data.manifest": manifest, **more}
    return with_values(load_spec_dict(path), {k: v for k, v in overrides.items() if v is not None})
