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
    residual (mixture option): logits[t] = log_softmax(log sum_m pi[t,m] p_m(. | <= t)
                               + R(LayerNorm(c[t] + W_o concat_h sum_m w[t,m,h] v_m[t,h])))
                               with R initialised to 0, so it starts as the mixture

With `evidence` (EnsembleConfig) the score also sees how well each member has
predicted the text so far, its decayed log-likelihood (a[s] = log p_m(x_s | x_<s),
a[0] = 0, the target log-probs shifted right by one, so it is causal):

    e_m[t, h]       = sum_{s<=t} gamma_h^(t-s) a_m[s]                  (B, T, M, H)
    score[t, m, h] += beta_h * e_m[t, h]

gamma_h = exp(-max(r_h, 0)) lies in (0, 1], beta_h and r_h are learned, and at
init beta = 1, r = 0 (gamma exactly 1) and W_k = 0 (the state term is 0): a
fresh mixture merger is then the running Bayes posterior over members with a
uniform prior, w[t, m] = softmax_m sum_{s<t} log p_m(y_s), and training moves
it from there.

It is the token mixer's correlation turned onto the member axis: the lag
window runs over time (positions t-u <= t, so the merge is causal) and the
softmax runs over members. The merger only sees stacked states (B, T, M, D),
so a distributed trainer can gather the members' outputs from wherever they
were computed and merge them itself.

One path for every caller: `run_members` is the members' forward (projected
states, log-probs of the targets, full log-probs only when asked) and
`merge_members` the merge call. The ensemble's forward and generation, the
distributed trainer (cluster.merge) and both evaluations use these two.
In mixture mode the loss needs only the (M, B, T) target log-probs:

    loss = -mean_t log sum_m pi[t, m] p_m(y_t)

except with the residual, whose normaliser runs over the vocabulary: it needs
the members' full log-probs (M, B, T, V) in training and evaluation too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_folder, save_folder
from ..config import EnsembleConfig
from .component import DecodeCache, LeviathanComponentBase, build_component, check_sampling, generate_cached


@dataclass
class MemberOutputs:
    """What the members hand the merger, member axis first (the axis a distributed
    trainer gathers over ranks).

    target_logprobs, log p_m(y_t | x_<=t) of the actual target tokens, is what the
    mixture loss and every evaluation row need; the full log-probs (M, B, T, V)
    exist only when logits over the vocabulary are wanted (mixture generation).
    """

    states: Tensor  # (M, B, T, D) projected final hidden states s_m = P_m h_m
    target_logprobs: Tensor | None  # (M, B, T), when targets were given
    logprobs: Tensor | None = None  # (M, B, T, V), only with full_logprobs

    def losses(self) -> Tensor:
        """Each member's own LM loss (M,): the mean NLL of its target log-probs."""
        if self.target_logprobs is None:
            raise ValueError("member losses need targets")
        return -self.target_logprobs.float().mean(dim=(1, 2))


def run_members(
    members: Sequence[LeviathanComponentBase],
    projections: Sequence[nn.Module],
    idx: Tensor,
    targets: Tensor | None = None,
    *,
    full_logprobs: bool = False,
    members_grad: bool = True,
    caches: Sequence[DecodeCache] | None = None,
) -> MemberOutputs:
    """Run members (and their projections) on idx (B, T): the one member forward.

    targets (B, T) give the target log-probs; full_logprobs keeps (M, B, T, V).
    members_grad=False runs the members under no_grad (frozen members in the
    merge phase) while the projections stay differentiable. caches: one decode
    cache per member for incremental generation.
    """
    states, target_lp, full_lp = [], [], []
    for i, (member, projection) in enumerate(zip(members, projections)):
        with torch.set_grad_enabled(members_grad and torch.is_grad_enabled()):
            h = member.hidden(idx, None if caches is None else caches[i])  # (B, T, d_m)
            if targets is not None or full_logprobs:
                lp = F.log_softmax(member.logits_from_hidden(h).float(), dim=-1)  # (B, T, V)
                if targets is not None:
                    target_lp.append(lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1))  # (B, T)
                if full_logprobs:
                    full_lp.append(lp)
        states.append(projection(h))  # (B, T, D)
    return MemberOutputs(
        states=torch.stack(states),
        target_logprobs=torch.stack(target_lp) if targets is not None else None,
        logprobs=torch.stack(full_lp) if full_logprobs else None,
    )


