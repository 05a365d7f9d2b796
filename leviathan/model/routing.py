"""Sparse routing at inference: run only the top-k members, re-chosen every R tokens.

A mixture merger says, at every position, how much each member counts. When a
few members carry most of the weight, running the others is wasted work. A
routed decode runs k of the M members per sequence and re-chooses them every
`every` (R) tokens:

- Block start t0 (every R tokens after the prompt): the members that sat out
  the last block catch up on the tokens they missed, in one chunked forward
  through their decode caches, so every member's state and evidence up to
  t0 - 1 is exact. The merger's weights at t0 - 1 pick the top k.
- Inside the block only the chosen members run. The merger's softmax runs
  over them alone (`member_mask`); the others' states are held at their last
  known value t0 - 1, which is all the consensus query sees of them.

So the routed model is the trained merger restricted to the chosen members,
and with k = M it is the merged model. `routed_target_logprobs` scores it
teacher-forced from the full members' outputs (for evaluation) and
`RoutedDecoder` decodes it for real, running only what it needs; the two give
the same log-probs (tests/test_routing.py). Mixture merge only: a fusion
merge has no member distributions to restrict.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ensemble import CorrelationMerger, LeviathanEnsemble, MergeCache, _at_least_float, run_members


def check_routing(merger: CorrelationMerger, k: int, every: int, prefix: int) -> None:
    """Raise ValueError naming the first routing setting that cannot be used."""
    M = merger.config.num_members
    if merger.merge_mode != "mixture":
        raise ValueError(f"merge: sparse routing needs a mixture merge, got {merger.merge_mode!r}")
    if not 1 <= k <= M:
        raise ValueError(f"k: must be in [1, {M}] (the number of members), got {k}")
    if every < 1:
        raise ValueError(f"every: must be >= 1 token, got {every}")
    if prefix < 1:
        raise ValueError(f"prefix: routing chooses from at least one token of context, got {prefix}")


def mix(log_pi: Tensor, member_logprobs: Tensor) -> Tensor:
    """log sum_m pi[m] p_m: log_pi (..., M) with member log-probs (..., M) or (..., M, V).

    Masked members have log_pi = -inf and drop out of the sum.
    """
    if member_logprobs.dim() == log_pi.dim() + 1:
        return torch.logsumexp(log_pi.unsqueeze(-1) + _at_least_float(member_logprobs), dim=-2)
    return torch.logsumexp(log_pi + _at_least_float(member_logprobs), dim=-1)


def log_pi(weights: Tensor) -> Tensor:
    """log pi[m] = log mean_h w[m, h] from merge weights (..., M, H)."""
    return _at_least_float(weights).mean(dim=-1).log()


def top_members(weights: Tensor, k: int) -> Tensor:
    """(B, M) bool: the k members with the largest mixture weight pi = mean_h w (B, M, H)."""
    pi = weights.mean(dim=-1)
    chosen = torch.zeros_like(pi, dtype=torch.bool)
    return chosen.scatter(-1, pi.topk(k, dim=-1).indices, True)


@torch.no_grad()
def routed_target_logprobs(
    merger: CorrelationMerger, states: Tensor, target_logprobs: Tensor, k: int, every: int, prefix: int
) -> Tensor:
    """Teacher-forced log-probs of the targets (B, T) under routing.

    states (B, T, M, D) and target_logprobs (B, T, M) are every member's true
    outputs (`run_members`). Positions before `prefix` are the prompt, where all
    members run, so they get the merged model's values; each block after it is
    scored as `RoutedDecoder` would decode it.
    """
    B, T, M, _ = states.shape
    check_routing(merger, k, every, prefix)
    result = mix(log_pi(merger.log_weights(states, target_logprobs).exp()), target_logprobs)  # (B, T)  # (B, T)
    for t0 in range(prefix, T, every):
        t1 = min(t0 + every, T)
        chosen = top_members(merger.log_weights(states[:, :t0], target_logprobs[:, :t0])[:, -1].exp(), k)  # (B, M)
        held = states[:, t0 - 1 : t0].expand(B, t1 - t0, M, states.size(-1))
        block = torch.where(chosen[:, None, :, None], states[:, t0:t1], held)
        mask = torch.ones(B, t1, M, dtype=torch.bool, device=states.device)
        mask[:, t0:] = chosen[:, None]
        w = merger.log_weights(torch.cat([states[:, :t0], block], dim=1), target_logprobs[:, :t1], member_mask=mask).exp()
        result[:, t0:t1] = mix(log_pi(w[:, t0:]), target_logprobs[:, t0:t1])
    return result


class RoutedDecoder:
    """Decode one sequence through the top-k members, re-chosen every `every` tokens.

    `prefill(prompt)` runs every member on the prompt (1, P) and returns the
    merged model's next-token log-probs; each `step(token)` feeds one token
    (1, 1) and returns the routed mixture's log-probs (1, V). One sequence per
    decoder: members are chosen per sequence, and a batched decode cache
    cannot skip rows. `member_steps` counts member-token forwards (catch-up
    included), the work routing saves.
    """

    def __init__(self, ensemble: LeviathanEnsemble, k: int, every: int) -> None:
        self.ensemble, self.merger, self.k, self.every = ensemble, ensemble.merger, k, every
        self.M = ensemble.config.num_members
        self.caches = [m.new_cache() for m in ensemble.members]
        self.member_steps = 0

    def _run(self, members: list[int], tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Run the given members on tokens (1, n): states (1, n, m, D), log-probs (1, n, m, V)."""
        out = run_members(
            [self.ensemble.members[i] for i in members],
            [self.ensemble.projections[i] for i in members],
            tokens,
            full_logprobs=True,
            caches=[self.caches[i] for i in members],
        )
        self.member_steps += len(members) * tokens.size(1)
        return out.states.permute(1, 2, 0, 3), out.logprobs.permute(1, 2, 0, 3)

    def _input_logprobs(self, tokens: Tensor, logprobs: Tensor, members: list[int]) -> Tensor:
        """a[s] = log p_m(x_s | x_<s) (1, n, m) of tokens (1, n) from the log-probs before each."""
        before = torch.cat([self.last_logprobs[:, None, members], logprobs[:, :-1]], dim=1)  # (1, n, m, V)
        return before.gather(-1, tokens[:, :, None, None].expand(*before.shape[:3], 1)).squeeze(-1)

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        if prompt.dim() != 2 or prompt.size(0) != 1:
            raise ValueError(f"prompt: one sequence (1, P) per decoder, got {tuple(prompt.shape)}")
        check_routing(self.merger, self.k, self.every, prompt.size(1))
        everyone = list(range(self.M))
        states, logprobs = self._run(everyone, prompt)
        first = logprobs.new_zeros(1, 1, self.M)
        rest = logprobs[:, :-1].gather(-1, prompt[:, 1:, None, None].expand(1, prompt.size(1) - 1, self.M, 1))
        self.states = states  # (1, t, M, D): every member's state so far (held ones replaced at catch-up)
        self.input_lp = torch.cat([first, rest.squeeze(-1)], dim=1)  # (1, t, M)
        self.last_logprobs = logprobs[:, -1]  # (1, M, V)
        self.missed: list[Tensor] = []
        self.chosen = everyone
        self._choose()
        return mix(log_pi(self.prompt_weights), logprobs[:, -1])

    def _choose(self) -> None:
        """Block start: rebuild the merger's cache over exact history, then pick the top k."""
        self.merge_cache = MergeCache()
        weights = self.merger.log_weights(self.states, cache=self.merge_cache, input_lp=self.input_lp).exp()
        self.prompt_weights = weights[:, -1]  # (1, M, H) at t0 - 1
        mask = top_members(self.prompt_weights, self.k)[0]
        self.chosen = [m for m in range(self.M) if mask[m]]
        self.mask = mask.view(1, 1, self.M)
        self.block_start, self.filled = self.states.size(1), 0

    def _catch_up(self) -> None:
        """The members that sat out the block run its tokens in one chunk: exact history again."""
        idle = [m for m in range(self.M) if m not in self.chosen]
        tokens = torch.cat(self.missed, dim=1)  # (1, n)
        states, logprobs = self._run(idle, tokens)
        t0 = self.block_start
        self.states[:, t0:, idle] = states
        self.input_lp[:, t0:, idle] = self._input_logprobs(tokens, logprobs, idle)
        self.last_logprobs[:, idle] = logprobs[:, -1]
        self.missed = []

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        if self.filled == self.every:
            self._catch_up()
            self._choose()
        chosen = self.chosen
        states, logprobs = self._run(chosen, token)  # (1, 1, k, D), (1, 1, k, V)
        a = self._input_logprobs(token, logprobs, chosen)  # (1, 1, k)
        step_states = self.states[:, self.block_start - 1 : self.block_start].clone()  # held: last known
        step_states[:, :, chosen] = states
        step_a = torch.zeros(1, 1, self.M, dtype=self.input_lp.dtype)
        step_a[:, :, chosen] = a.to(step_a.dtype)
        self.states = torch.cat([self.states, step_states], dim=1)
        self.input_lp = torch.cat([self.input_lp, step_a], dim=1)
        self.last_logprobs[:, chosen] = logprobs[:, -1]
        self.missed.append(token)
        self.filled += 1
        weights = self.merger.log_weights(step_states, None, self.merge_cache, step_a, self.mask).exp()
        return mix(log_pi(weights[:, -1, chosen]), logprobs[:, -1])  # (1, V)
