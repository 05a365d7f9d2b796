"""flops(): a hand count of a tiny model on every mixer path, and torch's own count of the weight matmuls."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import leviathan.model.correlation as correlation
from leviathan.config import ComponentConfig
from leviathan.model.flops import flops
from leviathan.model.component import LeviathanComponent

# V=10, T=4, one layer, H=2 heads of d=2 (C=4), w=3, relu3 MLP (hidden 3C = 12).
TINY = dict(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=4, window=3, flavour="relu3")

# Weights per token: q,k,v,out 4*C*C = 64, MLP 2*3*C*C = 96, LM head V*C = 40 -> 200 multiply-adds.
# Causal query-key pairs per sequence: 4*5/2 = 10; per pair and head: score + d (values).
WEIGHTS = 6 * 4 * 200  # per sequence of 4 tokens, forward + backward


@pytest.mark.parametrize(
    "mixer,path,score",
    [
        ("attention", None, 2),  # d
        ("correlation", "lag_stacked", 2 * 3),  # d * w
        ("correlation", "shifted_diagonal", 2 + 3),  # d + w
        ("correlation", "triton", 2 + 3),
    ],
)
def test_hand_count(mixer: str, path: str | None, score: int) -> None:
    cfg = ComponentConfig(**TINY, mixer=mixer)
    mixer_flops = 6 * 1 * 2 * 10 * (score + 2)  # 6 * layers * heads * pairs * (score + d)
    assert flops(cfg, 4, path=path) == WEIGHTS + mixer_flops
    assert flops(cfg, 4, batch_size=3, path=path) == 3 * (WEIGHTS + mixer_flops)


def test_weight_matmuls_match_torch_flop_counter() -> None:
    """torch counts every mm of a real forward+backward; the weight term must equal it."""
    cfg = ComponentConfig(**TINY, mixer="attention")
    model = LeviathanComponent(cfg)
    idx = torch.randint(0, 10, (3, 4))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts == {"aten.mm": 3 * WEIGHTS}, counts  # the CPU flash kernel has no formula in torch


def test_cpu_path_follows_the_sequence_length() -> None:
    cfg = ComponentConfig(**{**TINY, "block_size": 4096})
    short = correlation.shifted_diagonal_max_len(cfg.window)
    long = short + 1
    assert flops(cfg, short) == flops(cfg, short, path="shifted_diagonal")
    assert flops(cfg, long) == flops(cfg, long, path="lag_stacked") > flops(cfg, long, path="shifted_diagonal")
    assert flops(cfg) == flops(cfg, 4096)  # seq_len defaults to the block size
    window_one = ComponentConfig(**{**TINY, "window": 1})
    assert flops(window_one, 4) == flops(ComponentConfig(**TINY, mixer="attention"), 4)


def test_bad_arguments() -> None:
    cfg = ComponentConfig(**TINY)
    with pytest.raises(ValueError, match="path"):
        flops(cfg, 4, path="flash")
    with pytest.raises(ValueError, match="seq_len"):
        flops(cfg, 0)
