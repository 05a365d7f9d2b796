"""Phase-2 traffic and step time: all-gather of every row vs the row-block all-to-all.

Two gloo processes (no Ray), the demo's shapes by default (4 modules x 2 tiny
members, M = 8, B = 16, T = 128, merge width D = 64, byte vocabulary), frozen
members. Each process runs the same phase-2 steps in three ways, interleaved
step by step (A B C A B C ...) so the machine's load drifts evenly over them:

- `gather-fusion-states`: the merge before the evidence: fusion, state-only
  merger, every rank all-gathers all B rows of every member's states
  (`Exchange.gather`, the path evaluation still uses) and merges its rows;
- `gather-mixture-evidence`: the same all-gather, also of the (M, B, T)
  target log-probs, mixture + evidence;
- `rows-mixture-evidence`: the product path (`cluster.merge.merged_loss`):
  one all-to-all of each rank's row block of states + target log-probs.

Bytes are counted from the tensors actually passed to the collectives
(`CommTimer.add_bytes`: the input and the output buffers, forward only; the
backward sends the gradients back the same way). Step time: median CPU seconds
of this process per step (the shared machine skews wall time) and median wall
seconds, members' forward + exchange + merge + backward + the merger's all_reduce.

    python benchmarks/phase2_traffic.py [--steps 20] [--batch 16] [--seq 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit_report  # noqa: E402
from cluster.members import Member  # noqa: E402
from cluster.merge import (  # noqa: E402
    CommTimer,
    Exchange,
    gather_outputs,
    local_parameters,
    merged_loss,
    rank_outputs,
    reduce_and_clip,
)
from cluster.placement import members_for_rank  # noqa: E402
from leviathan.config import ComponentConfig, EnsembleConfig  # noqa: E402
from leviathan.model.ensemble import LeviathanEnsemble, merge_members  # noqa: E402

VARIANTS = ("gather-fusion-states", "gather-mixture-evidence", "rows-mixture-evidence")


def demo_ensemble(merge: str, evidence: bool) -> LeviathanEnsemble:
    torch.manual_seed(0)
    members = [ComponentConfig.preset("tiny", flavour=f) for f in ("gelu4", "relu3")]
    return LeviathanEnsemble(EnsembleConfig(members=members, modules=4, members_per_module=2, merge=merge,
                                            merge_width=64, merge_heads=4, evidence=evidence))


def gathered_loss(members, merger, x, y, exchange, timer) -> torch.Tensor:
    """The all-gather variant: every rank receives every row, then merges its own."""
    needs_lp = merger.merge_mode == "mixture" or merger.evidence
    local = rank_outputs(members, x, y if needs_lp else None, members_grad=False)
    rows = exchange.rows(x.shape[0])
    out = merge_members(merger, gather_outputs(local, exchange, timer), y[rows], rows)
    return out.loss * (y[rows].shape[0] / x.shape[0])


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    setups = {}
    for name in VARIANTS:
        ens = demo_ensemble("fusion" if "fusion" in name else "mixture", "evidence" in name)
        c = ens.config
        mine = members_for_rank(rank, world, c.modules, c.members_per_module)
        members = [Member(i, c.member_names[i], ens.members[i], ens.projections[i]) for i in mine]
        setups[name] = (ens, members, Exchange.for_placement(rank, world, c.modules, c.members_per_module))
    g = torch.Generator().manual_seed(1)
    stats = {n: {"cpu_s": [], "wall_s": [], "sent": [], "received": []} for n in VARIANTS}
    for _ in range(args.steps):
        x = torch.randint(0, 260, (args.batch, args.seq), generator=g)
        y = torch.randint(0, 260, (args.batch, args.seq), generator=g)
        for name in VARIANTS:
            ens, members, exchange = setups[name]
            ens.zero_grad(set_to_none=True)
            timer = CommTimer()
            dist.barrier()
            c0, w0 = time.process_time(), time.perf_counter()
            if name.startswith("rows"):
                share = merged_loss(members, ens.merger, x, y, exchange, joint=False, timer=timer)
            else:
                share = gathered_loss(members, ens.merger, x, y, exchange, timer)
            share.backward()
            reduce_and_clip(ens.merger, local_parameters(members, joint=False), share, world, 1.0, timer)
            s = stats[name]
            s["cpu_s"].append(time.process_time() - c0)
            s["wall_s"].append(time.perf_counter() - w0)
            s["sent"].append(sum(timer.bytes_sent.values()))
            s["received"].append(sum(timer.bytes_received.values()))
    skip = min(3, args.steps // 4)
    result = {
        name: {
            "bytes_sent_per_step": s["sent"][-1],
            "bytes_received_per_step": s["received"][-1],
            "cpu_s_per_step_median": statistics.median(s["cpu_s"][skip:]),
            "wall_s_per_step_median": statistics.median(s["wall_s"][skip:]),
        }
        for name, s in stats.items()
    }
    if rank == 0:
        Path(out_file).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = f"/tmp/phase2_traffic_{os.getpid()}.json"
    mp.spawn(worker, args=(2, port, args, tmp), nprocs=2, join=True)
    per_rank0 = json.loads(Path(tmp).read_text())
    os.unlink(tmp)
    before, after = per_rank0["gather-fusion-states"], per_rank0["rows-mixture-evidence"]
    out = {
        "shapes": {"M": 8, "B": args.batch, "T": args.seq, "D": 64, "V": 260, "workers": 2, "dtype": "float32"},
        "steps": args.steps,
        "rank0": per_rank0,
        "received_bytes_ratio_rows_vs_gather_same_merge": per_rank0["rows-mixture-evidence"]["bytes_received_per_step"]
        / per_rank0["gather-mixture-evidence"]["bytes_received_per_step"],
        "received_bytes_ratio_after_vs_before": after["bytes_received_per_step"] / before["bytes_received_per_step"],
    }
    emit_report(out, args.out, indent=1)


if __name__ == "__main__":
    main()
