"""Training-free expert-tracking baselines over the members, and their tuning.

Both mix the members' target log-probs member_lp (N, T, M), the tensor the
merger sees, with causal weights: the weights used at position t depend on
y_<t only.

- ``fixed share`` (Herbster & Warmuth 1998): w[0] = 1/M and
      v_m      = w_m[t] p_m(y_t) / sum_k w_k[t] p_k(y_t)      (Bayes update)
      w_m[t+1] = (1 - alpha) v_m + alpha / M                  (share a fraction alpha)
  so the mixture can move to a member that starts predicting well after a
  change of domain, however far behind it was.
- ``decayed posterior``: w[0] = 1/M and
      log w_m[t+1] = gamma * log w_m[t] + beta * log p_m(y_t), normalised over m,
  which is w_m[t] = softmax_m(beta * sum_{s<t} gamma^(t-1-s) log p_m(y_s)):
  the merger's evidence term alone (its state term zeroed and a single head).
  beta = gamma = 1 is the running posterior.

`tune_baselines` picks alpha and (beta, gamma) from fixed grids by the mean NLL
of the scored positions of a set of windows, every grid point at once (the
recursion runs once over T with the grid as a batch axis). Pure PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

ALPHA_GRID = tuple(float(f"{1e-4 * 3000 ** (i / 12):.3g}") for i in range(13))  # 1e-4 .. 0.3, log-spaced
BETA_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
GAMMA_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)


@dataclass(frozen=True)
class BaselineSettings:
    """The tracking baselines' settings. The defaults are used until `tune_baselines` has run
    (e.g. the evaluations during phase 1); report.json records the ones a table used."""

    alpha: float = 0.01
    beta: float = 1.0
    gamma: float = 0.9
    tuned: bool = False

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def _fixed_share_steps(member_lp: torch.Tensor, alpha: torch.Tensor | float) -> Iterator[torch.Tensor]:
    """log w[t] (..., N, M) of fixed share for t = 0 .. T-1."""
    alpha = torch.as_tensor(alpha, dtype=member_lp.dtype, device=member_lp.device)
    shape = alpha.shape + (1, 1)  # broadcast over (N, M)
    log_keep = torch.log1p(-alpha).reshape(shape)
    log_share = (torch.log(alpha) - math.log(member_lp.shape[-1])).reshape(shape)
    N, T, M = member_lp.shape
    log_w = member_lp.new_full(alpha.shape + (N, M), -math.log(M))
    for t in range(T):
        yield log_w
        v = F.log_softmax(log_w + member_lp[:, t], dim=-1)
        log_w = torch.logaddexp(log_keep + v, log_share)


def fixed_share_log_weights(member_lp: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """log w (..., N, T, M) of fixed share for member_lp (N, T, M) and alpha (a float, or (G,)
    for a grid: the result then has a leading (G,) axis)."""
    return torch.stack(list(_fixed_share_steps(member_lp, alpha)), dim=-2)


def _decayed_steps(
    member_lp: torch.Tensor, beta: torch.Tensor | float, gamma: torch.Tensor | float
) -> Iterator[torch.Tensor]:
    """log w[t] (..., N, M) of the decayed posterior for t = 0 .. T-1."""
    beta = torch.as_tensor(beta, dtype=member_lp.dtype, device=member_lp.device)
    gamma = torch.as_tensor(gamma, dtype=member_lp.dtype, device=member_lp.device)
    shape = beta.shape + (1, 1)
    beta, gamma = beta.reshape(shape), gamma.reshape(shape)
    N, T, M = member_lp.shape
    e = member_lp.new_zeros(beta.shape[:-2] + (N, M))  # sum_{s<t} gamma^(t-1-s) log p_m(y_s)
    for t in range(T):
        yield F.log_softmax(beta * e, dim=-1)
        e = gamma * e + member_lp[:, t]


def decayed_log_weights(
    member_lp: torch.Tensor, beta: torch.Tensor | float, gamma: torch.Tensor | float
) -> torch.Tensor:
    """log w (..., N, T, M) of the decayed posterior for member_lp (N, T, M); beta and gamma
    floats or equal-shaped (G,) grids (a leading (G,) axis in the result)."""
    return torch.stack(list(_decayed_steps(member_lp, beta, gamma)), dim=-2)


def _grid_nll(steps: Iterator[torch.Tensor], member_lp: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """Mean NLL (G,) over the windows' positions prefix_tokens.. of a grid's weights, summed as
    they are made (the (G, N, T, M) weights are never held at once)."""
    total = None
    for t, log_w in enumerate(steps):
        if t < prefix_tokens:
            continue
        nll = -torch.logsumexp(log_w + member_lp[:, t], dim=-1).sum(dim=-1)  # (G,)
        total = nll if total is None else total + nll
    return total / (member_lp.shape[0] * (member_lp.shape[1] - prefix_tokens))


def mixture_logprob(log_w: torch.Tensor, member_lp: torch.Tensor) -> torch.Tensor:
    """log sum_m w_m[t] p_m(y_t) (..., N, T) from log w (..., N, T, M) and member_lp (N, T, M)."""
    return torch.logsumexp(log_w + member_lp, dim=-1)


def fixed_share(member_lp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Fixed share's log p(y_t) (N, T)."""
    return mixture_logprob(fixed_share_log_weights(member_lp, alpha), member_lp)


def decayed_posterior(member_lp: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """The decayed posterior's log p(y_t) (N, T)."""
    return mixture_logprob(decayed_log_weights(member_lp, beta, gamma), member_lp)


def tune_baselines(member_lp: torch.Tensor, prefix_tokens: int) -> BaselineSettings:
    """alpha and (beta, gamma) with the lowest mean NLL on positions prefix_tokens.. of the
    windows member_lp (N, T, M) (train-split windows: never the val set), each from its grid."""
    if not 0 <= prefix_tokens < member_lp.shape[1]:
        raise ValueError(f"prefix_tokens: {prefix_tokens} must be in 0..{member_lp.shape[1] - 1}")
    lp = member_lp.double()
    alphas = torch.tensor(ALPHA_GRID, dtype=lp.dtype)
    fs = _grid_nll(_fixed_share_steps(lp, alphas), lp, prefix_tokens)  # (G,)
    pairs = [(b, g) for b in BETA_GRID for g in GAMMA_GRID]
    betas = torch.tensor([b for b, _ in pairs], dtype=lp.dtype)
    gammas = torch.tensor([g for _, g in pairs], dtype=lp.dtype)
    dp = _grid_nll(_decayed_steps(lp, betas, gammas), lp, prefix_tokens)
    beta, gamma = pairs[int(dp.argmin())]
    return BaselineSettings(alpha=ALPHA_GRID[int(fs.argmin())], beta=beta, gamma=gamma, tuned=True)
