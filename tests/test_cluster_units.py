"""Training components that need no Ray: placement, lr schedule, metrics log,
the placement check, and the checkpoint round trip of a module."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cluster import checkpointing
from cluster.members import Member, Module, adamw, build_member, build_merger, merger_adamw
from cluster.merge import Exchange, local_parameters, merged_loss, reduce_and_clip
from cluster.metrics import MetricsLog
from leviathan.run.records import RECORD_FIELDS, record
from cluster.placement import (
    members_for_rank,
    modules_for_rank,
    row_slice,
)
from cluster.schedule import lr_at
from cluster.trainer import PlacementError, check_placement
from cluster.worker import train_module_step
from jobs.plan import ensemble_config, resources_of
from jobs.spec import JobSpec
from leviathan.data.shards import BatchSampler, MixedBatchSampler, TokenShard, write_shard
from leviathan.model.ensemble import LeviathanEnsemble


@pytest.mark.parametrize("modules,world", [(4, 2), (3, 2), (4, 4), (5, 3), (1, 1), (8, 3)])
def test_placement_spreads_modules_in_contiguous_balanced_blocks(modules, world):
    blocks = [modules_for_rank(r, world, modules) for r in range(world)]
    assert [m for b in blocks for m in b] == list(range(modules)), f"not module-major: {blocks}"
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1, f"unbalanced: {blocks}"
    assert max(sizes) == -(-modules // world), "no rank hosts more than ceil(modules / world)"


def test_placement_lists_members_module_major():
    assert modules_for_rank(0, 2, 4) == [0, 1] and modules_for_rank(1, 2, 4) == [2, 3]
    assert members_for_rank(1, 2, 3, 2) == [4, 5]
    assert members_for_rank(0, 2, 3, 2) == [0, 1, 2, 3]


def test_placement_refuses_more_workers_than_modules():
    with pytest.raises(ValueError, match="workers"):
        modules_for_rank(0, 3, 2)


@pytest.mark.parametrize("rows,world", [(16, 2), (5, 2), (7, 3), (3, 3)])
def test_row_slices_partition_the_batch(rows, world):
    covered = [i for r in range(world) for i in range(rows)[row_slice(r, world, rows)]]
    assert covered == list(range(rows))


def test_schedule_warms_up_then_decays_to_the_floor():
    kw = dict(base_lr=1e-3, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "warmup must increase"
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine must not increase"
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert min(lrs[10:]) >= 1e-4 - 1e-12
    # A phase shorter than its warmup still reaches the peak (warmup capped at half).
    short = [lr_at(s, base_lr=1.0, total_steps=4, warmup_steps=20, min_lr_ratio=0.0) for s in range(4)]
    assert max(short) == pytest.approx(1.0)


def test_metrics_log_appends_records_and_reads_logged_steps(tmp_path):
    log = MetricsLog(str(tmp_path / "run"))
    assert log.logged_steps() == {}
    log.append([record(step=10, phase="members", member="m0.0", module=0, domain="a", train_loss=2.0,
                       val_loss=float("nan"), mixed_val_loss=3.0, lr=1e-3, tokens_per_s=100.0)])
    log.append([record(step=20, phase="members", member="m0.0", module=0),
                record(step=5, phase="merge", member="merged")])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert tuple(first) == RECORD_FIELDS, "a record has exactly the contract's fields, in order"
    assert first["val_loss"] is None, "non-finite numbers are written as null"
    assert log.logged_steps() == {"members": 20, "merge": 5}


def test_metrics_log_has_one_nan_policy_for_writers_and_readers(tmp_path):
    """Training and the API share one reader and writer: a NaN or Infinity becomes null whether
    a record carries it (a hand-made line) or a file holds it (an older writer), and a torn or
    non-JSON line is skipped."""
    from api.metrics import read_records

    run = tmp_path / "run"
    log = MetricsLog(str(run))
    log.append([{"phase": "members", "step": 1, "member": "m0.0", "train_loss": float("inf"),
                 "val_by_domain": {"a": float("nan")}}])
    assert "NaN" not in (run / "metrics.jsonl").read_text() and "Infinity" not in (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"phase": "members", "step": 2, "member": "m0.0", "train_loss": NaN, "val_loss": -Infinity}\n')
        f.write("not json\n")
    got = log.read()
    assert [r["step"] for r in got] == [1, 2]
    assert got[0]["train_loss"] is None and got[0]["val_by_domain"] == {"a": None}
    assert got[1]["train_loss"] is None and got[1]["val_loss"] is None
    assert [(r["step"], r["train_loss"]) for r in read_records(str(run))] == [(1, None), (2, None)]


def test_check_placement_fails_fast_with_a_clear_message():
    spec = JobSpec.model_validate({"resources": {"workers": 2, "use_gpu": True}})
    cpu_nodes = [{"Alive": True, "Resources": {"CPU": 4.0}}]
    with pytest.raises(PlacementError, match=r"2 workers x \(1 CPU, 1 GPU\).*0 GPU.*use_gpu = false"):
        check_placement(resources_of(spec), spec.name, cpu_nodes)
    # Two 1-CPU workers need two 1-CPU slots: one node with 1.5 CPUs holds only one.
    spec = JobSpec.model_validate({"resources": {"workers": 2}})
    with pytest.raises(PlacementError, match="fits only 1"):
        check_placement(resources_of(spec), spec.name, [{"Alive": True, "Resources": {"CPU": 1.5}}])
    check_placement(resources_of(spec), spec.name, [{"Alive": True, "Resources": {"CPU": 1.0}}] * 2)


def _tiny_spec(**training) -> JobSpec:
    return JobSpec.model_validate({
        "ensemble": {"modules": 2, "members_per_module": 2, "merge_width": 16, "merge_heads": 2},
        "training": {"batch_size": 4, "seq_len": 16, **training},
    })


def _module(spec: JobSpec, shard: TokenShard, index: int = 0) -> Module:
    config = ensemble_config(spec, vocab_size=260)
    k = spec.ensemble.members_per_module
    members = []
    for j in range(index * k, (index + 1) * k):
        model, projection = build_member(config, j, spec.seed)
        members.append(Member(j, config.member_names[j], model, projection, adamw(model, 1e-2, 0.1)))
    return Module(index, "a", members, BatchSampler(shard, 4, 16, seed=7))


@pytest.fixture
def shard(tmp_path) -> TokenShard:
    rng = np.random.default_rng(0)
    tokens = (rng.integers(0, 16, 5000) * 3 % 256).astype(np.uint16)
    return TokenShard(write_shard(tmp_path / "a.train.arrow", tokens))


def test_module_checkpoint_round_trip_resumes_exactly(tmp_path, shard):
    """Weights, optimiser state and sampler position restored: the next steps match."""
    spec = _tiny_spec()
    module = _module(spec, shard)
    for _ in range(3):
        train_module_step(module, 1.0)
    checkpointing.save_module(tmp_path, module)
    checkpointing.save_rank(tmp_path, 0)
    expected = [train_module_step(module, 0.5) for _ in range(2)]

    restored = _module(spec, shard)
    checkpointing.load_module(tmp_path, restored)
    checkpointing.load_rank(tmp_path, 0)
    got = [train_module_step(restored, 0.5) for _ in range(2)]
    assert got == expected, f"resumed losses differ: {got} vs {expected}"


def _phase2(spec: JobSpec, shards: list[TokenShard]):
    """Two modules' members with phase-2 optimisers, the evidence merger with its
    evidence lr group, and the mixed sampler with switch rows."""
    config = ensemble_config(spec, vocab_size=260)
    members = []
    for j in range(config.num_members):
        model, projection = build_member(config, j, spec.seed)
        members.append(Member(j, config.member_names[j], model, projection,
                              projection_optimizer=adamw(projection, 1e-2, 0.1)))
    modules = [Module(i, "ab"[i], members[2 * i : 2 * i + 2], BatchSampler(shards[i], 4, 16, seed=i)) for i in range(2)]
    merger = build_merger(config, spec.seed)
    optimizer = merger_adamw(merger, 1e-2, 0.1, evidence_lr_scale=10.0)
    sampler = MixedBatchSampler(shards, 4, 16, seed=3, switch_fraction=0.5)
    return modules, members, merger, optimizer, sampler


def _merge_step(members, merger, optimizer, sampler) -> float:
    x, y = sampler.next()
    optimizers = [optimizer] + [m.projection_optimizer for m in members]
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    exchange = Exchange(0, 1, (len(members),))
    share = merged_loss(members, merger, x, y, exchange, joint=False)
    share.backward()
    loss, _ = reduce_and_clip(merger, local_parameters(members, joint=False), share, 1, grad_clip=1.0)
    for opt in optimizers:
        opt.step()
    return loss


def test_phase2_checkpoint_round_trip_resumes_the_evidence_merger_exactly(tmp_path, shard):
    """beta, gamma, their faster AdamW group and the switch rows' sampler state are all
    checkpointed: the next merge steps after a restore match bit for bit."""
    shards = [shard, TokenShard(write_shard(tmp_path / "b.train.arrow", (np.arange(5000) % 200).astype(np.uint16)))]
    spec = _tiny_spec()
    modules, members, merger, optimizer, sampler = _phase2(spec, shards)
    evidence_group = optimizer.param_groups[-1]
    assert evidence_group["lr"] == 1e-1 and evidence_group["weight_decay"] == 0.0
    assert [p is q for p, q in zip(evidence_group["params"], (merger.beta, merger.gamma_raw))] == [True, True]
    for _ in range(3):
        _merge_step(members, merger, optimizer, sampler)
    assert not torch.equal(merger.gamma_raw, torch.zeros(2)), "gamma learned"
    for module in modules:
        checkpointing.save_module(tmp_path, module)
    checkpointing.save_coordinator(tmp_path, merger=merger, merger_optimizer=optimizer, mixed_sampler=sampler,
                                   config=merger.config, phase="merge", step=3)
    expected = [_merge_step(members, merger, optimizer, sampler) for _ in range(2)]

    modules, members, merger, optimizer, sampler = _phase2(spec, shards)
    for module in modules:
        checkpointing.load_module(tmp_path, module)
    checkpointing.load_coordinator(tmp_path, merger, optimizer, sampler)
    assert [_merge_step(members, merger, optimizer, sampler) for _ in range(2)] == expected


def test_members_are_built_from_the_seed_not_the_placement():
    spec = _tiny_spec()
    config = ensemble_config(spec, vocab_size=260)
    a, pa = build_member(config, 3, seed=5)
    b, pb = build_member(config, 3, seed=5)
    c, _ = build_member(config, 2, seed=5)
    assert torch.equal(a.wte.weight, b.wte.weight) and torch.equal(pa.weight, pb.weight)
    assert not torch.equal(a.wte.weight, c.wte.weight)
    assert all(torch.equal(p, q) for p, q in zip(build_merger(config, 5).parameters(), build_merger(config, 5).parameters()))


def test_assemble_rebuilds_the_ensemble_from_a_checkpoint(tmp_path, shard):
    """The checkpoint's module files + merger.pt load into a LeviathanEnsemble that saves and loads without Ray."""
    spec = _tiny_spec()
    config = ensemble_config(spec, vocab_size=260)
    modules = [_module(spec, shard, i) for i in range(2)]
    for module in modules:
        train_module_step(module, 1.0)
        checkpointing.save_module(tmp_path, module)
    merger = build_merger(config, spec.seed)
    checkpointing.save_coordinator(
        tmp_path, merger=merger, merger_optimizer=None, mixed_sampler=modules[0].sampler,
        config=config, phase="merge", step=3,
    )
    checkpointing.seal(tmp_path, rank=0)  # what the one rank does last
    assert checkpointing.read_state(tmp_path)["step"] == 3
    rng = torch.get_rng_state()
    ensemble = checkpointing.assemble(tmp_path)
    assert torch.equal(rng, torch.get_rng_state()), "assembled on the meta device: no random initialisation"
    assert not any(t.is_meta for t in (*ensemble.parameters(), *ensemble.buffers()))
    for module in modules:
        for m in module.members:
            assembled = ensemble.members[m.index]
            assert assembled.lm_head.weight is assembled.wte.weight, "the LM head stays tied to the embedding"
            for (name, p), q in zip(assembled.named_parameters(), m.model.parameters()):
                assert torch.equal(p, q), name
            assert torch.equal(ensemble.projections[m.index].weight, m.projection.weight)
    for p, q in zip(ensemble.merger.parameters(), merger.parameters()):
        assert torch.equal(p, q)
    ensemble.save(tmp_path / "final")
    loaded = LeviathanEnsemble.load(tmp_path / "final")
    x = torch.randint(0, 260, (2, 8))
    assert torch.allclose(loaded(x)[0], ensemble(x)[0])
    assert math.isfinite(loaded(x, x)[1].item())


