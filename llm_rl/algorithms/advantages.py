"""Return and advantage estimators.

Token-level tensors are ``(batch, resp_len)`` with a ``mask`` marking real
response tokens. Masks are expected to be right-padded (valid prefix, then
zeros after EOS); a masked position ends the episode, so nothing is
bootstrapped past the last valid token.

Critic-free estimators take one scalar score per completion, with the
completions of a prompt stored as consecutive rows: rows ``[0, g)`` belong to
prompt 0, rows ``[g, 2g)`` to prompt 1, and so on (``g = group_size``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from llm_rl.algorithms.ops import masked_mean_var, masked_whiten
from llm_rl.config.variants import ADVANTAGE_ESTIMATORS

Tensor = torch.Tensor


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` over valid positions.

    rewards, mask: ``(batch, resp_len)`` -> ``(batch, resp_len)``.
    ``G_t = m_t * (r_t + gamma * G_{t+1})`` with ``G_{resp_len} = 0``: masked
    positions are 0 and the sum stops at the last valid token (no bootstrap).
    """
    m = mask.to(rewards.dtype)
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = m[:, t] * (rewards[:, t] + gamma * running)
        out.append(running)
    return torch.stack(out[::-1], dim=1)


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation.

    rewards, values, mask: ``(batch, resp_len)``. Returns ``(advantages, returns)``,
    both ``(batch, resp_len)``:

    ``delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t``
    ``A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}``
    ``returns_t = A_t + V_t``

    The value after the last valid token is taken as 0 (the episode ended), so
    values/rewards at padded positions never leak into valid ones; padded
    positions get advantage 0 and return 0.
    Reference: Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", eq. 16. The single-turn case of `action_gae`.
    """
    return action_gae(rewards, values, mask, gamma, lam)


def _grouped(scores: Tensor, group_size: int) -> Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (batch,), got shape {tuple(scores.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"batch size {scores.shape[0]} is not divisible by group_size {group_size}"
        )
    if not scores.is_floating_point():
        scores = scores.float()
    return scores.view(-1, group_size)


def _group_validity(valid: Tensor | None, groups: Tensor) -> Tensor:
    """(groups, g) float 0/1: which rows take part in their group's statistics (all by default)."""
    if valid is None:
        return torch.ones_like(groups)
    if valid.shape != (groups.numel(),):
        raise ValueError(f"valid must have shape ({groups.numel()},) like scores, got {tuple(valid.shape)}")
    return valid.to(groups.dtype).view_as(groups)


