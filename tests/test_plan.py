"""The run plan: built once from a JobSpec by `jobs.plan`, the only thing `cluster/` receives."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest

from cluster.plan import Resources, RunPlan
from jobs.plan import build_plan
from leviathan.config import TrainingConfig
from tests.scripts.common import builtin_manifest, tiny_spec


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return builtin_manifest(tmp_path_factory.getbasetemp() / "leviathan-builtin")


def test_plan_carries_the_spec_resolved_once(manifest, tmp_path):
    spec = tiny_spec(manifest, tmp_path, "planned", data={"domains": ["docs", "python", "codecs"]})
    plan = build_plan(spec)
    assert plan.name == "planned" and plan.seed == spec.seed and plan.run_dir == spec.run_dir
    assert plan.manifest == str(manifest)
    assert plan.domains == ("docs", "python"), "one domain per module, no more"
    assert (plan.ensemble.modules, plan.ensemble.members_per_module) == (2, 2)
    assert plan.training == TrainingConfig(**spec.training.model_dump())
    assert plan.spec_json == spec.to_json()
    assert plan.resources == Resources(num_workers=2, use_gpu=False, cpus_per_worker=1.0, gpus_per_worker=1.0, max_failures=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.seed = 1  # type: ignore[misc]
    # What a worker unpickles names no module of the layer above, nor its schema library.
    blob = pickle.dumps(plan)
    assert b"jobs" not in blob and b"pydantic" not in blob


def test_plan_refuses_counts_that_disagree_with_its_ensemble(manifest, tmp_path):
    plan = build_plan(tiny_spec(manifest, tmp_path, "planned"))
    with pytest.raises(ValueError, match="domains: 1 domains for 2 modules"):
        dataclasses.replace(plan, domains=("docs",))
    with pytest.raises(ValueError, match="num_workers: 3 workers for 2 modules"):
        dataclasses.replace(plan, resources=dataclasses.replace(plan.resources, num_workers=3))


def test_each_domain_is_read_by_the_rank_hosting_its_module(manifest, tmp_path):
    spec = tiny_spec(
        manifest, tmp_path, "ranks",
        ensemble={"modules": 3, "members_per_module": 1, "members": [{"preset": "tiny"}]},
        data={"domains": ["docs", "python", "codecs"]},
    )
    plan = build_plan(spec)  # 3 modules on 2 workers: rank 0 hosts modules 0 and 1
    assert [plan.domains_of_rank(r) for r in range(2)] == [("docs", "python"), ("codecs",)]
    assert [plan.owner_of(d) for d in plan.domains] == [0, 0, 1]
    # A domain two modules train on is read by both, and its shared rows drawn by the first one's rank.
    twice = dataclasses.replace(plan, domains=("docs", "python", "docs"))
    assert [twice.domains_of_rank(r) for r in range(2)] == [("docs", "python"), ("docs",)]
    assert twice.owner_of("docs") == 0


def test_a_real_train_worker_runs_the_plan_without_importing_jobs(ray_cluster, manifest, tmp_path):
    from ray.train.torch import TorchTrainer

    from cluster.trainer import build_trainer

    spec = tiny_spec(
        manifest, tmp_path, "nojobs",
        ensemble={"modules": 1, "members_per_module": 1, "members": [{"preset": "tiny"}]},
        training={"phase1_steps": 1, "phase2_steps": 1, "eval_interval": 1, "checkpoint_interval": 1},
        resources={"workers": 1},
    )
    built = build_trainer(build_plan(spec))
    assert set(built.train_loop_config) == {"plan", "metrics_dir", "profile", "verbose"}
    assert isinstance(built.train_loop_config["plan"], RunPlan)
    assert isinstance(built.train_loop_config["plan"].training, TrainingConfig)

    def loop(config):  # defined here so that it travels by value, importing nothing of tests/
        import json
        import sys

        from cluster.worker import train_loop_per_worker

        train_loop_per_worker(config)
        loaded = sorted(m for m in sys.modules if m == "jobs" or m.startswith("jobs."))
        with open(f"{config['metrics_dir']}/worker_modules.json", "w") as f:
            json.dump(loaded, f)

    TorchTrainer(
        loop,
        train_loop_config=built.train_loop_config,
        scaling_config=built.scaling_config,
        run_config=built.run_config,
    ).fit()
    run = Path(spec.run_dir)
    assert (run / "metrics.jsonl").is_file(), "the worker ran the job"
    assert json.loads((run / "worker_modules.json").read_text()) == []
