"""How much of Ray Train's own logging a job shows on the console.

Ray Train logs at INFO on every `ray.train.report` ("Reporting training result
...", on each worker) and for every checkpoint it registers (on its
controller). A job reports at every evaluation, so by default these lines are
held back to WARNING and only the job's own progress lines and final table
show; `leviathan train --verbose` brings them back.

Two levers are needed: `RunConfig(logging_config=...)` filters the `ray.train.*`
loggers on the controller's and the workers' consoles, but the per-report line
comes from a logger named after its source file (not under `ray.train`), whose
level the worker sets itself (`quiet_report_lines`).
"""

from __future__ import annotations

import logging


def ray_train_log_level(verbose: bool) -> str:
    """The `ray.train.LoggingConfig` level of a job."""
    return "INFO" if verbose else "WARNING"


def quiet_report_lines(verbose: bool) -> None:
    """On a worker: the per-report INFO line shows only when verbose."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.INFO if verbose else logging.WARNING)
