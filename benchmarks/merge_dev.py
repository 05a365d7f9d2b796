"""Merger variants against tuned training-free baselines on DEV windows carved from train.

Takes the frozen members of a finished run (`<run>/final`) and splits every
domain's TRAIN shard by position, so that no figure here touches the val split:

    [0, 80%)     phase 2: the only tokens the variants train on (the product's
                 mixed sampler with its switch rows, on these slices)
    [80%, 90%)   tune: the baselines' settings (alpha; beta, gamma) are chosen here
    [90%, 100%)  dev: every figure the script prints

Window sets (tune and dev alike, from their own slice, numpy seeds 11 / 12):
`mixed` = `--per-domain` evenly spaced windows per domain; `switch` = `--per-pair`
windows per ordered pair of domains, cut at a point drawn uniformly in
[T/4, 3T/4], both parts at random starts. Every row scores targets 32..T-1 (the
evaluator's dev prefix is excluded, as on val); `switch_before` / `switch_after`
split the switch column at the cut.

Baselines, computed on the members' target log-probs lp_m[t] = log p_m(y_t):
- running posterior:  w[t] = softmax_m sum_{j<t} lp_m[j]
- decayed posterior:  log w[t+1] = gamma log w[t] + beta lp_m[t] (then normalised)
- fixed share:        w[t+1] = (1 - a) normalise(w[t] p_m(y_t)) + a / M
"best baseline" is the best of them per column.

Variants are trained in lock step on the same batches: each step draws one
batch, runs the frozen members once (hidden states, full log-probs), then takes
one step of every variant (fresh projections + merger, `merger_adamw`, the
job's lr schedule, grad clip over the variant's parameters, as `reduce_and_clip`
does on one rank). A variant's CPU s/step counts its own projections, merger
forward/backward and optimiser step; the members' frozen forward, which every
variant needs, is reported once as `member_forward_cpu_s_per_step`.

    python benchmarks/merge_dev.py --run RUN_DIR --spec jobs/specs/demo.toml [--variants a,b] [--seeds 0,1,2] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit_report, machine_info  # noqa: E402
from cluster.members import adamw, merger_adamw  # noqa: E402
from cluster.schedule import lr_at, set_lr  # noqa: E402
from jobs.plan import build_plan  # noqa: E402
from jobs.spec import JobSpec  # noqa: E402
from leviathan.data.shards import MixedBatchSampler  # noqa: E402
from leviathan.data.staging import load_manifest  # noqa: E402
from leviathan.model.ensemble import CorrelationMerger, LeviathanEnsemble  # noqa: E402

PREFIX = 32  # scored targets start here, as in the evaluator
SLICES = {"phase2": (0.0, 0.8), "tune": (0.8, 0.9), "dev": (0.9, 1.0)}

# name -> (merger config overrides, options, phase-2 steps multiplier)
VARIANTS = {
    "recipe": ({}, {}, 1),
    "residual": ({}, {"residual": True}, 1),
    "features": ({}, {"features": True}, 1),
    "residual+features": ({}, {"residual": True, "features": True}, 1),
    "wide": ({"merge_width": 128, "merge_heads": 8, "merge_window": 8}, {}, 1),
    "long": ({}, {}, 2),
    "wide+features": ({"merge_width": 128, "merge_heads": 8, "merge_window": 8}, {"features": True}, 1),
    "long+features": ({}, {"features": True}, 2),
    "residual-long": ({}, {"residual": True}, 2),
    "residual-fast": ({}, {"residual": True, "extra_lr_scale": 10.0}, 1),
    "features-fast": ({}, {"features": True, "extra_lr_scale": 10.0}, 1),
    "share": ({}, {"share": True}, 1),
    "share+residual": ({}, {"share": True, "residual": True}, 1),
    "joint": ({}, {"joint": True}, 1),
    "residual-detached": ({}, {"residual": True, "detach": True}, 1),
    "residual-detached-long": ({}, {"residual": True, "detach": True}, 2),
    "joint+residual": ({}, {"joint": True, "residual": True}, 1),
    "joint+residual-long": ({}, {"joint": True, "residual": True}, 2),
    "joint-long": ({}, {"joint": True}, 2),
}


class SliceShard:
    """A contiguous part of a token shard, duck-typed for `MixedBatchSampler` (tokens, len, path)."""

    def __init__(self, shard, lo: float, hi: float) -> None:
        n = len(shard)
        self.tokens = shard.tokens[int(lo * n) : int(hi * n)]
        self.path = f"{shard.path}[{lo:.2f}:{hi:.2f}]"

    def __len__(self) -> int:
        return len(self.tokens)


def window_sets(shards: list[SliceShard], T: int, per_domain: int, per_pair: int, seed: int) -> dict:
    """mixed (D * per_domain windows, evenly spaced) and switch (per_pair per ordered pair,
    cut uniform in [T/4, 3T/4]) as (x, y, cut) int64 tensors; cut = T for plain windows."""
    rng = np.random.Generator(np.random.PCG64(seed))
    mixed = []
    for s in shards:
        for start in np.rint(np.linspace(0, len(s) - T - 1, per_domain)).astype(np.int64):
            mixed.append(np.asarray(s.tokens[start : start + T + 1], dtype=np.int64))
    switch, cuts = [], []
    for a, b in itertools.permutations(range(len(shards)), 2):
        for _ in range(per_pair):
            cut = int(rng.integers(T // 4, 3 * T // 4 + 1))
            rest = T + 1 - cut
            sa = int(rng.integers(0, len(shards[a]) - cut))
            sb = int(rng.integers(0, len(shards[b]) - rest))
            switch.append(np.concatenate([shards[a].tokens[sa : sa + cut], shards[b].tokens[sb : sb + rest]]).astype(np.int64))
            cuts.append(cut)

    def pack(ws, cs):
        w = torch.from_numpy(np.stack(ws))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous(), torch.tensor(cs)

    return {"mixed": pack(mixed, [T] * len(mixed)), "switch": pack(switch, cuts)}


@torch.no_grad()
def member_pass(members, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Frozen members on (B, T): hidden states (B, T, M, d), full log-probs (B, T, M, V), target log-probs (B, T, M)."""
    return member_forward(members, x, y)


