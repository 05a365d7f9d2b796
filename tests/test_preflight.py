"""The start-up collective check (cluster.preflight) on 2 Ray Train workers with gloo.

A healthy job passes every step and the check leaves no trace (no gradients,
the same RNG state); a collective that fails on one rank, or returns a wrong
result there, fails the whole job within seconds with one line naming the
rank, the backend and the step, although the other rank is left waiting in a
collective.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import train
from jobs.plan import build_plan
from tests.scripts.common import tiny_spec


@pytest.fixture(scope="module")
def plan(builtin_corpus, tmp_path_factory):
    return _plan(builtin_corpus, tmp_path_factory.mktemp("runs"))


def _fit(plan, tmp_path: Path, loop):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config={"plan": plan, "metrics_dir": str(tmp_path), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker=plan.resources.per_worker()),
        run_config=RunConfig(name="check", storage_path=str(tmp_path / "ray"),
                             failure_config=FailureConfig(max_failures=0)),
        torch_config=TorchConfig(backend="gloo"),
    )
    return trainer.fit()


def _plan(manifest: Path, storage: Path):
    spec = tiny_spec(manifest, storage, "check", ensemble={"merge": "mixture"}, training={"joint": True})
    return build_plan(spec)


def prepare_on_two_workers(folder: Path, corpora: dict[str, Path]) -> dict:
    """The healthy check's plan, for the workers (tests/scripts/two_workers.py)."""
    return {"plan": _plan(corpora["builtin"], folder / "runs"), "metrics_dir": str(folder), "out": str(folder)}


def on_each_worker(config: dict) -> None:
    """Run the start-up check and record what it left: gradients, the RNG state, the modes."""
    import torch

    from cluster.worker import EnsembleWorker

    worker = EnsembleWorker(config["plan"], config["metrics_dir"])
    rng = torch.get_rng_state()
    seconds = worker.check_collectives()
    params = [p for m in worker.members for p in (*m.model.parameters(), *m.projection.parameters())]
    params += list(worker.merger.parameters())
    out = {
        "steps": sorted(seconds),
        "grads_left": sum(p.grad is not None for p in params),
        "rng_unchanged": bool(torch.equal(rng, torch.get_rng_state())),
        "training_mode": all(m.model.training for m in worker.members) and worker.merger.training,
    }
    Path(config["out"], f"rank{worker.rank}.json").write_text(json.dumps(out))


def test_healthy_collectives_pass_and_leave_no_trace(two_workers):
    for rank in (0, 1):
        out = json.loads((two_workers / "preflight" / f"rank{rank}.json").read_text())
        assert out == {"steps": ["evaluation", "merge_step", "object_gather"], "grads_left": 0,
                       "rng_unchanged": True, "training_mode": True}, (rank, out)


def _all_reduce_raises_on_rank_1(config):
    import ray.train
    import torch.distributed as dist

    from cluster.worker import train_loop_per_worker

    if ray.train.get_context().get_world_rank() == 1:
        def broken(tensor, *args, **kwargs):
            raise RuntimeError("injected: all_reduce unavailable")

        dist.all_reduce = broken
    train_loop_per_worker(config)


def _all_reduce_wrong_on_rank_1(config):
    import ray.train
    import torch.distributed as dist

    from cluster.worker import train_loop_per_worker

    if ray.train.get_context().get_world_rank() == 1:
        real = dist.all_reduce

        def wrong(tensor, *args, **kwargs):
            work = real(tensor, *args, **kwargs)
            tensor.add_(1.0)  # a result that differs from rank 0's
            return work

        dist.all_reduce = wrong
    train_loop_per_worker(config)


@pytest.mark.parametrize(
    "loop,rank,step,detail",
    [
        (_all_reduce_raises_on_rank_1, 1, "merge step", "injected: all_reduce unavailable"),
        # Every rank sees a wrong all-reduce result: whichever fails first is named.
        pytest.param(_all_reduce_wrong_on_rank_1, None, "object gather", "the all-reduced loss differs between ranks",
                     marks=pytest.mark.slow),
    ],
    ids=["raises", "wrong-result"],
)
# The other rank waits in a collective whose timeout is 30 minutes (TorchConfig's default):
# the job must end long before, when Ray Train sees the failed rank, not when that times out.
@pytest.mark.timeout(300)
def test_broken_collective_fails_the_job_at_once_with_one_line(ray_cluster, plan, tmp_path, loop, rank, step, detail):
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError) as e:
        _fit(plan, tmp_path, loop)
    line = train.failure_line(e.value)
    ranks = (0, 1) if rank is None else (rank,)
    assert any(line.startswith(f"collective check failed on rank {r} of 2 (cpu, backend gloo): {step}")
               for r in ranks), line
    assert detail in line and "\n" not in line, line
    assert not (tmp_path / "metrics.jsonl").exists(), "no training step ran"