def test_missing_checkpoint_file_is_named(tmp_path, shard):
    spec = _tiny_spec()
    with pytest.raises(checkpointing.CheckpointLayoutError, match="module_0.pt"):
        checkpointing.load_module(tmp_path, _module(spec, shard))


def test_progress_bar_follows_the_metrics_log(tmp_path, capsys):
    from cluster.metrics import ProgressBar

    log = MetricsLog(str(tmp_path))
    log.append([record(step=99, phase="merge", member="merged", train_loss=9.0)])  # an earlier run's line
    # A long interval: the bar's first look may come before the appends, its last one after the stop.
    with ProgressBar(str(tmp_path), phase1_steps=10, phase2_steps=4, interval_s=60):
        log.append([record(step=10, phase="members", member="m0.0", module=0, train_loss=2.5)])
        log.append([record(step=4, phase="merge", member="merged", train_loss=1.25)])
    err = capsys.readouterr().err
    assert "14/14" in err and "merged=1.250" in err, err[-500:]
    assert "merged=9.000" not in err, "records of an earlier run are skipped"


def test_rng_checkpoint_holds_only_the_ranks_own_gpu(tmp_path, monkeypatch):
    """A rank saves its own GPU's generator, and restores it on whatever device it gets after a
    restart, even on a node with fewer GPUs (no `*_all` calls over the visible devices).

    No GPU here: torch.cuda's generator accessors are simulated for an 8-GPU node, then a 1-GPU one."""
    generators = {i: torch.tensor([i], dtype=torch.uint8) for i in range(8)}
    restored = {}

    def refuse_all(*args, **kwargs):
        raise AssertionError("the checkpoint must not touch every visible GPU")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse_all)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: generators[device.index].clone())
    checkpointing.save_rank(tmp_path, 5, torch.device("cuda", 6))

    generators = {0: torch.tensor([0], dtype=torch.uint8)}  # the restart lands on a 1-GPU node
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update({device.index: state}))
    checkpointing.load_rank(tmp_path, 5, torch.device("cuda", 0))
    assert list(restored) == [0] and restored[0].tolist() == [6], restored

    checkpointing.save_rank(tmp_path, 1)  # a CPU rank saves no CUDA state
    assert torch.load(tmp_path / checkpointing.rng_file(1), weights_only=False)["cuda"] is None
