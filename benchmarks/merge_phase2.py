"""Phase-2 variants on one set of trained members, in one process (no Ray).

Takes the members of a finished run (`<run>/final`) and trains a fresh merger
and fresh projections for each variant with the product's phase-2 pieces: the
mixed sampler (with its switch rows), `merger_adamw`, `cluster.merge.merged_loss`
and `reduce_and_clip` on a one-rank exchange (the exactness test pins that 2
workers compute the same step), the job's lr schedule. Then it scores every
row with the one evaluator (`evaluate_ensemble` on the dev windows; `--split val`
for the run's val windows), so the variants are compared on the same members,
batches and tokens:

- `fusion-states`: the merge before the evidence (fusion, state-only merger, no switch rows);
- `mixture-evidence`: the product's default (the spec's settings);
- `mixture-evidence-joint`: the same with `joint = true` (members learn through the merger).

    python benchmarks/merge_phase2.py --run RUN_DIR --spec jobs/specs/demo.toml [--variants a,b] [--out FILE]

Prints one JSON object: per variant the report's loss per column and row,
the merger's weights per domain, beta/gamma, and CPU seconds per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit_report  # noqa: E402
from cluster.members import Member, adamw, derived_seed, merger_adamw  # noqa: E402
from cluster.merge import Exchange, local_parameters, merged_loss, reduce_and_clip  # noqa: E402
from cluster.schedule import lr_at, set_lr  # noqa: E402
from jobs.plan import build_plan  # noqa: E402
from jobs.spec import JobSpec  # noqa: E402
from leviathan.data.shards import MixedBatchSampler  # noqa: E402
from leviathan.data.staging import load_manifest  # noqa: E402
from leviathan.model.ensemble import CorrelationMerger, LeviathanEnsemble  # noqa: E402
from leviathan.evaluation import evaluate_ensemble  # noqa: E402

VARIANTS = {
    "fusion-states": dict(merge="fusion", evidence=False, switch=False, joint=False),
    "mixture-evidence": dict(merge="mixture", evidence=True, switch=True, joint=False),
    "mixture-evidence-joint": dict(merge="mixture", evidence=True, switch=True, joint=True),
}


def train_variant(trained: LeviathanEnsemble, plan, variant: dict) -> tuple[LeviathanEnsemble, float]:
    """Fresh merger + projections on `trained`'s members, phase 2 as the workers run it."""
    t = plan.training
    config = replace(trained.config, merge=variant["merge"], evidence=variant["evidence"])
    torch.manual_seed(plan.seed)
    ens = LeviathanEnsemble(config)
    ens.members.load_state_dict(trained.members.state_dict())
    ens.merger = CorrelationMerger(config)
    members = [Member(i, n, ens.members[i], ens.projections[i]) for i, n in enumerate(config.member_names)]
    manifest = load_manifest(plan.manifest)
    sampler = MixedBatchSampler([manifest.shard(d, "train") for d in plan.domains], t.batch_size, t.seq_len,
                                seed=derived_seed(plan.seed, "mixed"),
                                switch_fraction=t.switch_fraction if variant["switch"] else 0.0)
    merger_opt = merger_adamw(ens.merger, t.merge_lr, t.weight_decay, t.evidence_lr_scale)
    optimizers = [merger_opt] + [adamw(m.projection, t.merge_lr, t.weight_decay) for m in members]
    if variant["joint"]:
        optimizers += [adamw(m.model, t.lr * t.joint_lr_scale, t.weight_decay) for m in members]
    exchange = Exchange(0, 1, (len(members),))
    local = local_parameters(members, joint=variant["joint"])
    ens.train()
    ens.members.train(variant["joint"])
    cpu0 = time.process_time()
    for step in range(t.phase2_steps):
        factor = lr_at(step, total_steps=t.phase2_steps, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio)
        for opt in optimizers:
            set_lr(opt, factor)
            opt.zero_grad(set_to_none=True)
        x, y = sampler.next()
        share = merged_loss(members, ens.merger, x, y, exchange, joint=variant["joint"])
        share.backward()
        reduce_and_clip(ens.merger, local, share, 1, t.grad_clip)
        for opt in optimizers:
            opt.step()
    return ens.eval(), (time.process_time() - cpu0) / max(1, t.phase2_steps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True, help="a finished run folder with final/")
    p.add_argument("--spec", required=True, help="the run's spec (training settings, data)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--split", choices=("dev", "val"), default="dev",
                   help="windows to score: dev (the train shards' held-out tail, for choosing a recipe; "
                        "default) or val (a run's reported figures)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    plan = build_plan(JobSpec.from_file(a.spec))
    trained = LeviathanEnsemble.load(Path(a.run) / "final")
    t = plan.training
    result = {"run": a.run, "spec": a.spec, "split": a.split, "variants": {}}
    for name in a.variants.split(","):
        ens, cpu_per_step = train_variant(trained, plan, VARIANTS[name])
        report = evaluate_ensemble(ens, load_manifest(plan.manifest), list(plan.domains), batch_size=t.batch_size,
                                   seq_len=t.seq_len, max_batches=t.eval_batches, split=a.split)
        result["variants"][name] = {
            "settings": VARIANTS[name],
            "cpu_s_per_step": cpu_per_step,
            "loss": {r["name"]: r["loss"] for r in report["rows"]},
            "merger_weights": report["merger_weights"],
            "running_posterior_weights": report["running_posterior_weights"],
            "evidence": report["evidence"],
        }
        print(json.dumps({"variant": name, "merged": report["rows"][0]["loss"], "cpu_s_per_step": cpu_per_step}),
              flush=True)
    emit_report(result, a.out, indent=1)


if __name__ == "__main__":
    main()
