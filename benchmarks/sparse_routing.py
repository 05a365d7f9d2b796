"""Sparse routing on a finished run: tokens per second and val loss, top-k members against all.

    python benchmarks/sparse_routing.py --run ~/leviathan/runs/demo --k 2 --every 4,8,16,32 --probe 0,1

Loss: the run's own val windows (each domain's eval windows, the mixed set,
and the domain-switch set), scored teacher-forced by `routed_target_logprobs`
on the evaluation's scored positions (the first quarter of every window is the
prompt, where every member runs); a residual merger is scored with its
correction, from the members' full log-probs, one batch at a time. Speed:
teacher-forced decoding of a few mixed windows, one token at a time with
decode caches, through every member (the ensemble's own cached step) and
through `RoutedDecoder`, interleaved so both see the same machine; the ratio
is the figure, not either time.

`member_token_forwards` counts the members' work: a held member runs only
when it enters the chosen set again or is probed (`--probe N`: before each
re-choice the N held members that weigh most catch up, one chunk over what
they missed), so routing saves the held members' per-token decode steps
(what dominates a batch-1 decode) and most of their arithmetic.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit_report, machine_info  # noqa: E402
from jobs.evaluate import _manifest_for, load_final, load_run_spec  # noqa: E402
from leviathan.data.shards import eval_batches, switch_batches  # noqa: E402
from leviathan.evaluation import default_prefix_tokens  # noqa: E402
from leviathan.model.ensemble import EnsembleCache, run_members  # noqa: E402
from leviathan.model.routing import RoutedDecoder, routed_target_logprobs  # noqa: E402


def setting_name(k: int, every: int, probe: int) -> str:
    return f"k={k} R={every} probe={probe}"


def losses(ensemble, columns: dict[str, list], prefix: int, settings: list[tuple[int, int, int]]) -> dict[str, dict[str, float]]:
    """Mean NLL per column on the scored positions prefix..T-1, for all members and each (k, R, probe).

    Each batch (x, y) runs the members once and is scored under every setting; a residual
    merger also needs the members' full log-probs (b, T, M, V), kept one batch at a time.
    """
    M = ensemble.config.num_members
    residual = ensemble.merger.residual
    runs = [(M, 1, 0), *settings]
    names = ["all", *(setting_name(*s) for s in settings)]
    out: dict[str, dict[str, float]] = {name: {} for name in names}
    for column, batches in columns.items():
        nll, count = dict.fromkeys(names, 0.0), 0
        for x, y in batches:
            members = run_members(ensemble.members, ensemble.projections, x, y, full_logprobs=residual)
            states, target_lp = members.states.permute(1, 2, 0, 3), members.target_logprobs.permute(1, 2, 0)
            extra = {"logprobs": members.logprobs.permute(1, 2, 0, 3), "targets": y} if residual else {}
            for name, (k, every, probe) in zip(names, runs):
                lp = routed_target_logprobs(ensemble.merger, states, target_lp, k, every, prefix, probe, **extra)
                nll[name] -= lp[:, prefix:].sum().item()
            count += y[:, prefix:].numel()
        for name in names:
            out[name][column] = nll[name] / count
    return out


def decode_all(ensemble, window: torch.Tensor, prefix: int) -> int:
    """Every member, cached, one token at a time; returns member-token forwards."""
    cache = EnsembleCache(ensemble.members)
    ensemble._step(window[:, :prefix], cache)
    for t in range(prefix, window.size(1)):
        ensemble._step(window[:, t : t + 1], cache)
    return ensemble.config.num_members * window.size(1)


def decode_routed(ensemble, window: torch.Tensor, prefix: int, k: int, every: int, probe: int) -> int:
    decoder = RoutedDecoder(ensemble, k, every, probe)
    decoder.prefill(window[:, :prefix])
    for t in range(prefix, window.size(1)):
        decoder.step(window[:, t : t + 1])
    return decoder.member_steps


def timed(fn, *args) -> tuple[float, float, int]:
    wall, cpu = time.perf_counter(), time.process_time()
    work = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, work


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished run folder (holds final/)")
    p.add_argument("--k", default="2", help="members kept, comma-separated")
    p.add_argument("--every", default="4,8,16,32", help="re-choose every R tokens, comma-separated")
    p.add_argument("--probe", default="1", help="held members caught up before each re-choice, comma-separated")
    p.add_argument("--decode-windows", type=int, default=4, help="mixed windows decoded for the timing")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds (interleaved, best kept)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = [(int(k), int(r), int(f)) for k in args.k.split(",") for r in args.every.split(",") for f in args.probe.split(",")]

    run = Path(args.run).expanduser()
    spec = load_run_spec(run)
    ensemble, _ = load_final(run)
    ensemble.eval()
    manifest = _manifest_for(spec, None)
    domains = list(spec.data.domains or manifest.domains[: ensemble.config.modules])
    seq_len = min(spec.training.seq_len, ensemble.config.block_size)
    prefix = default_prefix_tokens(seq_len)
    shards = [manifest.shard(d, "val") for d in domains]
    per_domain = [eval_batches(s, spec.training.batch_size, seq_len, spec.training.eval_batches) for s in shards]
    n = min(sum(len(x) for x, _ in b) for b in per_domain)  # every domain on the same number of windows
    mixed = [(torch.cat([x for x, _ in b])[:n], torch.cat([y for _, y in b])[:n]) for b in per_domain]
    columns = {"mixed": mixed}
    if len(shards) > 1:
        columns["switch"] = list(switch_batches(shards, spec.training.batch_size, seq_len))
    loss = losses(ensemble, columns, prefix, settings)

    windows = torch.cat([torch.cat([x[:, :1], y], dim=1) for x, y in mixed])  # (N, T + 1)
    pick = windows[torch.linspace(0, len(windows) - 1, args.decode_windows).long()]
    rows = {"all": [], **{setting_name(*s): [] for s in settings}}
    for _ in range(args.rounds):
        for w in pick:
            w = w[None]
            rows["all"].append(timed(decode_all, ensemble, w, prefix))
            for s in settings:
                rows[setting_name(*s)].append(timed(decode_routed, ensemble, w, prefix, *s))
    tokens = args.decode_windows * (windows.size(1) - prefix)

    def summary(samples):
        half = len(samples) // args.rounds  # per round: sum over windows; keep the best round
        rounds = [samples[i * half : (i + 1) * half] for i in range(args.rounds)]
        wall = min(sum(s[0] for s in r) for r in rounds)
        cpu = min(sum(s[1] for s in r) for r in rounds)
        return {"tokens_per_s": tokens / wall, "cpu_s": cpu, "member_token_forwards": sum(s[2] for s in rounds[0])}

    base = summary(rows["all"])
    table = []
    for name, samples in rows.items():
        s = summary(samples)
        table.append({
            "setting": name,
            **s,
            "speedup_wall": s["tokens_per_s"] / base["tokens_per_s"],
            "speedup_cpu": base["cpu_s"] / s["cpu_s"],
            **{f"loss_{c}": v for c, v in loss[name].items()},
            **{f"delta_{c}": v - loss["all"][c] for c, v in loss[name].items()},
        })
    report = {
        "benchmark": "sparse_routing",
        "run": str(run),
        "members": ensemble.config.num_members,
        "seq_len": seq_len,
        "prompt_tokens": prefix,
        "windows": {c: sum(int(x.size(0)) for x, _ in batches) for c, batches in columns.items()},
        "decoded_tokens": tokens,
        "table": table,
        "machine": machine_info(torch=torch.__version__, threads=args.threads, load=os.getloadavg()),
    }
    for r in table:
        print(
            f"{r['setting']:>20}  {r['tokens_per_s']:8.1f} tok/s  x{r['speedup_wall']:.2f} wall  x{r['speedup_cpu']:.2f} cpu  "
            + "  ".join(f"{c} {r[f'loss_{c}']:.4f} ({r[f'delta_{c}']:+.4f})" for c in columns),
            file=sys.stderr,
        )
    return emit_report(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
