"""Each rank reads only its own domains, yet the merged rows are the ones a rank holding
every shard draws: the sum over ranks of their partial batches, bit for bit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cluster.data import AbsentShard, rank_shards, validation_sets
from jobs.plan import build_plan
from leviathan.data.shards import MixedBatchSampler, TokenShard
from leviathan.data.staging import load_manifest
from tests.scripts.common import builtin_manifest, tiny_spec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return builtin_manifest(tmp_path_factory.getbasetemp() / "leviathan-builtin")


@pytest.fixture
def plan(manifest, tmp_path):
    """3 modules on 2 workers: rank 0 owns docs and python, rank 1 owns codecs."""
    spec = tiny_spec(
        manifest, tmp_path, "ranks",
        ensemble={"modules": 3, "members_per_module": 1, "members": [{"preset": "tiny"}]},
        data={"domains": ["docs", "python", "codecs"]},
        training={"batch_size": 5, "seq_len": 16, "eval_batches": 2, "switch_fraction": 0.4},
    )
    return build_plan(spec)


def test_a_rank_opens_only_the_shards_it_owns(plan):
    manifest = load_manifest(plan.manifest)
    kinds = [[type(s) for s in rank_shards(manifest, plan, r, "train")] for r in range(2)]
    assert kinds == [[TokenShard, TokenShard, AbsentShard], [AbsentShard, AbsentShard, TokenShard]]
    absent = rank_shards(manifest, plan, 0, "train")[2]
    assert len(absent) == len(manifest.shard("codecs", "train")), "the manifest's token count is the shard's length"


def test_mixed_batches_summed_over_ranks_are_the_full_samplers(plan):
    manifest = load_manifest(plan.manifest)
    B, T, f = plan.training.batch_size, plan.training.seq_len, plan.training.switch_fraction
    full = MixedBatchSampler([manifest.shard(d, "train") for d in plan.domains], B, T, seed=7, switch_fraction=f)
    parts = [MixedBatchSampler(rank_shards(manifest, plan, r, "train"), B, T, seed=7, switch_fraction=f) for r in range(2)]
    for _ in range(6):  # several batches: the rotating domain rule and switch rows vary
        x, y = full.next()
        drawn = [p.next() for p in parts]
        assert torch.equal(drawn[0][0] + drawn[1][0], x) and torch.equal(drawn[0][1] + drawn[1][1], y)
        assert all(not torch.equal(px, x) for px, _ in drawn), "each rank alone holds only part of the batch"
    assert parts[0].state_dict() == parts[1].state_dict() == full.state_dict()


def test_validation_and_switch_sets_summed_over_ranks_are_the_full_ones(plan):
    manifest = load_manifest(plan.manifest)
    one_worker = dataclasses.replace(plan, resources=dataclasses.replace(plan.resources, num_workers=1))
    full_val, full_switch = validation_sets(manifest, one_worker, 0, 1, CPU)
    # world_size 1 here merges nothing: each call returns that rank's own rows only.
    parts = [validation_sets(manifest, plan, r, 1, CPU) for r in range(2)]
    assert list(full_val) == list(plan.domains)
    for d, batches in full_val.items():
        for i, (x, y) in enumerate(batches):
            assert torch.equal(parts[0][0][d][i][0] + parts[1][0][d][i][0], x)
            assert torch.equal(parts[0][0][d][i][1] + parts[1][0][d][i][1], y)
    assert len(full_switch) == len(parts[0][1])
    for i, (x, y) in enumerate(full_switch):
        assert torch.equal(parts[0][1][i][0] + parts[1][1][i][0], x)
        assert torch.equal(parts[0][1][i][1] + parts[1][1][i][1], y)


def test_a_rank_stages_only_its_own_domains_from_a_remote_manifest(plan, manifest, s3_bucket, tmp_path, monkeypatch):
    from leviathan.run.env import STAGING_DIR as STAGING_ENV
    from leviathan.run import storage

    remote = storage.join(s3_bucket, "corpus")
    storage.upload_dir(manifest.parent, remote)
    staged = tmp_path / "staged"
    monkeypatch.setenv(STAGING_ENV, str(staged))
    local = load_manifest(plan.manifest)
    remote_manifest = load_manifest(remote)
    # Rank 1's whole data: its module's train shard (phase 1), its mixed rows and its validation rows.
    B, T = plan.training.batch_size, plan.training.seq_len
    (module_domain,) = plan.domains_of_rank(1)
    remote_manifest.shard(module_domain, "train")
    MixedBatchSampler(rank_shards(remote_manifest, plan, 1, "train"), B, T, seed=1).next()
    validation_sets(remote_manifest, plan, 1, 1, CPU)
    files = sorted(p.name for p in staged.rglob("*") if p.is_file())
    assert files == sorted(local.manifest.split("codecs", s).file for s in ("train", "val")), files
