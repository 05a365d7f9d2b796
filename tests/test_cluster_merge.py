"""Phase 2 on 2 Ray Train workers equals one single-process `LeviathanEnsemble` step.

3 modules x 2 members on 2 workers (rank 0 hosts 4 members, rank 1 hosts 2, so
the gather pads) and a batch of 5 rows (rank 0 merges 3 rows, rank 1 merges 2):
the global loss and the gradients of every projection, the merger (beta and
gamma of the evidence included) and (with joint training) the members match the
single-process ensemble's. The batch travels as row blocks (an all-to-all of the
states with the target log-probs as one more channel), in both merge modes,
with and without the evidence, and with the mixture's residual (the members'
full log-probs travel too) under joint training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from leviathan.config import ComponentConfig, EnsembleConfig
from leviathan.model.ensemble import LeviathanEnsemble

CASES = {
    "fusion-evidence": dict(merge="fusion", evidence=True, joint=False),
    "mixture-evidence-joint": dict(merge="mixture", evidence=True, joint=True),
    "mixture-evidence": dict(merge="mixture", evidence=True, joint=False),
    "fusion-states-joint": dict(merge="fusion", evidence=False, joint=True),
    "mixture-residual-joint": dict(merge="mixture", evidence=True, joint=True, residual=True),
}


def _ensemble(merge: str, evidence: bool, residual: bool = False, **_) -> LeviathanEnsemble:
    torch.manual_seed(0)
    members = [
        ComponentConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16, flavour=f, window=2)
        for f in ("gelu4", "relu3")
    ]
    config = EnsembleConfig(members=members, modules=3, members_per_module=2, merge=merge,
                            merge_width=8, merge_heads=2, merge_window=2, evidence=evidence,
                            residual=residual)
    ens = LeviathanEnsemble(config)
    if residual:  # a correction away from its zero init, so it is in the loss and its gradients
        with torch.no_grad():
            ens.merger.res_head.weight.normal_(std=0.5)
    if evidence:  # away from the init, where W_k = 0 would zero W_q's and the lags' gradients
        with torch.no_grad():
            ens.merger.key.weight.normal_(std=0.5)
            ens.merger.gamma_raw.copy_(torch.tensor([0.0, 0.4]))
            ens.merger.beta.copy_(torch.tensor([1.3, 0.7]))
    return ens


def prepare_on_two_workers(folder: Path, corpora: dict[str, Path]) -> dict:
    """The batch and every case's ensemble, saved for the workers (tests/scripts/two_workers.py)."""
    torch.manual_seed(1)
    x = torch.randint(0, 40, (5, 12))
    y = torch.randint(0, 40, (5, 12))
    torch.save((x, y), folder / "batch.pt")
    for name, case in CASES.items():
        _ensemble(**case).save(folder / name)
    return {"dir": str(folder), "cases": CASES}


def on_each_worker(config: dict) -> None:
    """One phase-2 step of every case on this rank's members; the loss and gradients to rank<r>.pt."""
    import ray.train

    from cluster.members import Member
    from cluster.merge import Exchange, local_parameters, merged_loss, reduce_and_clip
    from cluster.placement import members_for_rank

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    x, y = torch.load(f"{config['dir']}/batch.pt")
    out = {}
    for name, case in config["cases"].items():
        ens = LeviathanEnsemble.load(f"{config['dir']}/{name}")
        c = ens.config
        mine = members_for_rank(rank, world, c.modules, c.members_per_module)
        members = [Member(i, c.member_names[i], ens.members[i], ens.projections[i]) for i in mine]
        exchange = Exchange.for_placement(rank, world, c.modules, c.members_per_module)
        share = merged_loss(members, ens.merger, x, y, exchange, joint=case["joint"])
        share.backward()
        loss, _ = reduce_and_clip(
            ens.merger, local_parameters(members, joint=case["joint"]), share, world, grad_clip=0.0
        )
        grads = {n: p.grad.clone() for n, p in ens.named_parameters() if p.grad is not None}
        out[name] = {"loss": loss, "grads": grads, "members": mine}
    torch.save(out, f"{config['dir']}/rank{rank}.pt")


def test_phase2_step_on_two_workers_equals_single_process_step(two_workers):
    folder = two_workers / "merge"
    x, y = torch.load(folder / "batch.pt")
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(2)]
    for name, case in CASES.items():
        ens = _ensemble(**case)
        ens.load_state_dict(LeviathanEnsemble.load(folder / name).state_dict())
        _, loss = ens(x, y)
        loss.backward()
        for r, got in enumerate(ranks):
            assert abs(got[name]["loss"] - loss.item()) < 1e-5, f"{name}: rank {r} loss {got[name]['loss']} vs {loss.item()}"
            owned = got[name]["members"]
            checked = 0
            for n, p in ens.named_parameters():
                part, _, rest = n.partition(".")
                index = int(rest.split(".")[0]) if part in ("members", "projections") else None
                if part == "merger" or (part == "projections" and index in owned) or (
                    part == "members" and index in owned and case["joint"]
                ):
                    assert n in got[name]["grads"], f"{name}: rank {r} has no gradient for {n}"
                    torch.testing.assert_close(got[name]["grads"][n], p.grad, rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{name}: rank {r}, {n}: {m}")
                    checked += 1
                elif part == "members" and not case["joint"]:
                    assert n not in got[name]["grads"], f"{name}: frozen member parameter {n} got a gradient"
            assert checked > 0
        ens.zero_grad()
