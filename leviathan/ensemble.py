"""Leviathan ensembles: members grouped in modules, merged by correlation over members.

Member m (i = module * members_per_module + slot) maps idx (B, T) to final
hidden states h_m (B, T, d_m); its projection maps them to the merge width:
s_m = P_m h_m (B, T, D). The `CorrelationMerger` then picks, at every
position, how much each member counts:

    c[t]            = mean_m s_m[t]                                   consensus (B, T, D)
    q = W_q c,  k_m = W_k s_m,  v_m = W_v s_m                         per head h, width d_h = D / H
    score[t, m, h]  = sum_{u<w} a[h,u] * dot(q[t-u, h], k_m[t-u, h]) / sqrt(d_h)   (zeros before t = 0)
    w[t, m, h]      = softmax_m score[t, m, h]                         a distribution over members

    fusion:  x[t] = c[t] + W_o concat_h sum_m w[t,m,h] v_m[t,h];  logits = head(LayerNorm(x))
    mixture: pi[t, m] = mean_h w[t,m,h];  logits[t] = log sum_m pi[t,m] * p_m(. | <= t)

It is the token mixer's correlation turned onto the member axis: the lag
window runs over time (positions t-u <= t, so the merge is causal) and the
softmax runs over members. The merger only sees stacked states (B, T, M, D),
so a distributed trainer can gather the members' states from wherever they
were computed and call `merge` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_folder, save_folder
from .config import EnsembleConfig
from .model import DecodeCache, LeviathanComponentBase, build_component, check_sampling, generate_cached


@dataclass
class MergeOutput:
    logits: Tensor  # (B, T, V); mixture: log of the mixture probabilities
    loss: Tensor | None  # mean NLL over (B, T) when targets were given
    weights: Tensor  # (B, T, M, H), softmax over M


@dataclass
class EnsembleOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None
    member_losses: dict[str, Tensor] | None  # each member's own LM loss, by member name
    weights: Tensor  # (B, T, M, H)


@dataclass
class MergeCache:
    """The merger's state for incremental decoding: the last w-1 zero-lag scores (B, w-1, M, H)."""

    scores: Tensor | None = None


