"""Train and score a tiny component on one synthetic task, in-process (torch, no Ray).

    model   `LeviathanComponent`: n_layer blocks of width n_embd, heads of 16
            channels (width // 16), mixer attention or correlation with a window
    data    a fresh batch of `leviathan.data.synthetic` every step (train
            stream: a generator seeded with `seed`); the held-out set is one
            batch of `eval_rows` sequences from the generator seeded EVAL_SEED,
            a stream no training seed reaches, and the same for every run
    loss    cross-entropy on the answer positions only
    score   accuracy = share of held-out answer positions whose argmax is the answer

`cpu_s` is the process CPU time of the training steps (evaluation excluded),
so on a shared machine it counts the run's own work, not its waiting.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from leviathan.config import MIXERS, ComponentConfig, _check_choice, _check_int
from leviathan.data.synthetic import SyntheticBatch, TaskSettings, check_task, key_len, make_batch
from leviathan.model.component import LeviathanComponent, configure_adamw

EVAL_SEED = 2**40 + 7
"""Seed of the held-out stream; training seeds are small integers, so they never meet it."""

HEAD_DIM = 16


@dataclass(frozen=True)
class SyntheticRun:
    """One training run: task, model shape, optimiser schedule."""

    task: str
    mixer: str = "correlation"
    window: int = 4
    n_layer: int = 2
    n_embd: int = 64
    seed: int = 0
    lr: float = 3e-3
    steps: int = 600
    batch_size: int = 32
    eval_rows: int = 256
    weight_decay: float = 0.1
    settings: TaskSettings = field(default_factory=TaskSettings)

    def __post_init__(self) -> None:
        check_task(self.task)
        if self.task.startswith("mtk") and key_len(self.task) >= 2 and self.settings.pairs < 4:
            raise ValueError(f"pairs: {self.task} needs >= 4 pairs so that every key token is shared, got {self.settings.pairs}")
        _check_choice("mixer", self.mixer, MIXERS)
        for name in ("window", "n_layer", "n_embd", "steps", "batch_size", "eval_rows"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        if self.n_embd % HEAD_DIM:
            raise ValueError(f"n_embd: must be a multiple of {HEAD_DIM} (heads of {HEAD_DIM}), got {self.n_embd}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr <= 1):
            raise ValueError(f"lr: must be a number in (0, 1], got {self.lr!r}")

    def component_config(self) -> ComponentConfig:
        s = self.settings
        return ComponentConfig(
            vocab_size=s.vocab_of(self.task), block_size=s.seq_len_of(self.task), n_layer=self.n_layer,
            n_head=self.n_embd // HEAD_DIM, n_embd=self.n_embd, mixer=self.mixer,
            window=self.window if self.mixer == "correlation" else 1,
        )


def answer_loss(model: LeviathanComponent, batch: SyntheticBatch) -> torch.Tensor:
    logits, _ = model(batch.inputs)  # (B, T, V)
    return F.cross_entropy(logits[batch.mask], batch.targets[batch.mask])


@torch.no_grad()
def accuracy(model: LeviathanComponent, batch: SyntheticBatch, chunk: int = 128) -> float:
    """Share of the batch's answer positions predicted exactly (argmax)."""
    was_training = model.training
    model.eval()
    right = total = 0
    for i in range(0, batch.inputs.size(0), chunk):
        mask = batch.mask[i : i + chunk]
        logits, _ = model(batch.inputs[i : i + chunk])
        right += int((logits.argmax(-1)[mask] == batch.targets[i : i + chunk][mask]).sum())
        total += int(mask.sum())
    model.train(was_training)
    return right / total


def train_synthetic(run: SyntheticRun) -> dict:
    """Train `run` and return its result row: the run's settings, accuracy, params, cpu_s, cpu_ms_per_step."""
    torch.manual_seed(run.seed)
    model = LeviathanComponent(run.component_config())
    optimizer = configure_adamw(model, run.lr, run.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=run.lr, total_steps=run.steps, pct_start=0.1, anneal_strategy="cos"
    )
    train_gen = torch.Generator().manual_seed(run.seed)
    held_out = make_batch(run.task, run.eval_rows, run.settings, torch.Generator().manual_seed(EVAL_SEED))
    cpu = 0.0
    loss = torch.tensor(float("nan"))
    for _ in range(run.steps):
        batch = make_batch(run.task, run.batch_size, run.settings, train_gen)
        start = time.process_time()
        loss = answer_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        cpu += time.process_time() - start
    row = {k: v for k, v in asdict(run).items() if k != "settings"}
    row["settings"] = asdict(run.settings)
    if run.mixer == "attention":
        row["window"] = 1
    row.update(
        accuracy=accuracy(model, held_out),
        train_loss=float(loss.detach()),
        params=model.num_params(),
        cpu_s=cpu,
        cpu_ms_per_step=1000 * cpu / run.steps,
    )
    return row