def merge_members(
    merger: CorrelationMerger,
    outputs: MemberOutputs,
    targets: Tensor | None = None,
    rows: slice = slice(None),
    weights: Tensor | None = None,
    cache: MergeCache | None = None,
    tokens: Tensor | None = None,
) -> MergeOutput:
    """The one merge call: batch rows `rows` of the members' outputs through the merger.

    outputs hold every member (M, B, ...); targets are the selected rows' (b, T).
    The member axis moves to dim 2, the merger's layout (b, T, M, ...).
    tokens: the input tokens (B, T) when there are no target log-probs
    (generation): the evidence reads each member's log-prob of them from the
    full log-probs (and, when decoding, the cached ones before them).
    """
    states = outputs.states[:, rows].permute(1, 2, 0, 3)  # (b, T, M, D)
    target_lp = None if outputs.target_logprobs is None else outputs.target_logprobs[:, rows].permute(1, 2, 0)
    logprobs = None if outputs.logprobs is None else outputs.logprobs[:, rows].permute(1, 2, 0, 3)
    input_lp = None
    if merger.evidence and target_lp is None and tokens is not None and logprobs is not None:
        input_lp = tokens_input_logprobs(tokens[rows], logprobs, None if cache is None else cache.last_logprobs)
        if cache is not None:
            cache.last_logprobs = logprobs[:, -1]
    return merger(states, target_lp, logprobs, targets, weights, cache, input_lp)


@dataclass
class MergeOutput:
    logits: Tensor | None  # (B, T, V); mixture: log of the mixture probabilities (needs full log-probs)
    target_logprobs: Tensor | None  # (B, T) log p(y_t) of the merged model, when targets were given
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
    """The merger's state for incremental decoding.

    scores:        the last w-1 zero-lag scores (B, w-1, M, H)
    evidence:      e at the last position seen (B, M, H), with evidence
    last_logprobs: the members' log-probs at the last position seen (B, M, V):
                   the next token's a[s] = log p_m(x_s | x_<s) is read from them
    """

    scores: Tensor | None = None
    evidence: Tensor | None = None
    last_logprobs: Tensor | None = None


