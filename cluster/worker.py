"""`train_loop_per_worker`: what every Ray Train worker of a Leviathan job runs.

A job has two phases (DESIGN section 5):

- Phase 1, members (`phase1_steps` steps): each rank trains the members of the
  modules it hosts (cluster.placement), each module on batches of its own
  domain's train shard. Ranks do not communicate while training.
- Phase 2, merge (`phase2_steps` steps): every rank runs its members on the same
  mixed-domain batch and the merger learns from the gathered states
  (cluster.merge); with `joint = true` the members learn too.

At every `eval_interval` and `checkpoint_interval` (and the last step of a
phase) the ranks score every row of the evaluation table together
(cluster.evaluation: the report's windows, dev prefix and scoring function, so
`val_loss` and `mixed_val_loss` are the report's loss per scored token on the
member's own domain and on the mixed set), rank 0 gathers the records of
everyone's members with `all_gather_object`, appends them to
`<run>/metrics.jsonl` and logs them, and all ranks call `ray.train.report`
(a barrier; only rank 0's metrics are kept). At every `checkpoint_interval`
(and at the end of each phase) the report carries a checkpoint to which
every rank wrote its part (cluster.checkpointing). A restarted worker
group resumes from `ray.train.get_checkpoint()` and runs exactly the steps
that are left; lines for steps that run a second time say `"replayed": true`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from cluster import checkpointing
from cluster.evaluation import EvalResult, evaluate, gather_objects, mean, tune, tuning_set
from cluster.members import Member, Module, adamw, build_member, build_merger, derived_seed, merger_adamw
from cluster.merge import CommTimer, Exchange, local_parameters, merged_loss, reduce_and_clip
from cluster.metrics import Gauges, MetricsLog, format_line, format_progress
from leviathan.run.progress import RunProgress
from leviathan.run.records import record
from cluster.placement import modules_for_rank
from cluster.plan import RunPlan
from cluster.preflight import check_collectives
from cluster.schedule import lr_at, set_lr
from cluster.tracking import Tracker
from cluster.verbosity import quiet_report_lines
from cluster.data import SharedMixedSampler, rank_shards, validation_sets
from leviathan.data.shards import BatchSampler, MixedBatchSampler
from leviathan.data.staging import load_manifest
from leviathan.evaluation import default_prefix_tokens, evidence_settings
from leviathan.run.names import MERGED, UNIFORM
from leviathan.run.report import final_table

# Ray Train configures the workers' root logger (INFO, to the job's logs); a
# print() there is teed to stdout and the logger, so each line would show twice.
logger = logging.getLogger(__name__)
FINAL_TABLE_FILE = "final_table.json"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. config: {"plan": the job's RunPlan,
    "metrics_dir": folder of metrics.jsonl, "profile": time phase-2 steps (benchmarks),
    "verbose": show Ray Train's per-report lines}."""
    quiet_report_lines(bool(config.get("verbose", False)))
    EnsembleWorker(config["plan"], config["metrics_dir"], bool(config.get("profile", False))).run()


def train_module_step(
    module: Module,
    lr_factor: float,
    device: torch.device = torch.device("cpu"),
    autocast=contextlib.nullcontext,
    grad_clip: float = 0.0,
) -> dict[str, float]:
    """One phase-1 step of a module: the next batch of its domain, one optimiser
    step of each member on it. Returns each member's training loss."""
    x, y = module.sampler.next()  # (B, T) each
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    losses = {}
    for m in module.members:
        set_lr(m.optimizer, lr_factor)
        with autocast():
            _, loss = m.model(x, y)
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(m.model.parameters(), grad_clip)
        m.optimizer.step()
        losses[m.name] = loss.item()
    return losses