class CorrelationMerger(nn.Module):
    """Multi-headed correlation over the member axis (see the module docstring for the maths).

    Owns everything the members share: W_q, W_k, the lag weights a (H, w)
    (correlation only), and in fusion mode W_v, W_o, the final norm and the LM
    head (merge_width -> V). Mixture mode mixes the members' own predictions,
    so it has no value/output path and no head.
    """

    def __init__(self, config: EnsembleConfig) -> None:
        super().__init__()
        self.config = config
        D, H = config.merge_width, config.merge_heads
        self.n_head, self.head_dim = H, D // H
        self.window = config.merge_window if config.mixer == "correlation" else 1
        self.merge_mode = config.merge
        self.query = nn.Linear(D, D, bias=False)
        self.key = nn.Linear(D, D, bias=False)
        if config.mixer == "correlation":
            lag = torch.zeros(H, self.window)
            lag[:, 0] = 1.0  # starts as a zero-lag (attention-like) merge
            self.lag_weight = nn.Parameter(lag)  # (H, w)
        else:
            self.register_parameter("lag_weight", None)
        if config.merge == "fusion":
            self.value = nn.Linear(D, D, bias=False)
            self.out_proj = nn.Linear(D, D, bias=False)
            self.ln_f = nn.LayerNorm(D)
            self.lm_head = nn.Linear(D, config.vocab_size, bias=False)
            # Small head: the merged model starts near the uniform prediction (loss ~ ln V).
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)

    def scores(self, states: Tensor, cache: MergeCache | None = None) -> Tensor:
        """score[t, m, h] (B, T, M, H) from stacked member states (B, T, M, D)."""
        B, T, M, D = states.shape
        H, d, w = self.n_head, self.head_dim, self.window
        c = states.mean(dim=2)  # (B, T, D)
        q = self.query(c).view(B, T, H, d)  # (B, T, H, d)
        k = self.key(states).view(B, T, M, H, d)  # (B, T, M, H, d)
        s0 = torch.einsum("bthd,btmhd->btmh", q, k) / math.sqrt(d)  # (B, T, M, H), zero lag
        if self.lag_weight is None:
            return s0
        hist = cache.scores if cache is not None and cache.scores is not None else s0.new_zeros(B, w - 1, M, H)
        full = torch.cat([hist, s0], dim=1)  # (B, w-1+T, M, H): s0 at times t-w+1 .. T-1
        score = sum(self.lag_weight[:, u] * full[:, w - 1 - u : w - 1 - u + T] for u in range(w))
        if cache is not None:
            cache.scores = full[:, full.size(1) - (w - 1) :]
        return score

    def forward(
        self,
        states: Tensor,
        logprobs: Tensor | None = None,
        targets: Tensor | None = None,
        weights: Tensor | None = None,
        cache: MergeCache | None = None,
    ) -> MergeOutput:
        """Merge stacked member states (B, T, M, D).

        logprobs (B, T, M, V): the members' log-probabilities, required for
        mixture. targets (B, T): gives the loss. weights (B, T, M, H): use these
        merge weights instead of the learned ones (e.g. the uniform mixture
        baseline, or forcing one member); each must sum to 1 over M.
        """
        B, T, M, D = states.shape
        if M != self.config.num_members or D != self.config.merge_width:
            raise ValueError(
                f"states: expected (B, T, {self.config.num_members}, {self.config.merge_width}), got {tuple(states.shape)}"
            )
        if weights is None:
            log_w = F.log_softmax(self.scores(states, cache).float(), dim=2)  # (B, T, M, H)
            weights = log_w.exp()
        else:
            if weights.shape != (B, T, M, self.n_head):
                raise ValueError(f"weights: expected {(B, T, M, self.n_head)}, got {tuple(weights.shape)}")
            log_w = weights.float().log()
        if self.merge_mode == "fusion":
            v = self.value(states).view(B, T, M, self.n_head, self.head_dim)  # (B, T, M, H, d)
            fused = torch.einsum("btmh,btmhd->bthd", weights.to(v.dtype), v).reshape(B, T, D)  # (B, T, D)
            x = states.mean(dim=2) + self.out_proj(fused)  # (B, T, D)
            logits = self.lm_head(self.ln_f(x))  # (B, T, V)
            loss = None
            if targets is not None:
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        else:
            if logprobs is None or logprobs.shape[:3] != (B, T, M):
                got = None if logprobs is None else tuple(logprobs.shape)
                raise ValueError(f"logprobs: mixture needs (B, T, M, V) = ({B}, {T}, {M}, V), got {got}")
            log_pi = torch.logsumexp(log_w, dim=-1) - math.log(self.n_head)  # (B, T, M) = log mean_h w
            logits = torch.logsumexp(log_pi.unsqueeze(-1) + logprobs.float(), dim=2)  # (B, T, V)
            loss = None
            if targets is not None:
                loss = F.nll_loss(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return MergeOutput(logits=logits, loss=loss, weights=weights)


class EnsembleCache:
    """Decoding state of a whole ensemble: one cache per member plus the merger's."""

    def __init__(self, members: nn.ModuleList) -> None:
        self.members: list[DecodeCache] = [m.new_cache() for m in members]
        self.merge = MergeCache()

    @property
    def length(self) -> int:
        return self.members[0].length


class LeviathanEnsemble(nn.Module):
    """modules x members_per_module members + per-member projections + the merger.

    members[i] and projections[i] follow module-major order (see
    `EnsembleConfig.member_names`). forward(idx (B, T), targets (B, T) | None).
    """

    def __init__(self, config: EnsembleConfig) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(build_component(c) for c in config.members)
        self.projections = nn.ModuleList(
            nn.Linear(c.n_embd, config.merge_width, bias=False) for c in config.members
        )
        self.merger = CorrelationMerger(config)

    @property
    def member_names(self) -> list[str]:
        return self.config.member_names

    def _features(self, i: int, idx: Tensor, cache: DecodeCache | None = None) -> tuple[Tensor, Tensor]:
        member: LeviathanComponentBase = self.members[i]  # type: ignore[assignment]
        h = member.hidden(idx, cache)  # (B, T, d_i)
        return self.projections[i](h), h

    def member_features(self, i: int, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """Member i's projected state (B, T, D) and, for mixture, its log-probs (B, T, V)."""
        state, h = self._features(i, idx)
        logprobs = None
        if self.config.merge == "mixture":
            logprobs = F.log_softmax(self.members[i].logits_from_hidden(h).float(), dim=-1)
        return state, logprobs

    def merge(
        self,
        states: Tensor,
        logprobs: Tensor | None = None,
        targets: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> MergeOutput:
        """Merge stacked member states (B, T, M, D) (see `CorrelationMerger.forward`)."""
        return self.merger(states, logprobs, targets, weights)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, return_details: bool = False
    ) -> tuple[Tensor, Tensor | None] | EnsembleOutput:
        """(B, T) -> (merged logits (B, T, V), loss), or an `EnsembleOutput` with return_details."""
        mixture = self.config.merge == "mixture"
        want_member_losses = return_details and targets is not None
        states, logprobs, member_losses = [], [], {}
        for i, name in enumerate(self.member_names):
            state, h = self._features(i, idx)
            states.append(state)
            if mixture or want_member_losses:
                logits = self.members[i].logits_from_hidden(h).float()  # (B, T, V)
                lp = F.log_softmax(logits, dim=-1)
                if mixture:
                    logprobs.append(lp)
                if want_member_losses:
                    member_losses[name] = F.nll_loss(lp.reshape(-1, lp.size(-1)), targets.reshape(-1))
        out = self.merger(
            torch.stack(states, dim=2),  # (B, T, M, D)
            torch.stack(logprobs, dim=2) if mixture else None,  # (B, T, M, V)
            targets,
        )
        if not return_details:
            return out.logits, out.loss
        return EnsembleOutput(out.logits, out.loss, member_losses if want_member_losses else None, out.weights)

    def _step(self, tokens: Tensor, cache: EnsembleCache | None) -> tuple[Tensor, EnsembleCache]:
        """Run the next positions through every member and the merger, with caches."""
        cache = cache if cache is not None else EnsembleCache(self.members)
        states, logprobs = [], []
        for i in range(len(self.members)):
            state, h = self._features(i, tokens, cache.members[i])
            states.append(state)
            if self.config.merge == "mixture":
                logprobs.append(F.log_softmax(self.members[i].logits_from_hidden(h).float(), dim=-1))
        out = self.merger(
            torch.stack(states, dim=2),
            torch.stack(logprobs, dim=2) if logprobs else None,
            cache=cache.merge,
        )
        return out.logits[:, -1, :], cache

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample from the merged model: (B, T) -> (B, T + N), cached, seeded-deterministic."""
        check_sampling(max_new_tokens, temperature, top_k)
        was_training = self.training
        self.eval()
        try:
            return generate_cached(
                self._step, idx, self.config.block_size, max_new_tokens, temperature, top_k, generator
            )
        finally:
            self.train(was_training)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors (the whole ensemble's state dict) into `directory`."""
        return save_folder(self, directory, "ensemble", self.config.to_dict())

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "LeviathanEnsemble":
        return load_folder(directory, "ensemble", lambda d: cls(EnsembleConfig.from_dict(d)), map_location)
