"""One Ray Train fit of 2 gloo workers for every check that needs two ranks and no run.

Each Ray Train fit costs seconds of process start-up, and the distributed-equals-one-process
checks need only two ranks, so they share a fit: every module in CHECKS defines

    prepare_on_two_workers(folder, corpora) -> config   (on the driver, before the fit)
    on_each_worker(config)                             (on each of the two workers, in turn)

and its tests read what its workers wrote into `folder` (the `two_workers` fixture's
`<folder>/<check name>`). A check that fails on a worker fails the fit, and so the
fixture of every test that uses it, with the worker's traceback.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

CHECKS = {
    "merge": "tests.test_cluster_merge",
    "evaluation": "tests.test_cluster_evaluation",
    "preflight": "tests.test_preflight",
}


def _run_every_check(config: dict[str, Any]) -> None:
    for module, check_config in config["checks"].values():
        importlib.import_module(module).on_each_worker(check_config)


def run_checks(folder: Path, corpora: dict[str, Path]) -> Path:
    """Prepare every check, run them all in one 2-worker fit; the folder holding their outputs."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    checks = {}
    for name, module in CHECKS.items():
        (folder / name).mkdir(parents=True)
        checks[name] = (module, importlib.import_module(module).prepare_on_two_workers(folder / name, corpora))
    TorchTrainer(
        _run_every_check,
        train_loop_config={"checks": checks},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="two-workers", storage_path=str(folder / "ray")),
        torch_config=TorchConfig(backend="gloo"),
    ).fit()
    return folder
