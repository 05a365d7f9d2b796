"""The workers' evaluation (cluster.evaluation, what the trainer calls) on 2 Ray
workers gives the same figures as `leviathan.evaluation.evaluate_ensemble` in one
process: every row, every domain, the mixed set and the domain-switch set, with
and without a merger, with and without the merger's evidence, and with the
mixture's residual (each rank's rows of the members' full log-probs).

2 modules x 2 members on 2 workers and batches of 3 windows (rank 0 merges 2
rows, rank 1 one), so both the member gather and the row gather are exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leviathan.config import ComponentConfig, EnsembleConfig
from leviathan.data.staging import load_manifest
from leviathan.model.ensemble import LeviathanEnsemble
from leviathan.baselines import BaselineSettings
from leviathan.evaluation import MIXED, SWITCH, SWITCH_PRE, evaluate_ensemble

SETTINGS = dict(batch_size=3, seq_len=16, max_batches=2, prefix_tokens=4)
BASELINES = BaselineSettings(alpha=0.02, beta=1.25, gamma=0.8)


def _ensemble(merge: str, evidence: bool, residual: bool = False) -> LeviathanEnsemble:
    torch.manual_seed(3)
    member = ComponentConfig.preset("tiny", vocab_size=260, block_size=32, n_layer=1)
    config = EnsembleConfig(members=[member] * 2, modules=2, members_per_module=2, merge=merge, merge_width=32,
                            evidence=evidence, residual=residual)
    ens = LeviathanEnsemble(config)
    if residual:  # a correction away from its zero init, so the merged rows depend on it
        with torch.no_grad():
            ens.merger.res_head.weight.normal_(std=0.2)
    if evidence:  # evidence weights away from their init, so the state term and gamma matter
        with torch.no_grad():
            ens.merger.key.weight.normal_(std=0.2)
            ens.merger.gamma_raw.copy_(torch.tensor([0.0, 0.1, 0.5, 1.0]))
    return ens


CASES = {"fusion": ("fusion", True), "mixture": ("mixture", True), "mixture-states-only": ("mixture", False),
         "members-only": ("mixture", True), "mixture-residual": ("mixture", True, True)}


def prepare_on_two_workers(folder: Path, corpora: dict[str, Path]) -> dict:
    """Every case's ensemble, saved for the workers (tests/scripts/two_workers.py)."""
    for name, case in CASES.items():
        _ensemble(*case).save(folder / name)
    manifest = corpora["small"]
    return {"dir": str(folder), "cases": list(CASES), "manifest": str(manifest),
            "domains": load_manifest(manifest).domains[:2], "settings": SETTINGS, "baselines": BASELINES}


def on_each_worker(config: dict) -> None:
    """This rank's evaluation of every case, and its tuned baselines, to rank<r>.pt."""
    import ray.train

    from cluster.evaluation import evaluate, tune
    from cluster.members import Member
    from cluster.merge import Exchange
    from cluster.placement import members_for_rank
    from leviathan.data.shards import eval_batches, switch_batches
    from leviathan.evaluation import tuning_batches

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    m = load_manifest(config["manifest"])
    s = config["settings"]
    val_sets = {d: eval_batches(m.shard(d, "val"), s["batch_size"], s["seq_len"], s["max_batches"])
                for d in config["domains"]}
    switch_set = switch_batches([m.shard(d, "val") for d in config["domains"]], s["batch_size"], s["seq_len"])
    out = {}
    for name in config["cases"]:
        ens = LeviathanEnsemble.load(f"{config['dir']}/{name}")
        c = ens.config
        mine = members_for_rank(rank, world, c.modules, c.members_per_module)
        members = [Member(i, c.member_names[i], ens.members[i], ens.projections[i]) for i in mine]
        exchange = Exchange.for_placement(rank, world, c.modules, c.members_per_module)
        merger = None if name == "members-only" else ens.merger
        result = evaluate(members, c.member_names, merger, val_sets, s["prefix_tokens"], exchange,
                          torch.device("cpu"), switch_set=switch_set, baselines=config["baselines"])
        out[name] = {"rows": result.rows, "losses": result.losses}
    # Tuning on the train split gives every rank the settings the single process finds.
    train = {d: m.shard(d, "train") for d in config["domains"]}
    windows = tuning_batches(list(train.values()), s["batch_size"], s["seq_len"], s["max_batches"])
    out["tuned"] = tune(members, windows, s["prefix_tokens"], exchange, torch.device("cpu")).to_dict()
    torch.save(out, f"{config['dir']}/rank{rank}.pt")


def test_distributed_evaluation_equals_the_single_process_report(two_workers, small_corpus):
    folder = two_workers / "evaluation"
    manifest = small_corpus
    domains = load_manifest(manifest).domains[:2]
    cases = CASES
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(2)]
    for name in cases:
        report = evaluate_ensemble(LeviathanEnsemble.load(folder / name), load_manifest(manifest), list(domains),
                                   baselines=BASELINES, **SETTINGS)
        expected = {r["name"]: r["loss"] for r in report["rows"]}
        if name == "members-only":
            del expected["merged"], expected["merged (no state)"]
        for r, got in enumerate(ranks):
            assert got[name]["rows"] == list(expected), f"{name}: rank {r} rows"
            assert list(got[name]["losses"]) == [*domains, MIXED, SWITCH, SWITCH_PRE]
            for column in [*domains, MIXED, SWITCH, SWITCH_PRE]:
                for i, row_name in enumerate(got[name]["rows"]):
                    assert got[name]["losses"][column][i] == pytest.approx(expected[row_name][column], rel=1e-5, abs=1e-6), (
                        f"{name}: rank {r}, {row_name} on {column}"
                    )
    ens = LeviathanEnsemble.load(folder / "members-only")
    tuned = evaluate_ensemble(ens, load_manifest(manifest), list(domains), merged=False, **SETTINGS)["baselines"]
    for r, got in enumerate(ranks):
        assert got["tuned"] == tuned, f"rank {r}: tuned baselines"