def member_forward(members, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`member_pass` with gradients (joint training)."""
    hs, lps = [], []
    for m in members:
        h = m.hidden(x, None)
        hs.append(h)
        lps.append(F.log_softmax(m.logits_from_hidden(h).float(), dim=-1))
    h = torch.stack(hs, dim=2)
    lp = torch.stack(lps, dim=2)
    return h, lp, lp.gather(-1, y[:, :, None, None].expand(*y.shape, lp.shape[2], 1)).squeeze(-1)


class DevMerger(nn.Module):
    """Projections + a mixture/evidence `CorrelationMerger`, with the research options.

    features: the score also sees, per member and position, its predictive entropy
    and its agreement with the members' mean prediction (E_{pbar} log p_m), both
    centred over members, through per-head weights initialised to 0.
    residual: log p = log_softmax(log mixture + head(LN(c + W_o sum_m w v_m))), the
    head initialised to 0, so it starts as the mixture exactly.
    """

    def __init__(self, config, member_dims: list[int], features: bool = False, residual: bool = False,
                 share: bool = False, detach: bool = False, extra_lr_scale: float = 1.0, joint: bool = False, members=None) -> None:
        super().__init__()
        self.extra_lr_scale = extra_lr_scale
        self.share = share
        self.detach = detach  # the residual reads detached states and weights: it cannot move the mixture
        if share:  # per-head floor alpha_h / M on the weights (fixed share's mixing), alpha = sigmoid(s) = 0.01 at init
            self.share_logit = nn.Parameter(torch.full((config.merge_heads,), math.log(0.01 / 0.99)))
        # joint: the variant trains its own copy of the members through the merge
        self.members = nn.ModuleList(copy.deepcopy(m).requires_grad_(True) for m in members) if joint else None
        D, H, V = config.merge_width, config.merge_heads, config.vocab_size
        self.projections = nn.ModuleList(nn.Linear(d, D, bias=False) for d in member_dims)
        self.merger = CorrelationMerger(config)
        self.features = features
        self.residual = residual
        if features:
            self.feature_weight = nn.Parameter(torch.zeros(2, H))
        if residual:
            self.res_value = nn.Linear(D, D, bias=False)
            self.res_out = nn.Linear(D, D, bias=False)
            self.res_ln = nn.LayerNorm(D)
            self.res_head = nn.Linear(D, V, bias=False)
            nn.init.zeros_(self.res_head.weight)

    def forward(self, h: Tensor, full_lp: Tensor, target_lp: Tensor, y: Tensor) -> Tensor:
        """Merged log p(y_t) (B, T) from hidden (B, T, M, d), full (B, T, M, V) and target (B, T, M) log-probs."""
        states = torch.stack([p(h[:, :, i]) for i, p in enumerate(self.projections)], dim=2)  # (B, T, M, D)
        log_w = self.merger.log_weights(states, target_lp)  # (B, T, M, H)
        if self.features:
            p = full_lp.exp()
            ent = -(p * full_lp).sum(-1)  # (B, T, M)
            agree = (p.mean(2, keepdim=True) * full_lp).sum(-1)  # (B, T, M)
            feats = torch.stack([ent - ent.mean(2, keepdim=True), agree - agree.mean(2, keepdim=True)], -1)
            log_w = F.log_softmax(log_w + feats @ self.feature_weight, dim=2)
        H = log_w.shape[-1]
        if self.share:
            alpha = torch.sigmoid(self.share_logit)  # (H,)
            log_w = torch.logaddexp(torch.log1p(-alpha) + log_w, (alpha / log_w.shape[2]).log())
        log_pi = torch.logsumexp(log_w, dim=-1) - math.log(H)  # (B, T, M)
        if not self.residual:
            return torch.logsumexp(log_pi + target_lp, dim=2)
        B, T, M, D = states.shape
        log_mix = torch.logsumexp(log_pi[..., None] + full_lp, dim=2)  # (B, T, V)
        w = log_w.exp()
        if self.detach:
            states, w = states.detach(), w.detach()
        v = self.res_value(states).view(B, T, M, H, D // H)
        fused = torch.einsum("btmh,btmhd->bthd", w, v).reshape(B, T, D)
        corr = self.res_head(self.res_ln(states.mean(2) + self.res_out(fused)))
        return F.log_softmax(log_mix + corr, dim=-1).gather(-1, y[..., None]).squeeze(-1)


def optimizers(model: DevMerger, t) -> list[torch.optim.Optimizer]:
    """The product's groups: `merger_adamw` for the merger, `adamw` for projections and the extras."""
    opts = [merger_adamw(model.merger, t.merge_lr, t.weight_decay, t.evidence_lr_scale),
            adamw(model.projections, t.merge_lr, t.weight_decay)]
    extras = nn.ParameterList([p for n, p in model.named_parameters()
                               if not n.startswith(("merger.", "projections.", "members."))])
    if len(extras):
        opts.append(adamw(extras, t.merge_lr * model.extra_lr_scale, t.weight_decay))
    if model.members is not None:
        opts.append(adamw(model.members, t.lr * t.joint_lr_scale, t.weight_decay))
    return opts


# ---- baselines on target log-probs lp (N, T, M) -> merged log p(y_t) (N, T)

def decayed_posterior(lp: Tensor, beta: float, gamma: float) -> Tensor:
    N, T, M = lp.shape
    score = torch.zeros(N, M, dtype=lp.dtype)
    out = []
    for t in range(T):
        out.append(torch.logsumexp(F.log_softmax(score, -1) + lp[:, t], -1))
        score = gamma * score + beta * lp[:, t]
    return torch.stack(out, 1)


def fixed_share(lp: Tensor, alpha: float) -> Tensor:
    N, T, M = lp.shape
    log_w = torch.full((N, M), -math.log(M), dtype=lp.dtype)
    out = []
    for t in range(T):
        joint = log_w + lp[:, t]
        out.append(torch.logsumexp(joint, -1))
        post = F.log_softmax(joint, -1)
        log_w = torch.logaddexp(math.log1p(-alpha) + post, torch.full_like(post, math.log(alpha / M)))
    return torch.stack(out, 1)


def columns(merged: Tensor, cut: dict[str, Tensor]) -> dict[str, float]:
    """Loss per column from merged log p(y_t) per window set {name: (N, T)}; switch split at the cut."""
    out = {}
    for name, lp in merged.items():
        scored = lp[:, PREFIX:]
        out[name] = float(-scored.mean())
        if name == "switch":
            pos = torch.arange(PREFIX, lp.shape[1])[None]
            after = pos >= cut["switch"][:, None] - 1  # target y_t = x_{t+1} comes from domain b once t + 1 >= cut
            out["switch_before"] = float(-scored[~after].mean())
            out["switch_after"] = float(-scored[after].mean())
    return out


def tune_baselines(tune_lp: dict, dev_lp: dict, cut: dict) -> dict:
    """Pick each baseline's settings by (mixed + switch) / 2 on tune windows, score them on dev."""
    grids = {
        "fixed share": [dict(alpha=a) for a in (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2)],
        "decayed posterior": [dict(beta=b, gamma=g) for b in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
                              for g in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)],
    }
    fns = {"fixed share": fixed_share, "decayed posterior": decayed_posterior}
    rows = {"running posterior": {"settings": dict(beta=1.0, gamma=1.0),
                                  "dev": columns({k: decayed_posterior(v, 1.0, 1.0) for k, v in dev_lp.items()}, cut)}}
    for name, grid in grids.items():
        def objective(s):
            c = columns({k: fns[name](v, **s) for k, v in tune_lp.items()}, cut["tune"])
            return (c["mixed"] + c["switch"]) / 2
        best = min(grid, key=objective)
        rows[name] = {"settings": best, "tune_objective": objective(best),
                      "dev": columns({k: fns[name](v, **best) for k, v in dev_lp.items()}, cut)}
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True, help="a finished run folder with final/")
    p.add_argument("--spec", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--per-domain", type=int, default=64)
    p.add_argument("--per-pair", type=int, default=32)
    p.add_argument("--phase2-steps", type=int, default=None, help="override the spec's phase2_steps (smoke runs)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    plan = build_plan(JobSpec.from_file(a.spec))
    t = plan.training if a.phase2_steps is None else replace(plan.training, phase2_steps=a.phase2_steps)
    T = t.seq_len
    trained = LeviathanEnsemble.load(Path(a.run) / "final").eval()
    members = list(trained.members)
    for m in members:
        m.requires_grad_(False)
    manifest = load_manifest(plan.manifest)
    train = [manifest.shard(d, "train") for d in plan.domains]
    parts = {k: [SliceShard(s, lo, hi) for s in train] for k, (lo, hi) in SLICES.items()}
    sets = {"tune": window_sets(parts["tune"], T, a.per_domain, a.per_pair, 11),
            "dev": window_sets(parts["dev"], T, a.per_domain, a.per_pair, 12)}

    # members once over the tune and dev windows (hidden states kept for dev only)
    cached = {}
    for split, ws in sets.items():
        for col, (x, y, cut) in ws.items():
            chunks = [member_pass(members, x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
            cached[split, col] = (torch.cat([c[0] for c in chunks]) if split == "dev" else None,
                                  torch.cat([c[2] for c in chunks]), y, cut)
    cut = {"switch": sets["dev"]["switch"][2], "tune": {"switch": sets["tune"]["switch"][2]}}
    baselines = tune_baselines({c: cached["tune", c][1].double() for c in ("mixed", "switch")},
                               {c: cached["dev", c][1].double() for c in ("mixed", "switch")}, cut)
    best = {col: min(baselines, key=lambda r: baselines[r]["dev"][col]) for col in ("mixed", "switch")}
    print(json.dumps({"baselines": baselines, "best": best}), flush=True)

    result = {"run": a.run, "spec": a.spec, "machine": machine_info(torch=torch.__version__),
              "slices": SLICES, "windows": {"per_domain": a.per_domain, "per_pair": a.per_pair, "scored_from": PREFIX},
              "baselines": baselines, "best_baseline": best, "seeds": {}}
    names = a.variants.split(",")
    dims = [m.config.n_embd for m in members]
    for seed in [int(s) for s in a.seeds.split(",")]:
        models, opts, steps, cpu = {}, {}, {}, {}
        for name in names:
            over, options, mult = VARIANTS[name]
            config = replace(trained.config, merge="mixture", evidence=True, **over)
            torch.manual_seed(seed)
            models[name] = DevMerger(config, dims, members=members, **options).train()
            opts[name] = optimizers(models[name], t)
            steps[name] = t.phase2_steps * mult
            cpu[name] = 0.0
        sampler = MixedBatchSampler(parts["phase2"], t.batch_size, T, seed=1000 + seed, switch_fraction=t.switch_fraction)
        member_cpu = 0.0
        for step in range(max(steps.values())):
            c0 = time.process_time()
            x, y = sampler.next()
            h, full_lp, target_lp = member_pass(members, x, y)
            member_cpu += time.process_time() - c0
            for name, model in models.items():
                if step >= steps[name]:
                    continue
                c0 = time.process_time()
                factor = lr_at(step, total_steps=steps[name], warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio)
                for opt in opts[name]:
                    set_lr(opt, factor)
                    opt.zero_grad(set_to_none=True)
                if model.members is not None:
                    loss = -model(*member_forward(model.members, x, y), y).mean()
                else:
                    loss = -model(h, full_lp, target_lp, y).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                for opt in opts[name]:
                    opt.step()
                cpu[name] += time.process_time() - c0
        rows = {}
        for name, model in models.items():
            model.eval()
            merged, own_lp = {}, {}
            with torch.no_grad():
                for col in ("mixed", "switch"):
                    h_all, lp_all, y_all, _ = cached["dev", col]
                    x_all = sets["dev"][col][0]
                    out, lps = [], []
                    for i in range(0, len(y_all), 32):
                        if model.members is not None:
                            hb, full, lpb = member_pass(model.members, x_all[i : i + 32], y_all[i : i + 32])
                            lps.append(lpb)
                        else:
                            hb, lpb = h_all[i : i + 32], lp_all[i : i + 32]
                            full = torch.stack([F.log_softmax(m.logits_from_hidden(hb[:, :, j]).float(), -1)
                                                for j, m in enumerate(members)], dim=2)
                        out.append(model(hb, full, lpb, y_all[i : i + 32]))
                    merged[col] = torch.cat(out)
                    if lps:
                        own_lp[col] = torch.cat(lps).double()
            dev = columns(merged, cut)
            base = baselines
            if own_lp:  # the baselines on the variant's own (jointly trained) members, settings as tuned above
                base = {"fixed share": {"dev": columns({k: fixed_share(v, **baselines["fixed share"]["settings"])
                                                        for k, v in own_lp.items()}, cut)},
                        "decayed posterior": {"dev": columns({k: decayed_posterior(v, **baselines["decayed posterior"]["settings"])
                                                              for k, v in own_lp.items()}, cut)},
                        "running posterior": {"dev": columns({k: decayed_posterior(v, 1.0, 1.0) for k, v in own_lp.items()}, cut)}}
            own_best = {col: min(base, key=lambda r: base[r]["dev"][col]) for col in ("mixed", "switch")}
            rows[name] = {"dev": dev, "cpu_s_per_step": cpu[name] / steps[name], "phase2_steps": steps[name],
                          "gap": {col: dev[col] - base[own_best[col]]["dev"][col] for col in ("mixed", "switch")},
                          "gap_to_frozen_members_baseline": {col: dev[col] - baselines[best[col]]["dev"][col]
                                                             for col in ("mixed", "switch")},
                          "own_baselines": {k: v["dev"] for k, v in base.items()} if own_lp else None,
                          "beta": model.merger.beta.tolist(), "gamma": model.merger.gamma().tolist()}
            print(json.dumps({"seed": seed, "variant": name, **{k: rows[name][k] for k in ("dev", "gap", "cpu_s_per_step")}}),
                  flush=True)
        result["seeds"][seed] = {"variants": rows, "member_forward_cpu_s_per_step": member_cpu / max(steps.values())}
    emit_report(result, a.out, indent=1)


if __name__ == "__main__":
    main()
