"""Research prototype of the evidence-conditioned merger (single process, no Ray).

    python benchmarks/merge_research.py --run RUN_DIR [--recipes NAME,...] [--out FILE.json]

Loads the members of a trained ensemble (`<run>/final`), trains fresh mergers
(phase 2 only, frozen members unless a recipe says `joint`) on the train split,
and scores every row on the val split: each domain, the mixed set and the
domain-switch set. Prints one JSON object (also written to --out).

Evidence (member m, position t, per head h; lp[s] = log p_m(x_{s+1} | x_<=s),
the target log-prob at position s):

    e_m[t, h] = sum_{s <= t} gamma_h^(t-s) log p_m(x_s | x_<s)  = sum_{j < t} gamma_h^(t-1-j) lp_m[j]

(x_0 contributes 0, so e[0] = 0: the target log-probs shifted right by one.)

    score[t, m, h] = beta_h * e_m[t, h] + (lagged correlation of the states, zero key at init)

With beta = 1, gamma = 1 and a zero key projection, softmax_m score is the
running Bayes posterior over members with a uniform prior, in every head.

gamma_h = exp(-lambda_h), lambda_h = max(r_h, 0) in the forward pass with a
straight-through gradient (d lambda / d r = 1 everywhere), r_h = 0 at init: gamma
is exactly 1 at init, always in (0, 1], and r keeps a gradient on both sides of 0
(a plain clamp would freeze r once it went below 0).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.prepare import builtin_data_dir  # noqa: E402
from jobs.spec import resolve_manifest_path  # noqa: E402
from leviathan.config import EnsembleConfig  # noqa: E402
from leviathan.data import MixedBatchSampler, eval_batches, load_manifest  # noqa: E402
from leviathan.ensemble import CorrelationMerger, LeviathanEnsemble  # noqa: E402
from leviathan.evaluation import mix_members  # noqa: E402
from leviathan.model import configure_adamw  # noqa: E402

SEQ_LEN, PREFIX, EVAL_BATCH, EVAL_BATCHES, SWITCH_PER_PAIR = 128, 32, 8, 4, 8


# ---------------------------------------------------------------- evidence and the merger


def decay_matrix(log_gamma: Tensor, T: int) -> Tensor:
    """G[h, t, j] = gamma_h^(t-1-j) for j < t, else 0: (H, T, T). Exact 1s when gamma = 1."""
    t = torch.arange(T, device=log_gamma.device)
    lag = (t[:, None] - 1 - t[None, :]).clamp(min=0).to(log_gamma.dtype)  # (T, T)
    mask = (t[None, :] < t[:, None]).to(log_gamma.dtype)  # strictly causal: e[t] uses lp[0..t-1]
    return torch.exp(log_gamma[:, None, None] * lag) * mask  # (H, T, T)


def evidence(target_lp: Tensor, log_gamma: Tensor) -> Tensor:
    """e (B, T, M, H) from the members' target log-probs (B, T, M) and log gamma (H,)."""
    G = decay_matrix(log_gamma, target_lp.size(1))
    return torch.einsum("htj,bjm->btmh", G, target_lp)


class EvidenceMerger(CorrelationMerger):
    """CorrelationMerger whose scores add beta_h * e_m[t, h]; key zero-initialised."""

    def __init__(self, config: EnsembleConfig) -> None:
        super().__init__(config)
        H = config.merge_heads
        nn.init.zeros_(self.key.weight)  # state term exactly 0 at init
        self.beta = nn.Parameter(torch.ones(H))
        self.gamma_raw = nn.Parameter(torch.zeros(H))  # lambda = max(r, 0), straight-through

    def log_gamma(self) -> Tensor:
        r = self.gamma_raw
        lam = r + (r.clamp(min=0) - r).detach()  # forward max(r, 0), gradient 1
        return -lam  # (H,), gamma = exp(-lambda) in (0, 1]

    def gamma(self) -> Tensor:
        return self.log_gamma().exp()

    def evidence_scores(self, states: Tensor, target_lp: Tensor) -> Tensor:
        """score (B, T, M, H) = beta_h * e + state term."""
        e = evidence(target_lp.float(), self.log_gamma())  # (B, T, M, H)
        return self.beta * e + self.scores(states).float()


