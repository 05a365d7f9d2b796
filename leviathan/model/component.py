"""Leviathan components: GPT-style language models whose token mixer is correlation.

    idx (B, T) -> token + position embedding -> n_layer pre-norm blocks
               -> final LayerNorm -> LM head (tied to the token embedding) -> logits (B, T, V)

    block: x = x + mixer(ln_1(x));  x = x + mlp(ln_2(x))

Flavours differ only in the MLP: gelu4 (GELU, hidden 4C), relu3 (ReLU, 3C),
leaky6 (LeakyReLU, 6C). `LeviathanComponentBase` holds everything a flavour
shares and asks subclasses for their blocks; `LeviathanComponent` builds the
standard block from the config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_folder, save_folder
from ..config import MLP_WIDTH, ComponentConfig
from .correlation import CorrelationCache, MultiHeadedCorrelation

FLAVOUR_ACTIVATION: dict[str, Callable[[], nn.Module]] = {
    "gelu4": nn.GELU,
    "relu3": nn.ReLU,
    "leaky6": nn.LeakyReLU,
}
"""flavour -> the MLP's activation (its hidden width multiplier is `config.MLP_WIDTH`)."""


class MLP(nn.Module):
    def __init__(self, config: ComponentConfig) -> None:
        super().__init__()
        mult, act = MLP_WIDTH[config.flavour], FLAVOUR_ACTIVATION[config.flavour]
        self.c_fc = nn.Linear(config.n_embd, mult * config.n_embd, bias=config.bias)
        self.act = act()
        self.c_proj = nn.Linear(mult * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ComponentConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mixer = MultiHeadedCorrelation(
            config.n_embd, config.n_head, config.window, config.mixer, config.bias, config.dropout
        )
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: CorrelationCache | None = None) -> Tensor:
        x = x + self.mixer(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class DecodeCache:
    """One `CorrelationCache` per block; `length` = positions already decoded."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [CorrelationCache() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length


def sample_next(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Sample one token per row from the last position's logits (B, V) -> (B, 1).

    temperature 0 picks the most likely token; top_k keeps the k largest logits.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """Raise ValueError naming the first sampling setting `generate` cannot use."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be >= 1 or None, got {top_k}")


def generate_cached(
    step: Callable[[Tensor, object | None], tuple[Tensor, object]],
    idx: Tensor,
    block_size: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    """The sampling loop shared by components and ensembles.

    `step(tokens, cache)` runs the model on `tokens` after the cached positions
    (a fresh cache when None) and returns (last-position logits (B, V), cache).
    Each new token is decoded incrementally; once the context reaches
    block_size, the last block_size tokens are re-encoded from scratch, which
    is what a full forward on the cropped context computes.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx: expected a (B, T) tensor with T >= 1, got shape {tuple(idx.shape)}")
    logits, cache = step(idx[:, -block_size:], None)
    for n in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generator)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
        if n == max_new_tokens - 1:
            break
        if cache.length < block_size:
            logits, cache = step(nxt, cache)
        else:
            logits, cache = step(idx[:, -block_size:], None)
    return idx


class LeviathanComponentBase(nn.Module):
    """What every Leviathan flavour shares: embeddings, the block stack, final norm, LM head.

    Subclasses provide `make_block(config)`. Shapes: idx (B, T) int64,
    T <= block_size; hidden (B, T, n_embd); logits (B, T, vocab_size).
    """

    def __init__(self, config: ComponentConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(self.make_block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (nanoGPT)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def make_block(self, config: ComponentConfig) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define make_block(config)")

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_cache(self) -> DecodeCache:
        return DecodeCache(self.config.n_layer)

    def hidden(self, idx: Tensor, cache: DecodeCache | None = None) -> Tensor:
        """Final hidden states after the last norm: (B, T) -> (B, T, n_embd).

        With a cache, idx holds the positions after the cached ones.
        """
        B, T = idx.size()
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(
                f"idx: sequence of length {start + T} exceeds block_size={self.config.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        return self.ln_f(x)

    def logits_from_hidden(self, h: Tensor) -> Tensor:
        return self.lm_head(h)  # (B, T, C) -> (B, T, V)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: DecodeCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(B, T) token ids -> (logits (B, T, V), mean cross-entropy vs targets (B, T) or None)."""
        logits = self.logits_from_hidden(self.hidden(idx, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue idx (B, T) by max_new_tokens sampled tokens -> (B, T + N).

        Cached incremental decoding; the same seeded generator gives the same tokens.
        """
        check_sampling(max_new_tokens, temperature, top_k)

        def step(tokens: Tensor, cache: DecodeCache | None) -> tuple[Tensor, DecodeCache]:
            cache = cache if cache is not None else self.new_cache()
            logits, _ = self(tokens, cache=cache)
            return logits[:, -1, :], cache

        was_training = self.training
        self.eval()
        try:
            return generate_cached(step, idx, self.config.block_size, max_new_tokens, temperature, top_k, generator)
        finally:
            self.train(was_training)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied LM head counted once); non_embedding drops position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    def save(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors into `directory`."""
        return save_folder(self, directory, "component", self.config.to_dict())

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "LeviathanComponentBase":
        """Rebuild a saved component; on the base class, as the standard `LeviathanComponent`."""
        model_cls = LeviathanComponent if cls is LeviathanComponentBase else cls

        def build(meta: dict) -> nn.Module:
            return model_cls(ComponentConfig.from_dict(meta))

        return load_folder(directory, "component", build, map_location)


class LeviathanComponent(LeviathanComponentBase):
    """The standard Leviathan component: every block is `Block(config)` (flavour from the config)."""

    def make_block(self, config: ComponentConfig) -> nn.Module:
        return Block(config)


def build_component(config: ComponentConfig) -> LeviathanComponentBase:
    return LeviathanComponent(config)


def configure_adamw(
    module: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weight matrices and embeddings only.

    Biases, norm gains and the per-head lag weights (H, w) are not decayed: the
    lag weights are a learned mixing of lags, and pulling them to 0 would push a
    correlation model back towards attention.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and not name.endswith("lag_weight"):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
