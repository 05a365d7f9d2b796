"""Whether a cluster's nodes can hold a job's workers: one rule, two callers.

The training driver refuses a job it cannot place before fitting (cluster.trainer),
and the API refuses it at submission (422) instead of letting Ray Train wait for
resources that never come. Both count the same way: each worker needs all of its
`per_worker` resources on a single node, so a node with R of a resource holds
floor(R / need) workers, and W workers need W such slots over the alive nodes.
Resources in use by other jobs are not counted: those free up, missing hardware
does not.

An autoscaling cluster adds nodes on demand, which this count cannot see: there
`LEVIATHAN_ALLOW_UNSCHEDULABLE=1` (the API's setting of that name, which passes it
on to its jobs, or the driver's own environment) skips both checks, and Ray Train
waits for the nodes (bounded by the trainer's controller failure limit).

Torch-free and Ray-free: the callers bring the nodes' total resources.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ALLOW_UNSCHEDULABLE_ENV = "LEVIATHAN_ALLOW_UNSCHEDULABLE"


def allow_unschedulable(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process may start a job its cluster's nodes cannot hold today."""
    return environ.get(ALLOW_UNSCHEDULABLE_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Capacity:
    """How many workers of one shape the nodes hold, and what they have in total."""

    slots: int
    nodes: int
    totals: dict[str, float]

    def fits(self, workers: int) -> bool:
        return self.slots >= workers


def capacity(per_worker: Mapping[str, float], nodes: Iterable[Mapping[str, float]]) -> Capacity:
    """Worker slots of shape `per_worker` (e.g. {"CPU": 1, "GPU": 1}) over `nodes`,
    each node given as its total resources (Ray's `Resources` / `resources_total`)."""
    nodes = list(nodes)
    slots = 0
    for res in nodes:
        slots += int(min(res.get(k, 0.0) / v for k, v in per_worker.items()) + 1e-9)
    totals = {k: float(sum(res.get(k, 0.0) for res in nodes)) for k in per_worker}
    return Capacity(slots=slots, nodes=len(nodes), totals=totals)


def worker_shape(cpus: float, use_gpu: bool, gpus: float) -> dict[str, float]:
    """Ray's `resources_per_worker` for a spec's resources: CPUs, and GPUs when used."""
    out = {"CPU": float(cpus)}
    if use_gpu:
        out["GPU"] = float(gpus)
    return out


def short_resource(per_worker: Mapping[str, float], nodes: Iterable[Mapping[str, float]]) -> str | None:
    """The first resource no single node has enough of for one worker (None: each
    resource fits on some node, so only the count of workers is short)."""
    nodes = list(nodes)
    for k, v in per_worker.items():
        if max((res.get(k, 0.0) for res in nodes), default=0.0) + 1e-9 < v:
            return k
    return None


def describe(amounts: Mapping[str, float]) -> str:
    """`{"CPU": 1.0, "GPU": 1.0}` as "1 CPU, 1 GPU"."""
    return ", ".join(f"{v:g} {k}" for k, v in amounts.items())