class EnsembleWorker:
    """One rank's share of the job: its modules, a merger replica, its samplers."""

    def __init__(self, plan: RunPlan, metrics_dir: str, profile: bool = False):
        self.plan = plan
        self.t = plan.training
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        if self.world_size != plan.resources.num_workers:  # the plan says which rank reads which domain
            raise ValueError(f"{self.world_size} workers run a plan for {plan.resources.num_workers}")
        if plan.resources.use_gpu:
            self.device = ray.train.torch.get_device()
            # TF32 tensor cores for the fp32 matmuls autocast leaves (norms' neighbours, the merger).
            torch.set_float32_matmul_precision("high")
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(plan.resources.cpus_per_worker)))
        use_bf16 = self.device.type == "cuda" and self.t.dtype == "bfloat16"
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        )
        manifest = load_manifest(plan.manifest)
        self.domains: list[str] = list(plan.domains)
        self.bytes_per_token = {d: manifest.bytes_per_token(d, "val") for d in self.domains}
        self.config = plan.ensemble
        k = self.config.members_per_module
        self.exchange = Exchange.for_placement(self.rank, self.world_size, self.config.modules, k)
        names = self.config.member_names
        B, T = self.t.batch_size, self.t.seq_len

        self.modules: list[Module] = []
        for i in modules_for_rank(self.rank, self.world_size, self.config.modules):
            members = []
            for j in range(i * k, (i + 1) * k):
                model, projection = build_member(self.config, j, plan.seed)
                model, projection = model.to(self.device), projection.to(self.device)
                members.append(Member(j, names[j], model, projection, adamw(model, self.t.lr, self.t.weight_decay)))
            shard = manifest.shard(self.domains[i], "train")  # one of plan.domains_of_rank(rank)
            sampler = BatchSampler(shard, B, T, seed=derived_seed(plan.seed, "data", i))
            self.modules.append(Module(i, self.domains[i], members, sampler))
        self.members = [m for mod in self.modules for m in mod.members]

        # The merger and the mixed sampler are replicated: same seed, same draws on every rank;
        # each domain's rows are read by the rank that owns it and merged (cluster.data).
        self.merger = build_merger(self.config, plan.seed).to(self.device)
        self.merger_optimizer = None
        # Domain-switch rows need two domains; a one-module job has none.
        switch_fraction = self.t.switch_fraction if len(self.domains) > 1 else 0.0
        self.mixed_sampler = SharedMixedSampler(
            MixedBatchSampler(
                rank_shards(manifest, plan, self.rank, "train"),
                B, T, seed=derived_seed(plan.seed, "mixed"), switch_fraction=switch_fraction,
            ),
            self.world_size, self.device,
        )
        # The same windows and dev prefix `jobs.evaluate` scores by default; drawn in `run`, after the
        # collective check, since merging the ranks' rows is itself a collective.
        self.manifest = manifest
        self.val_sets = self.switch_set = None
        self.prefix_tokens = default_prefix_tokens(T)
        self.metrics = MetricsLog(metrics_dir) if self.rank == 0 else None
        self.logged = self.metrics.logged_steps() if self.metrics else {}
        self.gauges = Gauges(plan.name)
        self.progress = RunProgress()
        self.tracker = (
            Tracker(plan.tracking, metrics_dir, self.t.phase1_steps, self.t.phase2_steps)
            if self.rank == 0 and plan.tracking.enabled else None
        )
        self.losses: dict[str, list[float]] = {}
        self.interval_start = time.perf_counter()
        self.interval_cpu_start = time.process_time()
        self.interval_steps = 0
        self.report: dict[str, Any] | None = None  # rank 0, after the last eval: the report dict
        self.final_table: dict[str, Any] | None = None  # rank 0, after the last eval: its final-table view, report embedded
        # Benchmarks: time phase-2 steps and the collectives inside them, count the bytes sent.
        self.profile = profile
        self.step_times: list[float] = []
        self.comm_times: list[float] = []
        self.step_bytes: list[int] = []

    # ------------------------------------------------------------------ driver of the phases

    def run(self) -> None:
        self.check_collectives()
        self.val_sets, self.switch_set = validation_sets(self.manifest, self.plan, self.rank, self.world_size, self.device)
        checkpoint = self.intact_checkpoint()
        phase, step = "members", 0
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                phase, step = self.restore(Path(d))
            self.log(f"resumed from the checkpoint of phase {phase}, step {step}")
        if phase == "members":
            self.train_members(start=step)
            self.train_merger(start=0)
        elif step < self.t.phase2_steps:
            self.train_merger(start=step)
        # else: the checkpoint is the finished job's last one; nothing is left to run.
        if self.tracker is not None:
            self.tracker.finish()

    def intact_checkpoint(self) -> ray.train.Checkpoint | None:
        """Ray's latest checkpoint if it is intact, else the newest intact one before it.

        Rank 0 verifies (cluster.checkpointing.newest_intact) and says in one line
        per skipped checkpoint what was wrong; every rank then restores the same one.
        """
        latest = ray.train.get_checkpoint()
        if latest is None:
            return None
        path: str | None = None
        if self.rank == 0:
            chosen, skipped = checkpointing.newest_intact(latest)
            for line in skipped:
                self.log(line)
            if chosen is None:
                self.log("no intact checkpoint: the run starts again from step 0")
            elif skipped:
                self.log(f"restoring the previous checkpoint {chosen.path}: the steps after it are replayed")
            path = None if chosen is None else chosen.path
        path = gather_objects(path, self.world_size)[0]  # rank 0's choice, on every rank
        return None if path is None else ray.train.Checkpoint(path=path, filesystem=latest.filesystem)

    def check_collectives(self) -> dict[str, float]:
        """Push a tiny batch through every collective of phase 2 and validation now
        (cluster.preflight), so a broken one fails the job in its first minute.
        Returns each check step's seconds."""
        seconds = check_collectives(
            self.members, self.config.member_names, self.merger, self.exchange, self.device, self.autocast,
            joint=self.t.joint, vocab_size=self.config.vocab_size,
        )
        self.log("collectives checked: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))
        return seconds

    def train_members(self, start: int) -> None:
        """Phase 1: steps start+1 .. phase1_steps of every hosted member, no communication."""
        total = self.t.phase1_steps
        for m in self.members:
            m.model.train()
        self.reset_interval()
        for step in range(start + 1, total + 1):
            factor = lr_at(step - 1, total_steps=total, warmup_steps=self.t.warmup_steps, min_lr_ratio=self.t.min_lr_ratio)
            for module in self.modules:
                losses = train_module_step(module, factor, self.device, self.autocast, self.t.grad_clip)
                for name, loss in losses.items():
                    self.losses.setdefault(name, []).append(loss)
            self.interval_steps += 1
            self.after_step("members", step, total, lr=self.t.lr * factor)

    def setup_phase2(self) -> None:
        """Phase-2 optimisers: the merger (replicated), each projection, and each member with joint."""
        wd = self.t.weight_decay
        self.merger_optimizer = merger_adamw(self.merger, self.t.merge_lr, wd, self.t.evidence_lr_scale)
        for m in self.members:
            m.optimizer = None  # phase 1 is over: drop its optimiser state
            m.model.zero_grad(set_to_none=True)  # and its last gradients (4 bytes per member parameter)
            m.projection_optimizer = adamw(m.projection, self.t.merge_lr, wd)
            if self.t.joint:
                m.joint_optimizer = adamw(m.model, self.t.lr * self.t.joint_lr_scale, wd)

    def train_merger(self, start: int) -> None:
        """Phase 2: steps start+1 .. phase2_steps on shared mixed batches."""
        total = self.t.phase2_steps
        if self.merger_optimizer is None:
            self.setup_phase2()
        joint = self.t.joint
        for m in self.members:
            m.model.train(joint)
        self.merger.train()
        optimizers = [self.merger_optimizer] + [
            o for m in self.members for o in (m.projection_optimizer, m.joint_optimizer) if o is not None
        ]
        local = local_parameters(self.members, joint=joint)
        if total == 0 and start == 0:
            # No merger training: still evaluate the ensemble and leave a final checkpoint.
            self.after_step("merge", 0, 0, lr=None)
            return
        self.reset_interval()
        for step in range(start + 1, total + 1):
            factor = lr_at(step - 1, total_steps=total, warmup_steps=self.t.warmup_steps, min_lr_ratio=self.t.min_lr_ratio)
            for opt in optimizers:
                set_lr(opt, factor)
                opt.zero_grad(set_to_none=True)
            timer = CommTimer(self.device) if self.profile else None
            t0 = timer.sync() if timer else 0.0
            x, y = self.mixed_sampler.next()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                loss_share = merged_loss(self.members, self.merger, x, y, self.exchange, joint=joint, timer=timer)
            loss_share.backward()
            loss, _ = reduce_and_clip(self.merger, local, loss_share, self.world_size, self.t.grad_clip, timer)
            for opt in optimizers:
                opt.step()
            if timer:
                self.step_times.append(timer.sync() - t0)
                self.comm_times.append(timer.total)
                self.step_bytes.append(sum(timer.bytes_received.values()))
            self.losses.setdefault(MERGED, []).append(loss)
            self.interval_steps += 1
            self.after_step("merge", step, total, lr=self.t.merge_lr * factor)

    # ------------------------------------------------------------------ eval, metrics, checkpoints

    def reset_interval(self) -> None:
        self.losses = {}
        self.interval_steps = 0
        self.interval_start = time.perf_counter()
        self.interval_cpu_start = time.process_time()

    def after_step(self, phase: str, step: int, total: int, lr: float | None) -> None:
        """Evaluate / checkpoint / report when this step calls for it (same decision on every rank)."""
        last = step == total
        do_ckpt = last or step % self.t.checkpoint_interval == 0
        if not (do_ckpt or step % self.t.eval_interval == 0):
            return
        # Every report carries a fresh evaluation (Ray Tune schedules on its figures),
        # so checkpoint steps are evaluated too.
        elapsed = time.perf_counter() - self.interval_start
        cpu = time.process_time() - self.interval_cpu_start
        metrics: dict[str, Any] = {"phase": phase, "step": step}
        metrics.update(self.evaluate_and_log(phase, step, lr, elapsed, cpu, final=last and phase == "merge"))
        if self.profile and last and phase == "merge" and self.step_times:
            metrics["profile"] = profile_summary(self.step_times, self.comm_times, self.step_bytes)
        if do_ckpt:
            self.report_checkpoint(phase, step, metrics)
        else:
            ray.train.report(metrics)
        self.reset_interval()

    def evaluate_and_log(
        self, phase: str, step: int, lr: float | None, elapsed: float, cpu: float, final: bool
    ) -> dict[str, Any]:
        # Without phase 2 the merger never trained: no merged row, so no verdict on it.
        merger = self.merger if phase == "merge" and self.t.phase2_steps > 0 else None
        # The closing table's tracking baselines are tuned on train-split windows, once the members are final.
        baselines = None
        if final:
            windows = tuning_set(self.manifest, self.plan, self.rank, self.world_size, self.device)
            baselines = tune(self.members, windows, self.prefix_tokens, self.exchange, self.device, self.autocast)
        result = evaluate(
            self.members, self.config.member_names, merger, self.val_sets, self.prefix_tokens,
            self.exchange, self.device, self.autocast, self.switch_set, baselines,
        )
        tokens = self.interval_steps * self.t.batch_size * self.t.seq_len
        tps = tokens / elapsed if elapsed > 0 and self.interval_steps else None
        replayed = step <= self.logged.get(phase, -1)
        mine = []
        if phase == "members" or self.t.joint or final:
            for module in self.modules:
                for m in module.members:
                    losses = result.by_domain(m.name)
                    train = self.losses.get(m.name)
                    mine.append(record(
                        step=step, phase=phase, module=module.index, member=m.name, domain=module.domain,
                        train_loss=mean(train) if train else None, val_loss=losses[module.domain],
                        mixed_val_loss=result.mixed(m.name), lr=lr if phase == "members" else None,
                        tokens_per_s=tps if phase == "members" else None, replayed=replayed,
                        val_by_domain=losses,
                    ))
        for r in mine:
            self.gauges.update(r)
            self.log(format_line(r))
        everyone = gather_objects((mine, cpu), self.world_size)
        # The interval's training CPU time of every worker, on each of the step's lines.
        cpu_s = sum(c for _, c in everyone) if self.interval_steps else None
        records = [dict(r, replayed=replayed, cpu_s=cpu_s) for part, _ in everyone for r in part]
        records.append(record(step=step, phase=phase, member=UNIFORM, mixed_val_loss=result.mixed(UNIFORM),
                              cpu_s=cpu_s, replayed=replayed, val_by_domain=result.by_domain(UNIFORM)))
        if merger is not None:
            train = self.losses.get(MERGED)
            records.append(record(
                step=step, phase=phase, member=MERGED, train_loss=mean(train) if train else None,
                mixed_val_loss=result.mixed(MERGED), lr=lr, tokens_per_s=tps, cpu_s=cpu_s,
                replayed=replayed, val_by_domain=result.by_domain(MERGED),
            ))
        summary = summarise(records)
        if self.rank != 0:
            return summary
        for r in records[len(records) - (2 if merger is not None else 1):]:
            self.gauges.update(r)
            self.log(format_line(r))
        lines = records
        if final:
            lines = records + [dict(r, phase="final", lr=None, tokens_per_s=None, cpu_s=None, train_loss=None)
                               for r in records]
            self.report = self.final_report(result, merger is not None)
            self.final_table = {**final_table(self.report), "report": self.report}
        lines = [{k: v for k, v in r.items() if k != "val_by_domain"} for r in lines]
        self.metrics.append(lines)
        self.track(lines, final)
        return summary

    def final_report(self, result: EvalResult, merged: bool) -> dict[str, Any]:
        """The closing evaluation as `leviathan.evaluation.evaluate_ensemble`'s report dict,
        plus the run's merge mode, joint flag and steps (what the final table shows)."""
        cfg = self.config
        return result.report(
            member_modules={n: cfg.module_of(i) for i, n in enumerate(cfg.member_names)},
            bytes_per_token=self.bytes_per_token,
            settings={
                "batch_size": self.t.batch_size, "max_batches": self.t.eval_batches, "merge": cfg.merge,
                "mixer": cfg.mixer, "residual": cfg.residual, "joint": self.t.joint,
                "steps": {"members": self.t.phase1_steps, "merge": self.t.phase2_steps},
            },
            evidence=evidence_settings(self.merger) if merged else None,
        )

    def track(self, lines: list[dict[str, Any]], final: bool) -> None:
        """Rank 0, once the lines are in metrics.jsonl: the progress line and the tracking runs
        (which skip replayed lines; cluster.tracking)."""
        for r in lines:
            self.progress.fold(r)
        self.log(format_progress(self.progress, self.t.phase1_steps, self.t.phase2_steps))
        if self.tracker is None:
            return
        self.tracker.log(lines, self.progress)
        if final and not lines[0]["replayed"]:
            self.tracker.log_text(FINAL_TABLE_FILE, json.dumps(self.final_table, indent=2) + "\n")

    def report_checkpoint(self, phase: str, step: int, metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="leviathan-ckpt-") as tmp:
            d = Path(tmp)
            for module in self.modules:
                checkpointing.save_module(d, module)
            checkpointing.save_rank(d, self.rank, self.device)
            if self.rank == 0 and self.final_table is not None:
                (d / FINAL_TABLE_FILE).write_text(json.dumps(self.final_table, indent=2) + "\n")
            if self.rank == 0:
                checkpointing.save_coordinator(
                    d, merger=self.merger, merger_optimizer=self.merger_optimizer,
                    mixed_sampler=self.mixed_sampler, config=self.config, phase=phase, step=step,
                    extra={"name": self.plan.name, "world_size": self.world_size, "domains": self.domains},
                )
            checkpointing.seal(d, self.rank)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_upload_fn=checkpointing.persist
            )

    def restore(self, d: Path) -> tuple[str, int]:
        state = checkpointing.read_state(d)
        phase, step = state["phase"], int(state["step"])
        if phase == "merge":
            self.setup_phase2()
        for module in self.modules:
            checkpointing.load_module(d, module)
        checkpointing.load_coordinator(d, self.merger, self.merger_optimizer, self.mixed_sampler)
        checkpointing.load_rank(d, self.rank, self.device)
        return phase, step

    def log(self, message: str) -> None:
        logger.info("[leviathan %s rank %d] %s", self.plan.name, self.rank, message)