def grpo_advantages(scores: Tensor, group_size: int, eps: float = 1e-6, valid: Tensor | None = None,
                    scaling: str = "group", reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Group-normalised advantages (GRPO outcome supervision).

    scores: ``(batch,)`` -> ``(batch,)``,
    ``A_i = (s_i - mean_group) / (std + eps)``, the std by ``scaling``:
    ``group`` the unbiased sample std of the group; ``batch`` that of every
    valid score of the batch (of every process with ``reduce``, which sums a
    tensor over processes); ``none`` no division (Liu et al. 2025, "Understanding
    R1-Zero-Like Training", Dr. GRPO). A group of one, or a group whose scores
    are all equal, carries no learning signal and yields 0 (never NaN).
    ``valid`` ``(batch,)`` bool: rows outside it (a dropped sample's score is
    a placeholder) enter no mean or std and get 0; a group then has fewer
    members, and one with fewer than two valid rows yields 0.
    Reference: Shao et al. 2024, "DeepSeekMath", Section 4.1.2.
    """
    groups = _grouped(scores, group_size)  # (n_groups, g)
    m = _group_validity(valid, groups)
    n = m.sum(dim=1, keepdim=True)  # (n_groups, 1) valid members
    mean = (groups * m).sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = groups - mean
    if scaling == "group":
        # unbiased std over valid members; a group of one has no spread (0/0 avoided by the clamp)
        centred = centred / ((centred * m).square().sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt().add(eps)
    elif scaling == "batch":
        centred = centred / masked_mean_var(groups, m, reduce)[1].sqrt().add(eps)
    elif scaling != "none":
        raise ValueError(f"scaling is group, batch or none, got {scaling!r}")
    scored = (m > 0) & (n >= 2)
    return torch.where(scored, centred, torch.zeros_like(groups)).view(-1)


def rloo_advantages(scores: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """REINFORCE Leave-One-Out advantages.

    scores: ``(batch,)`` -> ``(batch,)``,
    ``A_i = s_i - (1 / (g - 1)) * sum_{j != i} s_j``: the baseline for each
    sample is the mean of the other samples of its prompt, so it is
    independent of the sample itself (unbiased). ``group_size == 1`` has no
    other sample and returns 0.
    ``valid`` ``(batch,)`` bool: rows outside it are nobody's baseline and get
    0; ``g`` is then the group's count of valid rows (0 when below two).
    Reference: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
    Style Optimization for Learning from Human Feedback in LLMs".
    """
    groups = _grouped(scores, group_size)  # (n_groups, g)
    m = _group_validity(valid, groups)
    n = m.sum(dim=1, keepdim=True)  # (n_groups, 1) valid members
    others_mean = ((groups * m).sum(dim=1, keepdim=True) - groups * m) / (n - 1).clamp(min=1)
    return ((groups - others_mean) * m * (n >= 2)).view(-1)


def reinforce_pp_advantages(
    rewards: Tensor, mask: Tensor, gamma: float = 1.0, eps: float = 1e-8, reduce=None
) -> Tensor:
    """REINFORCE++ advantages: batch-whitened discounted returns.

    rewards, mask: ``(batch, resp_len)`` per-token rewards (the caller has
    already folded in the per-token KL penalty) -> ``(batch, resp_len)``.
    ``A = whiten(G)`` where ``G_t = sum_{k>=t} gamma^(k-t) r_k`` and the mean
    and (unbiased) std are taken over every valid token in the batch, which
    replaces a critic with a global baseline. Padded positions are 0.
    ``reduce`` sums the statistics over processes (see ``masked_whiten``).
    Reference: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for
    Aligning Large Language Models".
    """
    returns = discounted_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask, shift_mean=True, eps=eps, reduce=reduce)


def prefix_diff_advantages(
    prefix_scores: Tensor, prompt_score: Tensor, mask: Tensor, rewards: Tensor | None = None
) -> Tensor:
    """Advantages as score increments of successive response prefixes.

    prefix_scores: ``(batch, resp_len)`` with ``Q_t = score(prompt + response[:t+1])``;
    prompt_score: ``(batch,)``, the score of the bare prompt (``Q_{-1}``).
    Returns ``(batch, resp_len)``: ``A_t = m_t * (Q_t - Q_{t-1})``, so each
    token is credited with how much it changed the score. The increments of
    the valid prefix telescope to ``Q_last - Q_{-1}``.

    With ``rewards`` ``(batch, resp_len)`` (KL penalty, token rewards and the
    sequence score on the last token, as every estimator sees them) the prefix
    scores serve as the critic of a TD(0) advantage,
    ``A_t = r_t + Q_t - Q_{t-1}`` with no ``Q`` after the last valid token:
    ``A_last = r_last - Q_{last-1}``. A sequence's credit then sums to
    ``sum_t r_t - Q_{-1}``: the rewards decide how much, the reward model only
    how it is spread over the tokens. When ``r`` is the score ``Q_last`` on the
    last token this equals the form without rewards.
    """
    m = mask.to(prefix_scores.dtype)
    previous = torch.cat(
        [prompt_score.to(prefix_scores.dtype).unsqueeze(1), prefix_scores[:, :-1]], dim=1
    )
    if rewards is None:
        return (prefix_scores - previous) * m
    # right-padded mask: 1 at the last valid token only, where the episode ends
    is_last = m - torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
    return (rewards + prefix_scores * (1 - is_last) - previous) * m


def action_gae(
    rewards: Tensor,
    values: Tensor,
    action_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    turn_ends: Tensor | None = None,
    final_values: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GAE over the action tokens of a sequence that also holds context tokens (multi-turn episodes).

    rewards, values, action_mask: ``(batch, len)``; positions outside ``action_mask`` (observations,
    padding) are skipped: the step after action ``t`` is the next *action* token, wherever it is.
    ``turn_ends`` ``(batch, len)`` bool marks the last token of each turn; with it ``gamma`` is applied
    once per turn boundary and 1 within a turn (turn discount), without it once per action token.
    ``final_values`` ``(batch,)``: V of the state after the last action, for episodes cut before they
    were done (0, the default, when they ended). Returns ``(advantages, returns)``, 0 off the actions:

    ``delta_t = r_t + gamma_t * V_next(t) - V_t``, ``A_t = delta_t + gamma_t * lam * A_next(t)``.

    With right-padded single-turn masks, no turn_ends and no final values this is ``compute_gae``.
    """
    m = action_mask.bool()
    dtype = values.dtype
    step_gamma = torch.full_like(values, gamma)
    if turn_ends is not None:
        step_gamma = torch.where(turn_ends.bool(), step_gamma, torch.ones_like(step_gamma))
    next_value = final_values.to(dtype) if final_values is not None else torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advs = []
    for t in reversed(range(values.shape[1])):
        g = step_gamma[:, t]
        adv = rewards[:, t] + g * next_value - values[:, t] + g * lam * next_adv
        next_value = torch.where(m[:, t], values[:, t], next_value)
        next_adv = torch.where(m[:, t], adv, next_adv)
        advs.append(torch.where(m[:, t], adv, torch.zeros_like(adv)))
    advantages = torch.stack(advs[::-1], dim=1)
    returns = (advantages + values) * m.to(dtype)
    return advantages, returns


# ====================================================================== the estimators, as a table
@dataclass(frozen=True)
class EstimatorInput:
    """Everything an estimator may read; each reads what it needs. Per-token tensors are (batch, len)."""

    rewards: Tensor  # per-token rewards: -beta * KL, token scores, the sequence score on the last token
    mask: Tensor  # the actions: the policy's tokens of rows that get a loss
    gamma: float = 1.0
    lam: float = 0.95
    values: Optional[Tensor] = None  # V_old (gae)
    group_size: int = 1  # completions per prompt, on consecutive rows (grpo, rloo)
    prefix: Optional[tuple] = None  # prefix_diff: ((batch, len) Q_t, (batch,) Q_{-1})
    # multi-turn episodes: observations between the actions (the mask has holes), a discount per turn
    episodes: bool = False
    turn_ends: Optional[Tensor] = None  # (batch, len) bool: gamma per turn boundary; None: per action token
    final_values: Optional[Tensor] = None  # (batch,) V after episodes cut before done
    reduce: Optional[Callable[[Tensor], Tensor]] = None  # sums batch statistics over processes
    scaling: str = "group"  # grpo: the std its advantages are divided by (group, batch or none)


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator and what the trainer must know about it (the properties of its entry in
    llm_rl.config.variants.ADVANTAGE_ESTIMATORS)."""

    estimate: Callable[[EstimatorInput], tuple[Tensor, Optional[Tensor]]]  # -> (advantages, value targets or None)
    needs_values: bool  # trains a value head (the critic)
    whitened_by_trainer: bool  # whiten_advantages applies (else the estimator normalises its advantages itself)


def returns_to_go(x: EstimatorInput) -> Tensor:
    """(batch, len) the discounted reward to go at every action, skipping observations."""
    return action_gae(x.rewards, torch.zeros_like(x.rewards), x.mask, x.gamma, 1.0, x.turn_ends)[1]


def sequence_returns(x: EstimatorInput) -> Tensor:
    """(batch,) what group estimators compare: a completion's summed rewards, or an episode's discounted
    return (the return to go at its first action)."""
    if not x.episodes:
        return (x.rewards * x.mask).sum(dim=1)
    first = x.mask.float().argmax(dim=1)
    return returns_to_go(x).gather(1, first[:, None])[:, 0]


def _gae(x: EstimatorInput):
    return action_gae(x.rewards, x.values, x.mask, x.gamma, x.lam, x.turn_ends, x.final_values)


def _grouped_estimator(group_fn, options=lambda x: {}):
    """`group_fn(returns, group_size, valid=..., **options(x))` as an estimator."""
    def estimate(x: EstimatorInput):
        kept = x.mask.sum(dim=1) > 0  # a row dropped for an invalid reward joins no group statistic
        return group_fn(sequence_returns(x), x.group_size, valid=kept, **options(x))[:, None] * x.mask, None
    return estimate


def _reinforce_pp(x: EstimatorInput):
    return masked_whiten(returns_to_go(x), x.mask, shift_mean=True, eps=1e-8, reduce=x.reduce), None


def _prefix_diff(x: EstimatorInput):
    prefix, prompt_score = x.prefix
    return prefix_diff_advantages(prefix, prompt_score, x.mask, x.rewards), None


# each estimator's function, keyed by its name in the config's variant table
_ESTIMATE = {
    "gae": _gae,
    "grpo": _grouped_estimator(grpo_advantages, lambda x: {"scaling": x.scaling, "reduce": x.reduce}),
    "rloo": _grouped_estimator(rloo_advantages),
    "reinforce_pp": _reinforce_pp,
    "prefix_diff": _prefix_diff,
}
assert set(_ESTIMATE) == set(ADVANTAGE_ESTIMATORS), "advantages._ESTIMATE and config ADVANTAGE_ESTIMATORS disagree"

ESTIMATORS: dict[str, Estimator] = {
    name: Estimator(_ESTIMATE[name], needs_values=v.needs_values, whitened_by_trainer=v.whitened_by_trainer)
    for name, v in ADVANTAGE_ESTIMATORS.items()
}
