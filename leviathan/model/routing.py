"""Sparse routing at inference: run only the top-k members, re-chosen every R tokens.

A mixture merger says, at every position, how much each member counts. When a
few members carry most of the weight, running the others is wasted work. A
routed decode runs k of the M members per sequence and re-chooses them every
`every` (R) tokens after the prompt, where every member runs:

- Inside a block only the chosen members run. The merger's softmax runs over
  them alone; every other member is held: its state is its last computed one,
  and its evidence a[s] = log p_m(x_s | x_<s), which it cannot know without
  running, is imputed as the routed model's own log-prob of x_s plus the
  member's mean excess over the model on the positions it did run (a held
  member keeps its standing). The merger's cache runs on over these rows, one
  position at a time, never rebuilt.
- At a block start the `probe` held members that weigh most catch up first
  (one chunked forward each over the tokens they missed), so the strongest
  contenders are weighed on exact evidence; then the merger's unmasked weights
  at the last position pick the top k. A chosen member that is still held
  catches up the same way (its decode cache must be exact to go on). Whoever
  catches up has its imputed evidence swapped for the exact one from the
  log-probs of that chunk (the merger's lag window of past state scores is
  left as it was). Members that stay out do no work at all.

With a residual merger the routed mixture gets the merger's correction and
is renormalised, read from every member's state as routing holds it (stale
for the held, exact for the chosen) and the routed weights (over the chosen).
With k = M nobody is held and this is the merged model. `routed_target_logprobs`
scores it teacher-forced from every member's full outputs (for evaluation) and
`RoutedDecoder` decodes it for real, running only what it needs; both drive
the same `RouteState`, and give the same log-probs (tests/test_routing.py).
Mixture merge only: a fusion merge has no member distributions to restrict.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .ensemble import CorrelationMerger, LeviathanEnsemble, MergeCache, _at_least_float, input_logprobs, run_members


def check_routing(merger: CorrelationMerger, k: int, every: int, prefix: int, probe: int = 1) -> None:
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
    if probe < 0:
        raise ValueError(f"probe: must be >= 0 held members, got {probe}")


def mix(log_pi: Tensor, member_logprobs: Tensor) -> Tensor:
    """log sum_m pi[m] p_m: log_pi (..., M) with member log-probs (..., M) or (..., M, V).

    Masked members have log_pi = -inf and drop out of the sum.
    """
    if member_logprobs.dim() == log_pi.dim() + 1:
        return torch.logsumexp(log_pi.unsqueeze(-1) + _at_least_float(member_logprobs), dim=-2)
    return torch.logsumexp(log_pi + _at_least_float(member_logprobs), dim=-1)


def routed_logprobs(merger: CorrelationMerger, log_w: Tensor, member_logprobs: Tensor, states: Tensor) -> Tensor:
    """The routed model's log-probs (B, T, V) from its log weights (B, T, M, H) (-inf for
    the members out), the members' log-probs (B, T, M, V) and states (B, T, M, D): the
    mixture, plus a residual merger's correction, renormalised."""
    weights = log_w.exp()
    mixed = mix(log_pi(weights), member_logprobs)
    if not merger.residual:
        return mixed
    return torch.log_softmax(mixed + merger.correction(states, weights).to(mixed.dtype), dim=-1)


def log_pi(weights: Tensor) -> Tensor:
    """log pi[m] = log mean_h w[m, h] from merge weights (..., M, H)."""
    return _at_least_float(weights).mean(dim=-1).log()


def top_members(weights: Tensor, k: int) -> Tensor:
    """(B, M) bool: the k members with the largest mixture weight pi = mean_h w (B, M, H)."""
    pi = weights.mean(dim=-1)
    chosen = torch.zeros_like(pi, dtype=torch.bool)
    return chosen.scatter(-1, pi.topk(k, dim=-1).indices, True)