def profile_summary(step_times: list[float], comm_times: list[float], step_bytes: list[int]) -> dict[str, float]:
    """Median phase-2 step time, time in collectives (the row exchange, its backward, the
    all_reduce) and bytes this rank received from the row exchange per step.

    The first steps are skipped as warmup when there are enough of them.
    Collective time includes waiting for the slowest rank.
    """
    import statistics

    skip = min(3, len(step_times) // 4)
    steps, comms = step_times[skip:], comm_times[skip:]
    shares = [c / s for c, s in zip(comms, steps) if s > 0]
    return {
        "phase2_steps_timed": len(steps),
        "phase2_step_s_median": statistics.median(steps),
        "phase2_comm_s_median": statistics.median(comms),
        "phase2_comm_share_median": statistics.median(shares) if shares else 0.0,
        "phase2_exchange_bytes_received_per_step": statistics.median(step_bytes) if step_bytes else 0,
    }


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Flat figures for `ray.train.report` (what Ray Tune sees): the current model's
    mixed val loss is the merger's in phase 2 and the uniform mixture's in phase 1."""
    by = {r["member"]: r for r in records}
    members = [r for r in records if r["module"] is not None]
    out: dict[str, Any] = {"uniform_mixed_val_loss": by[UNIFORM]["mixed_val_loss"]}
    if members:
        out["best_member_mixed_val_loss"] = min(r["mixed_val_loss"] for r in members)
        trains = [r["train_loss"] for r in members if r["train_loss"] is not None]
        if trains:
            out["member_train_loss"] = mean(trains)
    if MERGED in by:
        out["merged_mixed_val_loss"] = by[MERGED]["mixed_val_loss"]
        out["merged_train_loss"] = by[MERGED]["train_loss"]
    out["mixed_val_loss"] = out.get("merged_mixed_val_loss", out["uniform_mixed_val_loss"])
    return out