def merged_target_lp(merger: CorrelationMerger, states: Tensor, target_lp: Tensor, y: Tensor,
                     mode: str, use_evidence: bool) -> tuple[Tensor, Tensor]:
    """(log p_merged(y_t) (B, T), member weights pi (B, T, M)) for one batch.

    mixture: log sum_m pi[t, m] p_m(y_t), needs only the target log-probs (B, T, M).
    fusion:  the merger's own head over the weighted states.
    """
    if use_evidence:
        score = merger.evidence_scores(states, target_lp)
    else:
        score = merger.scores(states).float()
    log_w = F.log_softmax(score, dim=2)  # (B, T, M, H)
    log_pi = torch.logsumexp(log_w, dim=-1) - math.log(log_w.size(-1))  # (B, T, M)
    if mode == "mixture":
        lp = torch.logsumexp(log_pi + target_lp, dim=-1)
    else:
        out = merger(states, weights=log_w.exp())
        lp = F.log_softmax(out.logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return lp, log_pi.exp()


def running_posterior_lp(target_lp: Tensor) -> tuple[Tensor, Tensor]:
    """Causal per-token Bayes posterior, uniform prior: (log p (B, T), weights (B, T, M))."""
    prev = F.pad(target_lp, (0, 0, 1, 0))[:, :-1].cumsum(dim=1)  # (B, T, M): sum_{j<t} lp[j]
    log_w = F.log_softmax(prev, dim=-1)
    return torch.logsumexp(log_w + target_lp, dim=-1), log_w.exp()


def naive_running_posterior(target_lp: Tensor) -> Tensor:
    """The same by an explicit loop over windows, positions and members (the pin)."""
    B, T, M = target_lp.shape
    out = torch.empty(B, T, dtype=torch.float64)
    lp = target_lp.double()
    for b in range(B):
        seen = [0.0] * M
        for t in range(T):
            z = max(seen)
            norm = sum(math.exp(s - z) for s in seen)
            p = sum(math.exp(seen[m] - z) / norm * math.exp(float(lp[b, t, m])) for m in range(M))
            out[b, t] = math.log(p)
            for m in range(M):
                seen[m] += float(lp[b, t, m])
    return out


# ---------------------------------------------------------------- members


@dataclass
class Batch:
    x: Tensor
    y: Tensor
    hidden: list[Tensor]  # per member (B, T, d_m), frozen members only
    target_lp: Tensor  # (B, T, M)


def member_outputs(ens: LeviathanEnsemble, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
    hidden, lps = [], []
    for member in ens.members:
        h = member.hidden(x)
        lp = F.log_softmax(member.logits_from_hidden(h).float(), dim=-1)
        hidden.append(h)
        lps.append(lp.gather(-1, y.unsqueeze(-1)).squeeze(-1))
    return hidden, torch.stack(lps, dim=-1)


def states_of(ens: LeviathanEnsemble, hidden: list[Tensor]) -> Tensor:
    return torch.stack([p(h) for p, h in zip(ens.projections, hidden)], dim=2)  # (B, T, M, D)


# ---------------------------------------------------------------- data


def switch_windows(shards: list, n_per_pair: int, T: int, rng: np.random.Generator,
                   split_at: int | None = None) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Every ordered pair (a, b), a != b: windows whose first tokens come from a, the rest from b."""
    xs, pairs = [], []
    for a in range(len(shards)):
        for b in range(len(shards)):
            if a == b:
                continue
            for _ in range(n_per_pair):
                cut = split_at if split_at is not None else int(rng.integers(T // 4, 3 * T // 4))
                sa = int(rng.integers(0, len(shards[a]) - cut))
                sb = int(rng.integers(0, len(shards[b]) - (T + 1 - cut)))
                w = np.concatenate([shards[a].tokens[sa : sa + cut], shards[b].tokens[sb : sb + T + 1 - cut]])
                xs.append(w.astype(np.int64))
                pairs.append((a, b))
    w = torch.from_numpy(np.stack(xs))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous(), pairs


class TrainBatches:
    """Mixed train batches; a fraction of rows replaced by domain-switch windows (train split only)."""

    def __init__(self, shards: list, B: int, T: int, seed: int, switch_frac: float) -> None:
        self.mixed = MixedBatchSampler(shards, B, T, seed=seed)
        self.shards, self.B, self.T = shards, B, T
        self.rng = np.random.Generator(np.random.PCG64(seed + 1))
        self.n_switch = int(round(switch_frac * B))

    def next(self) -> tuple[Tensor, Tensor]:
        x, y = self.mixed.next()
        if self.n_switch:
            D = len(self.shards)
            sx, sy, _ = switch_windows(self.shards, 1, self.T, self.rng)
            pick = self.rng.choice(D * (D - 1), self.n_switch, replace=False)
            x[: self.n_switch], y[: self.n_switch] = sx[pick], sy[pick]
        return x, y


# ---------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    name: str
    mode: str = "mixture"
    evidence: bool = True
    steps: int = 150
    lr: float = 3e-3
    switch_frac: float = 0.0
    train_beta: bool = True
    train_gamma: bool = True
    joint: bool = False
    gamma_lr_scale: float = 1.0  # lr multiplier for beta and gamma_raw


RECIPES = {r.name: r for r in [
    Recipe("mix-ev"),
    Recipe("mix-ev-sw25", switch_frac=0.25),
    Recipe("mix-ev-sw50", switch_frac=0.5),
    Recipe("mix-ev-sw25-lr1e-2", lr=1e-2, switch_frac=0.25),
    Recipe("mix-ev-sw25-bg10", switch_frac=0.25, gamma_lr_scale=10.0),
    Recipe("mix-ev-frozen-bg", train_beta=False, train_gamma=False),
    Recipe("mix-noev", evidence=False),
    Recipe("fus-ev", mode="fusion"),
    Recipe("fus-noev", mode="fusion", evidence=False),
    Recipe("mix-ev-sw25-bg10-joint", switch_frac=0.25, gamma_lr_scale=10.0, joint=True),
]}


def lr_factor(step: int, total: int, warmup: int = 20, min_ratio: float = 0.1) -> float:
    warmup = min(warmup, total // 2)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fresh_ensemble(base: LeviathanEnsemble, mode: str, seed: int) -> LeviathanEnsemble:
    """The trained members with fresh projections and a fresh evidence merger."""
    torch.manual_seed(seed)
    cfg = replace(base.config, merge=mode)
    ens = LeviathanEnsemble(cfg)
    ens.members.load_state_dict(base.members.state_dict())
    ens.merger = EvidenceMerger(cfg)
    return ens


_STREAMS: dict[tuple, list] = {}


@torch.no_grad()
def frozen_stream(base: LeviathanEnsemble, shards: list, steps: int, switch_frac: float, seed: int) -> list:
    """The phase-2 batches with the frozen members' outputs, computed once and shared by recipes."""
    key = (steps, switch_frac, seed)
    if key not in _STREAMS:
        batches = TrainBatches(shards, 16, SEQ_LEN, seed=seed, switch_frac=switch_frac)
        stream = []
        for _ in range(steps):
            x, y = batches.next()
            hidden, lp = member_outputs(base, x, y)
            stream.append((x, y, hidden, lp))
        _STREAMS[key] = stream
    return _STREAMS[key]


def train(base: LeviathanEnsemble, shards: list, r: Recipe, seed: int = 0) -> tuple[LeviathanEnsemble, dict]:
    ens = fresh_ensemble(base, r.mode, seed)
    merger: EvidenceMerger = ens.merger  # type: ignore[assignment]
    merger.beta.requires_grad_(r.train_beta)
    merger.gamma_raw.requires_grad_(r.train_gamma)
    ev_params = [p for p in (merger.beta, merger.gamma_raw) if p.requires_grad]
    other = nn.ModuleList([ens.merger, ens.projections])
    opt = configure_adamw(other, r.lr, 0.1)
    opt.param_groups[1]["params"] = [p for p in opt.param_groups[1]["params"] if all(p is not q for q in ev_params)]
    if ev_params:
        opt.add_param_group({"params": ev_params, "weight_decay": 0.0, "lr": r.lr * r.gamma_lr_scale})
    member_opt = configure_adamw(ens.members, r.lr * 0.1, 0.1) if r.joint else None
    for g in opt.param_groups + (member_opt.param_groups if member_opt else []):
        g["base_lr"] = g["lr"]
    stream = frozen_stream(base, shards, r.steps, r.switch_frac, seed)
    ens.train()
    ens.members.train(r.joint)
    losses, t0 = [], time.process_time()
    for step, (x, y, hidden, target_lp) in enumerate(stream):
        f = lr_factor(step, r.steps)
        for o in [opt] + ([member_opt] if member_opt else []):
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * f
        if r.joint:  # the same batches, the members run with gradients
            hidden, target_lp = member_outputs(ens, x, y)
        lp, _ = merged_target_lp(merger, states_of(ens, hidden), target_lp, y, r.mode, r.evidence)
        loss = -lp.mean()
        opt.zero_grad(set_to_none=True)
        if member_opt:
            member_opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"]] + (list(ens.members.parameters()) if r.joint else [])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if member_opt:
            member_opt.step()
        losses.append(float(loss.detach()))
    ens.eval()
    info = {
        "train_loss_last20": float(np.mean(losses[-20:])),
        "cpu_s_per_step": (time.process_time() - t0) / r.steps,
        "beta": [round(v, 4) for v in merger.beta.tolist()],
        "gamma": [round(v, 5) for v in merger.gamma().tolist()],
    }
    return ens, info


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalSet:
    name: str
    x: Tensor
    y: Tensor
    domain_of_row: list  # per window: a domain index or an (a, b) pair


def eval_sets(manifest, domains: list[str]) -> list[EvalSet]:
    sets, per_domain = [], []
    for i, d in enumerate(domains):
        bs = eval_batches(manifest.shard(d, "val"), EVAL_BATCH, SEQ_LEN, EVAL_BATCHES)
        x = torch.cat([torch.as_tensor(b[0], dtype=torch.long) for b in bs])
        y = torch.cat([torch.as_tensor(b[1], dtype=torch.long) for b in bs])
        per_domain.append((x, y))
        sets.append(EvalSet(d, x, y, [i] * len(x)))
    k = min(len(x) for x, _ in per_domain)
    sets.append(EvalSet("mixed", torch.cat([x[:k] for x, _ in per_domain]), torch.cat([y[:k] for _, y in per_domain]),
                        [i for i in range(len(domains)) for _ in range(k)]))
    rng = np.random.Generator(np.random.PCG64(1234))
    shards = [manifest.shard(d, "val") for d in domains]
    sx, sy, pairs = switch_windows(shards, SWITCH_PER_PAIR, SEQ_LEN, rng, split_at=SEQ_LEN // 2)
    sets.append(EvalSet("switch", sx, sy, pairs))
    return sets


@torch.no_grad()
def member_cache(ens: LeviathanEnsemble, s: EvalSet) -> tuple[list[Tensor], Tensor]:
    hs, lps = [], []
    for i in range(0, len(s.x), 16):
        h, lp = member_outputs(ens, s.x[i : i + 16], s.y[i : i + 16])
        hs.append(h)
        lps.append(lp)
    return [torch.cat([h[m] for h in hs]) for m in range(len(hs[0]))], torch.cat(lps)


def nll(lp: Tensor) -> float:
    """Mean -log p over the scored positions PREFIX..T-1."""
    return float(-lp[:, PREFIX:].double().mean())


@torch.no_grad()
def baseline_rows(ens: LeviathanEnsemble, sets: list[EvalSet], caches: dict) -> dict:
    rows: dict[str, dict[str, float]] = {}
    for s in sets:
        _, lp = caches[s.name]
        uniform, prefix_post, _ = mix_members(lp, PREFIX)
        running, _ = running_posterior_lp(lp)
        for m, name in enumerate(ens.member_names):
            rows.setdefault(name, {})[s.name] = nll(lp[..., m])
        rows.setdefault("uniform", {})[s.name] = nll(uniform)
        rows.setdefault("prefix posterior (BTM)", {})[s.name] = nll(prefix_post)
        rows.setdefault("running posterior", {})[s.name] = nll(running)
    return rows


@torch.no_grad()
def merged_row(ens: LeviathanEnsemble, r: Recipe, sets: list[EvalSet], caches: dict, domains: list[str]) -> tuple[dict, dict]:
    row, weights = {}, {}
    for s in sets:
        hidden, lp = caches[s.name] if not r.joint else member_cache(ens, s)
        out_lp, pi = merged_target_lp(ens.merger, states_of(ens, hidden), lp, s.y, r.mode, r.evidence)
        row[s.name] = nll(out_lp)
        if s.name in domains:
            weights[s.name] = [round(float(v), 3) for v in pi.mean(dim=(0, 1))]
    return row, weights


def today_fusion_row(final: LeviathanEnsemble, sets: list[EvalSet], caches: dict) -> dict:
    row = {}
    with torch.no_grad():
        for s in sets:
            hidden, _ = caches[s.name]
            states = torch.stack([p(h) for p, h in zip(final.projections, hidden)], dim=2)
            out = final.merger(states) if final.config.merge == "fusion" else None
            if out is None:
                return {}
            lp = F.log_softmax(out.logits.float(), -1).gather(-1, s.y.unsqueeze(-1)).squeeze(-1)
            row[s.name] = nll(lp)
    return row


def check_fresh_equals_running_posterior(base: LeviathanEnsemble, s: EvalSet, caches: dict) -> float:
    """A fresh mixture merger's target log-probs against the naive posterior loop: max |diff|."""
    ens = fresh_ensemble(base, "mixture", seed=7)
    hidden, lp = caches[s.name]
    hidden, lp, y = [h[:4] for h in hidden], lp[:4], s.y[:4]
    with torch.no_grad():
        out, _ = merged_target_lp(ens.merger, states_of(ens, hidden), lp, y, "mixture", True)
    return float((out.double() - naive_running_posterior(lp)).abs().max())


def train_members(spec_path: str, run_dir: Path, steps: int, seed: int = 0) -> None:
    """Phase 1 in one process: member i trains alone on its module's domain; writes run_dir/final."""
    from jobs.plan import ensemble_config
    from jobs.spec import load_spec
    from leviathan.data import BatchSampler

    spec = load_spec(spec_path)
    manifest = load_manifest(resolve_manifest_path(spec.data.manifest))
    domains = spec.data.domains or manifest.domains[: spec.ensemble.modules]
    torch.manual_seed(seed)
    ens = LeviathanEnsemble(ensemble_config(spec, manifest.vocab_size))
    t = spec.training
    for i, member in enumerate(ens.members):
        shard = manifest.shard(domains[ens.config.module_of(i)], "train")
        sampler = BatchSampler(shard, t.batch_size, t.seq_len, seed=seed + i)
        opt = configure_adamw(member, t.lr, t.weight_decay)
        member.train()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = t.lr * lr_factor(step, steps, t.warmup_steps, t.min_lr_ratio)
            x, y = sampler.next()
            _, loss = member(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(member.parameters(), t.grad_clip)
            opt.step()
        print(json.dumps({"member": ens.member_names[i], "train_loss": float(loss.detach())}), flush=True)
    ens.eval()
    ens.save(run_dir / "final")
    (run_dir / "spec.json").write_text(json.dumps(json.loads(spec.model_dump_json())) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True, help="a run folder with final/")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--train-members", default=None, metavar="SPEC",
                   help="first train the spec's members in this process (phase 1) into --run")
    p.add_argument("--member-steps", type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.train_members:
        train_members(a.train_members, Path(a.run), a.member_steps, a.seed)
    final = LeviathanEnsemble.load(Path(a.run) / "final")
    spec = json.loads((Path(a.run) / "spec.json").read_text())
    m = spec["data"]["manifest"]
    manifest = load_manifest(builtin_data_dir(spec["data"]["tokenizer"]) if m == "builtin" else resolve_manifest_path(m))
    domains = spec["data"].get("domains") or manifest.domains[: final.config.modules]
    final.eval()
    sets = eval_sets(manifest, domains)
    caches = {s.name: member_cache(final, s) for s in sets}
    result = {
        "run": a.run,
        "settings": {"seq_len": SEQ_LEN, "prefix_scored_from": PREFIX, "windows": {s.name: len(s.x) for s in sets},
                     "switch": f"{SWITCH_PER_PAIR} windows per ordered pair, half/half, seed 1234"},
        "pin_fresh_mixture_vs_naive_running_posterior_max_abs": check_fresh_equals_running_posterior(final, sets[0], caches),
        "rows": {"today's merger (" + final.config.merge + ", trained by the run)": today_fusion_row(final, sets, caches),
                 **baseline_rows(final, sets, caches)},
        "merger_weights": {},
        "recipes": {},
    }
    print(json.dumps({"pin": result["pin_fresh_mixture_vs_naive_running_posterior_max_abs"]}), flush=True)
    train_shards = [manifest.shard(d, "train") for d in domains]
    for name in a.recipes.split(","):
        r = RECIPES[name]
        ens, info = train(final, train_shards, r, a.seed)
        row, weights = merged_row(ens, r, sets, caches, domains)
        result["rows"][f"merged: {name}"] = row
        result["merger_weights"][name] = weights
        result["recipes"][name] = {**r.__dict__, **info}
        print(json.dumps({"recipe": name, "mixed": row["mixed"], "switch": row["switch"], **info}), flush=True)
    result["merger_weights"]["running posterior"] = {}
    for s in sets[: len(domains)]:
        _, w = running_posterior_lp(caches[s.name][1])
        result["merger_weights"]["running posterior"][s.name] = [round(float(v), 3) for v in w.mean(dim=(0, 1))]
    text = json.dumps(result, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
