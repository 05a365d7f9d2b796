"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

For step s (0-based: the s-th optimiser step of a phase), total steps N,
warmup K and floor r * lr:

    s < K:  lr_s = lr * (s + 1) / (K + 1)
    s >= K: lr_s = r*lr + (lr - r*lr) * (1 + cos(pi * (s - K) / max(1, N - K))) / 2

(nanoGPT's schedule). Both phases use it: phase 1 with `training.lr` over
`phase1_steps`, phase 2 with `training.merge_lr` over `phase2_steps` (joint
members at `lr * joint_lr_scale`). Warmup is capped at half the phase, so a
short phase still spends most of its steps decaying.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float = 1.0, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The learning rate of 0-based step `step` of a phase of `total_steps` steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup = min(warmup_steps, total_steps // 2)
    min_lr = base_lr * min_lr_ratio
    if step < warmup:
        return base_lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, factor: float) -> float:
    """lr = base_lr * factor for every param group (each group keeps its peak lr as
    `base_lr`); returns the first group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