def _at_least_float(x: Tensor) -> Tensor:
    """float32, or float64 when x already is (the exactness tests run the merger in float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def input_logprobs(target_logprobs: Tensor) -> Tensor:
    """a[t] = log p_m(x_t | x_<t) from the target log-probs (B, T, M): shifted right, a[0] = 0."""
    return F.pad(target_logprobs, (0, 0, 1, 0))[:, :-1]


def tokens_input_logprobs(tokens: Tensor, logprobs: Tensor, last_logprobs: Tensor | None = None) -> Tensor:
    """a[t] = log p_m(x_t | x_<t) (B, T, M) of input tokens (B, T) without targets
    (generation), from the members' full log-probs at those positions (B, T, M, V)
    and, after cached positions, the log-probs at the position before them
    last_logprobs (B, M, V); a[0] = 0 at the sequence start."""
    B, T, M, _ = logprobs.shape
    if last_logprobs is None:
        first = logprobs.new_zeros(B, 1, M)
    else:
        first = last_logprobs.gather(-1, tokens[:, :1, None].expand(B, M, 1)).view(B, 1, M)
    # logprobs[:, t] predicts tokens[:, t + 1]
    rest = logprobs[:, :-1].gather(-1, tokens[:, 1:, None, None].expand(B, T - 1, M, 1)).squeeze(-1)
    return torch.cat([first, rest], dim=1)  # (B, T, M)


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
        self.evidence = config.evidence
        if config.evidence:
            nn.init.zeros_(self.key.weight)  # the state term starts at exactly 0
            self.beta = nn.Parameter(torch.ones(H))  # (H,)
            self.gamma_raw = nn.Parameter(torch.zeros(H))  # (H,) r: gamma = exp(-max(r, 0)), 1 at init
        if config.merge == "fusion":
            self.value = nn.Linear(D, D, bias=False)
            self.out_proj = nn.Linear(D, D, bias=False)
            self.ln_f = nn.LayerNorm(D)
            self.lm_head = nn.Linear(D, config.vocab_size, bias=False)
            # Small head: the merged model starts near the uniform prediction (loss ~ ln V).
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        self.residual = config.residual
        if config.residual:
            self.res_value = nn.Linear(D, D, bias=False)
            self.res_out = nn.Linear(D, D, bias=False)
            self.res_ln = nn.LayerNorm(D)
            self.res_head = nn.Linear(D, config.vocab_size, bias=False)
            nn.init.zeros_(self.res_head.weight)  # starts as the mixture exactly

    def correction(self, states: Tensor, weights: Tensor) -> Tensor:
        """The residual's logit correction (B, T, V) from the states (B, T, M, D) and merge weights
        (B, T, M, H): the fusion path's read-out of the merged states, through `res_head`."""
        B, T, M, D = states.shape
        v = self.res_value(states).view(B, T, M, self.n_head, self.head_dim)  # (B, T, M, H, d)
        fused = torch.einsum("btmh,btmhd->bthd", weights.to(v.dtype), v).reshape(B, T, D)
        return self.res_head(self.res_ln(states.mean(dim=2) + self.res_out(fused))).float()

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

    def log_gamma(self) -> Tensor:
        """log gamma (H,) = -max(r, 0), with a straight-through gradient d/dr = -1.

        gamma is exactly 1 at r = 0 and stays in (0, 1]; a plain clamp would stop
        r's gradient once r < 0, and any smooth map whose maximum is 1 has zero
        gradient there, so neither could leave gamma = 1.
        """
        r = self.gamma_raw
        return -(r + (r.clamp(min=0) - r).detach())

    def gamma(self) -> Tensor:
        return self.log_gamma().exp()

    def evidence_term(self, input_lp: Tensor, cache: MergeCache | None = None) -> Tensor:
        """beta_h * e_m[t, h] (B, T, M, H) from a[t] = log p_m(x_t | x_<t) (B, T, M).

        e[t] = sum_{s<=t} gamma^(t-s) a[s] (+ gamma^(t+1) e[-1] after cached
        positions) as one product with G[h, t, s] = gamma_h^(t-s) (s <= t, else
        0): exp(0 * lag) is exactly 1, so at gamma = 1 it is the plain running sum.
        """
        B, T, M = input_lp.shape
        log_gamma = self.log_gamma()  # (H,)
        pos = torch.arange(T, device=input_lp.device)
        lag = (pos[:, None] - pos[None, :]).clamp(min=0).float()  # (T, T)
        causal = (pos[None, :] <= pos[:, None]).float()  # (T, T)
        dtype = torch.promote_types(input_lp.dtype, torch.float32)
        G = torch.exp(log_gamma[:, None, None].to(dtype) * lag.to(dtype)) * causal.to(dtype)  # (H, T, T)
        e = torch.einsum("hts,bsm->btmh", G, input_lp.to(dtype))  # (B, T, M, H)
        if cache is not None:
            if cache.evidence is not None:
                carry = torch.exp(log_gamma[None, :] * (pos[:, None] + 1).float())  # (T, H): gamma^(t+1)
                e = e + carry[None, :, None, :] * cache.evidence[:, None]
            cache.evidence = e[:, -1]
        return self.beta * e

    def log_weights(
        self,
        states: Tensor,
        target_logprobs: Tensor | None = None,
        cache: MergeCache | None = None,
        input_lp: Tensor | None = None,
        member_mask: Tensor | None = None,
    ) -> Tensor:
        """log w[t, m, h] (B, T, M, H), the learned merge weights (see `forward` for the arguments)."""
        B, T, M, _ = states.shape
        score = _at_least_float(self.scores(states, cache))  # (B, T, M, H)
        if self.evidence:
            if input_lp is None:
                if target_logprobs is None or target_logprobs.shape != (B, T, M):
                    got = None if target_logprobs is None else tuple(target_logprobs.shape)
                    raise ValueError(f"target_logprobs: the evidence needs (B, T, M) = ({B}, {T}, {M}), got {got}")
                input_lp = input_logprobs(target_logprobs)
            score = score + self.evidence_term(input_lp, cache)
        if member_mask is not None:
            score = score.masked_fill(~member_mask[..., None], float("-inf"))
        return F.log_softmax(score, dim=2)

    def forward(
        self,
        states: Tensor,
        target_logprobs: Tensor | None = None,
        logprobs: Tensor | None = None,
        targets: Tensor | None = None,
        weights: Tensor | None = None,
        cache: MergeCache | None = None,
        input_lp: Tensor | None = None,
        member_mask: Tensor | None = None,
    ) -> MergeOutput:
        """Merge stacked member states (B, T, M, D).

        target_logprobs (B, T, M): the members' log-probs of the targets, which
        is all the mixture loss needs. logprobs (B, T, M, V): the members' full
        log-probs, for mixture logits. targets (B, T): gives the loss. weights
        (B, T, M, H): use these merge weights instead of the learned ones (e.g.
        the uniform mixture baseline, or forcing one member); each must sum to 1 over M.
        input_lp (B, T, M): a[t] = log p_m(x_t | x_<t) for the evidence when
        decoding; otherwise it is target_logprobs shifted right by one.
        member_mask (B, T, M) bool: the members that may take weight at each
        position (sparse routing); the softmax runs over those alone.
        """
        B, T, M, D = states.shape
        if M != self.config.num_members or D != self.config.merge_width:
            raise ValueError(
                f"states: expected (B, T, {self.config.num_members}, {self.config.merge_width}), got {tuple(states.shape)}"
            )
        if weights is None:
            log_w = self.log_weights(states, target_logprobs, cache, input_lp, member_mask)  # (B, T, M, H)
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
            target_lp = None
            if targets is not None:
                target_lp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        else:
            log_pi = torch.logsumexp(log_w, dim=-1) - math.log(self.n_head)  # (B, T, M) = log mean_h w
            logits = target_lp = None
            if logprobs is not None:
                if logprobs.shape[:3] != (B, T, M):
                    raise ValueError(f"logprobs: mixture needs (B, T, M, V) = ({B}, {T}, {M}, V), got {tuple(logprobs.shape)}")
                logits = torch.logsumexp(log_pi.unsqueeze(-1) + _at_least_float(logprobs), dim=2)  # (B, T, V)
                if self.residual:
                    logits = F.log_softmax(logits + self.correction(states, weights).to(logits.dtype), dim=-1)
            if targets is not None and self.residual:
                if logits is None:
                    raise ValueError("logprobs: the residual needs the members' full log-probs (B, T, M, V), got none")
                target_lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
            elif targets is not None:
                if target_logprobs is None or target_logprobs.shape != (B, T, M):
                    got = None if target_logprobs is None else tuple(target_logprobs.shape)
                    raise ValueError(f"target_logprobs: the mixture loss needs (B, T, M) = ({B}, {T}, {M}), got {got}")
                # log p(y_t) = log sum_m pi[t, m] p_m(y_t)
                target_lp = torch.logsumexp(log_pi + _at_least_float(target_logprobs), dim=2)  # (B, T)
            elif logprobs is None:
                raise ValueError("logprobs: mixture needs the members' log-probs (full, or of the targets)")
        loss = None if target_lp is None else -target_lp.mean()
        return MergeOutput(logits=logits, target_logprobs=target_lp, loss=loss, weights=weights)


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

    def member_outputs(self, idx: Tensor, targets: Tensor | None = None, full_logprobs: bool = False) -> MemberOutputs:
        """Every member's outputs on idx (B, T) (see `run_members`)."""
        return run_members(self.members, self.projections, idx, targets, full_logprobs=full_logprobs)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, return_details: bool = False
    ) -> tuple[Tensor, Tensor | None] | EnsembleOutput:
        """(B, T) -> (merged logits (B, T, V), loss), or an `EnsembleOutput` with return_details."""
        mixture = self.config.merge == "mixture"
        want_member_losses = return_details and targets is not None
        evidence = self.config.evidence
        needs_targets = mixture or evidence or want_member_losses
        full = mixture or (evidence and targets is None)  # without targets the evidence reads idx's log-probs
        outputs = self.member_outputs(idx, targets if needs_targets else None, full_logprobs=full)
        out = merge_members(self.merger, outputs, targets, tokens=idx)
        if not return_details:
            return out.logits, out.loss
        member_losses = dict(zip(self.member_names, outputs.losses())) if want_member_losses else None
        return EnsembleOutput(out.logits, out.loss, member_losses, out.weights)

    def _step(self, tokens: Tensor, cache: EnsembleCache | None) -> tuple[Tensor, EnsembleCache]:
        """Run the next positions through every member and the merger, with caches."""
        cache = cache if cache is not None else EnsembleCache(self.members)
        outputs = run_members(
            self.members, self.projections, tokens,
            full_logprobs=self.config.merge == "mixture" or self.config.evidence, caches=cache.members,
        )
        out = merge_members(self.merger, outputs, cache=cache.merge, tokens=tokens)
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