class RouteState:
    """The routed merger over a batch of sequences (B): choice, held members, merge cache.

    Fed one position at a time with the chosen members' exact outputs, it fills
    in the held members and returns the routed merge weights. Whoever feeds it
    (the decoder, or the teacher-forced scorer from full outputs) supplies the
    exact evidence of entering members; it holds nothing else about them.
    """

    def __init__(
        self,
        merger: CorrelationMerger,
        k: int,
        every: int,
        states: Tensor,
        input_lp: Tensor,
        probe: int = 1,
        logprobs: Tensor | None = None,
        next_tokens: Tensor | None = None,
    ) -> None:
        """Run the prompt: states (B, P, M, D) and a[s] (B, P, M) of every member; see `prompt_log_weights`.

        A residual merger's model is not the plain mixture of the members' a[s]: it also
        needs their full log-probs `logprobs` (B, P, M, V) and the prompt's tokens after
        the first `next_tokens` (B, P - 1), and keeps the merged model's log-probs over
        the prompt as `prompt_logprobs` (B, P, V)."""
        B, P, M, _ = states.shape
        check_routing(merger, k, every, P, probe)
        self.merger, self.k, self.every = merger, k, every
        self.cache = MergeCache()
        self.prompt_log_weights = merger.log_weights(states, None, self.cache, input_lp)  # (B, P, M, H)
        self.last_log_weights = self.prompt_log_weights[:, -1]  # (B, M, H) unmasked, at the last position
        self.held = states[:, -1]  # (B, M, D)
        self.chosen = torch.ones(B, M, dtype=torch.bool, device=states.device)
        self.current = self.chosen.clone()  # the members whose decode caches have read every token
        self.probe = probe
        self.filled = every  # the first position after the prompt starts a block
        # sum over a held member's missing positions of gamma^(t - s) * (imputed a[s]), per head
        self.imputed = self.last_log_weights.new_zeros(B, M, merger.n_head)
        self._gamma: Tensor | None = None
        # each member's summed a[s] - (the model's log-prob of x_s) over the positions it ran, and their count
        if merger.residual:
            if logprobs is None or next_tokens is None:
                raise ValueError("logprobs: a residual merger needs the members' full log-probs and the prompt's tokens")
            self.prompt_logprobs = routed_logprobs(merger, self.prompt_log_weights, logprobs, states)  # (B, P, V)
            merged = self.prompt_logprobs[:, :-1].gather(-1, next_tokens[..., None]).squeeze(-1)  # (B, P - 1)
        else:
            merged = mix(log_pi(self.prompt_log_weights[:, :-1].exp()), input_lp[:, 1:])  # (B, P - 1)
        self.excess = (input_lp[:, 1:] - merged[..., None]).sum(dim=1).to(self.imputed.dtype)  # (B, M)
        self.runs = torch.full_like(self.excess, max(P - 1, 1))

    @property
    def block_start(self) -> bool:
        return self.filled == self.every

    def decay(self) -> Tensor:
        """gamma (H,) of the evidence (1 without evidence: nothing uses it then), read once per sequence."""
        if self._gamma is None:
            g = self.merger.gamma() if self.merger.evidence else torch.ones(self.merger.n_head)
            self._gamma = g.to(self.imputed)
        return self._gamma

    def start_block(self, catch_up: Callable[[Tensor], tuple[Tensor, Tensor]]) -> None:
        """Re-choose the members (see the module docstring): probe, choose, catch up the entering.

        catch_up(members (B, M) bool) brings those members up to date and returns their exact
        evidence over what they missed (B, M, H) and their last states (B, M, D).
        """
        if self.probe and not self.current.all():
            pi = self.last_log_weights.exp().mean(dim=-1).masked_fill(self.current, -1.0)  # (B, M), held only
            top = pi.topk(min(self.probe, pi.size(1)), dim=-1)
            probed = torch.zeros_like(self.current).scatter(-1, top.indices, top.values >= 0)
            if probed.any():
                self.enter(probed, *catch_up(probed))
        chosen = top_members(self.last_log_weights.exp(), self.k)
        entering = chosen & ~self.current
        self.chosen, self.filled = chosen, 0
        if entering.any():
            self.enter(entering, *catch_up(entering))

    def enter(self, members: Tensor, exact: Tensor, states: Tensor) -> None:
        """Swap the caught-up members' (B, M) imputed evidence for the exact one (B, M, H), the
        sum over their missed positions of gamma^(t - s) a[s], and hold their last states (B, M, D);
        the last weights follow the evidence."""
        self.held = torch.where(members[..., None], states.to(self.held.dtype), self.held)
        if self.merger.evidence and self.cache.evidence is not None:
            fix = torch.where(members[..., None], exact.to(self.imputed.dtype) - self.imputed, 0.0)
            self.cache.evidence = self.cache.evidence + fix.to(self.cache.evidence.dtype)
            score = self.last_log_weights + self.merger.beta * fix  # log w + the score's change
            self.last_log_weights = torch.log_softmax(score, dim=1)
        self.imputed = self.imputed.masked_fill(members[..., None], 0.0)
        self.current = self.current | members

    def impute(self, input_lp: Tensor, routed_lp: Tensor) -> Tensor:
        """a[t] (B, M) taken for the held members: the routed model's own log-prob of x_t plus the
        member's mean excess over the model while it ran (a member keeps its standing while held)."""
        return routed_lp[:, None] + self.excess / self.runs

    def advance(self, states: Tensor, input_lp: Tensor, routed_lp: Tensor) -> Tensor:
        """One position: the chosen members' states (B, M, D) and a[t] (B, M) (other rows are
        ignored), and the routed model's log-prob of x_t (B,). Returns log w (B, M, H) over the chosen."""
        chosen = self.chosen[..., None]
        self.held = torch.where(chosen, states, self.held)
        guess = self.impute(input_lp, routed_lp)  # (B, M)
        self.excess = self.excess + torch.where(self.chosen, input_lp.to(self.excess.dtype) - routed_lp[:, None], 0.0)
        self.runs = self.runs + self.chosen.to(self.runs.dtype)
        a = torch.where(self.chosen, input_lp, guess.to(input_lp.dtype))
        self.imputed = torch.where(chosen, 0.0, self.decay() * self.imputed + guess[..., None].to(self.imputed.dtype))
        log_w = self.merger.log_weights(self.held[:, None], None, self.cache, a[:, None])[:, 0]  # (B, M, H)
        self.last_log_weights = log_w
        self.filled += 1
        self.current = self.chosen.clone()
        masked = log_w.masked_fill(~chosen, float("-inf"))
        return masked - torch.logsumexp(masked, dim=1, keepdim=True)  # softmax over the chosen alone


@torch.no_grad()
def routed_target_logprobs(
    merger: CorrelationMerger,
    states: Tensor,
    target_logprobs: Tensor,
    k: int,
    every: int,
    prefix: int,
    probe: int = 1,
    *,
    logprobs: Tensor | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """Teacher-forced log-probs of the targets (B, T) under routing.

    states (B, T, M, D) and target_logprobs (B, T, M) are every member's true
    outputs (`run_members`). Positions before `prefix` are the prompt, where all
    members run, so they get the merged model's values; after it each position
    is scored as `RoutedDecoder` decodes it, through the same `RouteState`.
    A residual merger normalises over the vocabulary, so it also needs the
    members' full log-probs `logprobs` (B, T, M, V) and the `targets` (B, T).
    """
    B, T, M, _ = states.shape
    check_routing(merger, k, every, prefix, probe)
    if merger.residual:
        if logprobs is None or logprobs.shape[:3] != (B, T, M):
            got = None if logprobs is None else tuple(logprobs.shape)
            need = f"({B}, {T}, {M}, V)"
            raise ValueError(f"logprobs: a residual merger needs the members' full log-probs (B, T, M, V) = {need}, got {got}")
        if targets is None or targets.shape != (B, T):
            got = None if targets is None else tuple(targets.shape)
            raise ValueError(f"targets: a residual merger needs the targets (B, T) = ({B}, {T}), got {got}")
    a = input_logprobs(target_logprobs)  # (B, T, M)
    if merger.residual:
        prompt = (logprobs[:, :prefix], targets[:, : prefix - 1])
        route = RouteState(merger, k, every, states[:, :prefix], a[:, :prefix], probe, *prompt)
        prompt_lp = route.prompt_logprobs.gather(-1, targets[:, :prefix, None]).squeeze(-1)  # (B, P)
    else:
        route = RouteState(merger, k, every, states[:, :prefix], a[:, :prefix], probe)
        prompt_lp = mix(log_pi(route.prompt_log_weights.exp()), target_logprobs[:, :prefix])
    result = target_logprobs.new_empty(B, T, dtype=torch.promote_types(route.prompt_log_weights.dtype, target_logprobs.dtype))
    result[:, :prefix] = prompt_lp
    exact = torch.zeros_like(route.imputed)  # the held members' true evidence since they left

    def catch_up(members: Tensor) -> tuple[Tensor, Tensor]:
        """What a chunked catch-up gives at block start t: the evidence since they left, states at t - 1."""
        caught = torch.where(members[..., None], exact, 0.0)
        exact.masked_fill_(members[..., None], 0.0)
        return caught, states[:, t - 1]

    for t in range(prefix, T):
        if route.block_start:
            route.start_block(catch_up)
        log_w = route.advance(states[:, t], a[:, t], result[:, t - 1])
        exact.copy_(torch.where(route.current[..., None], 0.0, route.decay() * exact + a[:, t, :, None].to(exact.dtype)))
        if merger.residual:
            lp = routed_logprobs(merger, log_w[:, None], logprobs[:, t, None], route.held[:, None])  # (B, 1, V)
            result[:, t] = lp[:, 0].gather(-1, targets[:, t, None]).squeeze(-1)
        else:
            result[:, t] = mix(log_pi(log_w.exp()), target_logprobs[:, t])
    return result


class RoutedDecoder:
    """Decode one sequence through the top-k members, re-chosen every `every` tokens.

    `prefill(prompt)` runs every member on the prompt (1, P) and returns the
    merged model's next-token log-probs; each `step(token)` feeds one token
    (1, 1) and returns the routed mixture's log-probs (1, V). One sequence per
    decoder: members are chosen per sequence, and a batched decode cache
    cannot skip rows. `member_steps` counts member-token forwards (catch-up
    included), the work routing saves; `entries` counts members that came back
    in and caught up.
    """

    def __init__(self, ensemble: LeviathanEnsemble, k: int, every: int, probe: int = 1) -> None:
        self.ensemble, self.merger, self.k, self.every, self.probe = ensemble, ensemble.merger, k, every, probe
        self.M = ensemble.config.num_members
        self.caches = [m.new_cache() for m in ensemble.members]
        self.member_steps = self.entries = 0

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

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        if prompt.dim() != 2 or prompt.size(0) != 1:
            raise ValueError(f"prompt: one sequence (1, P) per decoder, got {tuple(prompt.shape)}")
        check_routing(self.merger, self.k, self.every, prompt.size(1), self.probe)
        states, logprobs = self._run(list(range(self.M)), prompt)
        first = logprobs.new_zeros(1, 1, self.M)
        rest = logprobs[:, :-1].gather(-1, prompt[:, 1:, None, None].expand(1, prompt.size(1) - 1, self.M, 1))
        input_lp = torch.cat([first, rest.squeeze(-1)], dim=1)
        if self.merger.residual:
            self.route = RouteState(self.merger, self.k, self.every, states, input_lp, self.probe, logprobs, prompt[:, 1:])
            self.out = self.route.prompt_logprobs[:, -1]  # (1, V)
        else:
            self.route = RouteState(self.merger, self.k, self.every, states, input_lp, self.probe)
            self.out = mix(log_pi(self.route.prompt_log_weights[:, -1].exp()), logprobs[:, -1])  # (1, V)
        self.tokens = [prompt]
        self.last_logprobs = logprobs[:, -1]  # (1, M, V): each member's log-probs after the last token it read
        return self.out

    def _catch_up(self, members: Tensor) -> tuple[Tensor, Tensor]:
        """The members (1, M) bool read the tokens they missed, one chunk each: their exact
        evidence over them (1, M, H) and their last states (1, M, D)."""
        exact = torch.zeros_like(self.route.imputed)
        last_states = self.route.held.clone()
        history = torch.cat(self.tokens, dim=1)  # (1, t)
        gamma = self.route.decay()
        for m in members[0].nonzero().flatten().tolist():
            missed = history[:, self.caches[m].length :]  # (1, n)
            if missed.size(1) == 0:
                continue  # already up to date: nothing missed, its held state is its last
            states, logprobs = self._run([m], missed)  # (1, n, 1, D), (1, n, 1, V)
            last_states[:, m] = states[:, -1, 0]
            before = torch.cat([self.last_logprobs[:, None, m], logprobs[:, :-1, 0]], dim=1)  # (1, n, V)
            a = before.gather(-1, missed[..., None])[0, :, 0].to(exact.dtype)  # (n,)
            ages = torch.arange(a.size(0) - 1, -1, -1, dtype=exact.dtype)  # t - s of each missed position
            exact[0, m] = (gamma[:, None] ** ages * a).sum(dim=-1)  # sum_s gamma^(t - s) a[s] per head
            self.last_logprobs[:, m] = logprobs[:, -1, 0]
            self.entries += 1
        return exact, last_states

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        route = self.route
        if route.block_start:
            route.start_block(self._catch_up)
        if route.filled == 0:
            self.chosen = route.chosen[0].nonzero().flatten().tolist()
        chosen = self.chosen
        states, logprobs = self._run(chosen, token)  # (1, 1, k, D), (1, 1, k, V)
        a = self.last_logprobs[:, chosen].gather(-1, token[:, None].expand(1, len(chosen), 1)).squeeze(-1)  # (1, k)
        full_states = route.held.clone()
        full_states[:, chosen] = states[:, 0]
        full_a = a.new_zeros(1, self.M)
        full_a[:, chosen] = a
        self.last_logprobs[:, chosen] = logprobs[:, 0]
        self.tokens.append(token)
        log_w = route.advance(full_states, full_a, self.out.gather(-1, token)[:, 0])
        if self.merger.residual:
            # the correction reads every member's state as routing holds it, with the weights over the chosen
            mixed = mix(log_pi(log_w[:, None, chosen].exp()), logprobs)  # (1, 1, V)
            correction = self.merger.correction(route.held[:, None], log_w[:, None].exp()).to(mixed.dtype)
            self.out = torch.log_softmax(mixed + correction, dim=-1)[:, 0]  # (1, V)
        else:
            self.out = mix(log_pi(log_w[:, chosen].exp()), logprobs[:, 0])  # (1, V)
        return self.out
