"""PPO clipped policy and value losses.

All per-token tensors are ``(batch, resp_len)``; ``mask`` marks valid
response tokens. Each loss returns ``(loss, stats)`` where ``stats`` holds
detached scalar tensors for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from llm_rl.algorithms.ops import masked_mean, masked_sum
from llm_rl.config import variants
from llm_rl.config.variants import DEFAULT_LOSS_AGGREGATION, default_kl_estimator

Tensor = torch.Tensor

LOSS_AGGREGATIONS = tuple(variants.LOSS_AGGREGATIONS)


def _token_mean(per_token_loss: Tensor, mask: Tensor, normalizer: Optional[Tensor | float]) -> Tensor:
    if normalizer is None:
        return masked_mean(per_token_loss, mask)
    return masked_sum(per_token_loss, mask) / torch.as_tensor(normalizer).clamp(min=1)


def _seq_mean_token_mean(per_token_loss: Tensor, mask: Tensor, normalizer: Optional[Tensor | float]) -> Tensor:
    per_seq = masked_mean(per_token_loss, mask, dim=-1)  # (batch,), 0 for a row without tokens
    if normalizer is None:
        # Empty rows would otherwise count as a 0 loss and dilute the mean.
        has_tokens = mask.to(per_token_loss.dtype).sum(dim=-1) > 0
        return masked_mean(per_seq, has_tokens)
    return per_seq.sum() / torch.as_tensor(normalizer).clamp(min=1)


def _micro_batch_token_mean(per_token_loss: Tensor, mask: Tensor, normalizer: Optional[Tensor | float]) -> Tensor:
    # this batch's own token mean; `normalizer` counts the micro-batches whose means are averaged
    mean = masked_mean(per_token_loss, mask)
    return mean if normalizer is None else mean / torch.as_tensor(normalizer).clamp(min=1)


def _token_sum_over_max_length(per_token_loss: Tensor, mask: Tensor, normalizer: Optional[Tensor | float]) -> Tensor:
    # a constant divisor, whatever the tokens: rows x the longest response (this batch's width when not given)
    divisor = mask.shape[0] * mask.shape[-1] if normalizer is None else normalizer
    return masked_sum(per_token_loss, mask) / torch.as_tensor(divisor).clamp(min=1)


@dataclass(frozen=True)
class Aggregation:
    """A loss aggregation's functions (its description: llm_rl.config.variants.LOSS_AGGREGATIONS)."""

    reduce: Callable[[Tensor, Tensor, Optional[Tensor | float]], Tensor]  # (per-token loss, mask, normalizer)
    # ((batch,) valid tokens per row, rows per micro-batch, longest response) -> what `reduce` divides by
    count: Callable[[Tensor, int, int], Tensor]


# keyed by the aggregation's name in the config's variant table
_AGGREGATIONS = {
    "token_mean": Aggregation(_token_mean, count=lambda tokens, micro, longest: tokens.sum()),
    "seq_mean_token_mean": Aggregation(_seq_mean_token_mean,
                                       count=lambda tokens, micro, longest: (tokens > 0).float().sum()),
    "micro_batch_token_mean": Aggregation(
        _micro_batch_token_mean, count=lambda tokens, micro, longest: tokens.new_tensor(-(-len(tokens) // micro))),
    "token_sum_over_max_length": Aggregation(
        _token_sum_over_max_length, count=lambda tokens, micro, longest: tokens.new_tensor(len(tokens) * longest)),
}
assert set(_AGGREGATIONS) == set(LOSS_AGGREGATIONS), "losses._AGGREGATIONS and config LOSS_AGGREGATIONS disagree"


def _aggregation(loss_agg: str) -> Aggregation:
    if loss_agg not in _AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; valid values: {', '.join(LOSS_AGGREGATIONS)}")
    return _AGGREGATIONS[loss_agg]


def aggregate_loss(
    per_token_loss: Tensor, mask: Tensor, loss_agg: str = DEFAULT_LOSS_AGGREGATION,
    normalizer: Tensor | float | None = None,
) -> Tensor:
    """Reduce a ``(batch, resp_len)`` per-token loss to a scalar, by ``loss_agg`` (one of `LOSS_AGGREGATIONS`):

    - ``token_mean``: ``sum(l * m) / sum(m)``, every valid token in the batch
      weighs the same (long responses dominate); TRL's ``dapo``.
    - ``seq_mean_token_mean``: mean over tokens within each sequence, then
      mean over sequences that have at least one valid token, so every
      response weighs the same regardless of length; TRL's ``grpo``.
    - ``micro_batch_token_mean``: the token mean of each micro-batch, then the
      mean over the micro-batches; TRL's ``bnpo`` (it changes with the split).
    - ``token_sum_over_max_length``: ``sum(l * m) / (rows * max_length)``, a
      constant divisor; TRL's ``dr_grpo``.

    ``normalizer``: divide by this count instead of the batch's own (see
    `loss_normalizer`). Given the count of a whole mini-batch (all
    micro-batches, all processes), each micro-batch's loss is its share of the
    mini-batch's loss, and the shares sum to it however the mini-batch is split
    (``micro_batch_token_mean`` sums the micro-batches' means over their number).
    A count below 1 is taken as 1. Empty input gives 0.
    """
    return _aggregation(loss_agg).reduce(per_token_loss, mask, normalizer)


def loss_normalizer(mask: Tensor, loss_agg: str = DEFAULT_LOSS_AGGREGATION, micro_batch_rows: Optional[int] = None,
                    max_length: Optional[int] = None) -> Tensor:
    """The count `aggregate_loss` divides by, for ``mask`` ``(batch, resp_len)`` split into micro-batches of
    ``micro_batch_rows`` (default: one): valid tokens (``token_mean``), sequences with a valid token
    (``seq_mean_token_mean``), micro-batches (``micro_batch_token_mean``), or rows x ``max_length`` (default
    resp_len; ``token_sum_over_max_length``). A float scalar, so the counts of micro-batches and processes
    can be summed into the mini-batch's."""
    tokens = mask.float().sum(dim=-1)
    return _aggregation(loss_agg).count(tokens, micro_batch_rows or max(len(tokens), 1), max_length or mask.shape[-1])


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    dual_clip: float | None = None,
    loss_agg: str = DEFAULT_LOSS_AGGREGATION,
    normalizer: Tensor | float | None = None,
    token_weights: Tensor | None = None,
    clip_range_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate objective (as a loss to minimise).

    logprobs: ``(batch, resp_len)`` under the current policy (with grad);
    old_logprobs, advantages: ``(batch, resp_len)`` from the rollout, treated
    as constants (detached here).

    ``ratio = exp(logprobs - old_logprobs)``
    ``l_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps_high))``
    (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7), with ``eps_high =
    clip_range_high`` (None: ``clip_range``, symmetric); a larger upper bound is DAPO's clip-higher
    (Yu et al. 2025, "DAPO", sec. 3.1).

    Dual clip with ``c > 1``: for ``A_t < 0`` the loss is capped,
    ``l_t = min(l_t, -c * A_t)``, so a very large ratio on a bad action cannot
    produce an unbounded update (Ye et al. 2020, "Mastering Complex Control in
    MOBA Games with Deep Reinforcement Learning", eq. 5).

    Stats: ``clipfrac`` (fraction of valid tokens where the clipped branch is
    the active max), ``approx_kl`` (masked mean of ``0.5 * log_ratio^2``),
    ``ratio_mean``, ``ratio_max``, and ``dual_clipfrac`` when dual clip is on:
    means over this batch, whatever ``normalizer`` (see `aggregate_loss`) is.

    ``token_weights`` ``(batch, resp_len)``, constants: each token's loss ``l_t`` is multiplied by its weight
    (a rollout engine's importance ratio, llm_rl.algorithms.rollout_correction); None: all 1.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    high = clip_range if clip_range_high is None else clip_range_high
    if high <= 0:
        raise ValueError(f"clip_range_high must be > 0, got {clip_range_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")

    valid = mask.bool()
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()

    # Padding may hold arbitrary log-probs; exp of a huge difference would be
    # inf, and inf * 0 in the masked mean gives NaN. Forcing ratio = 1 there
    # keeps both the forward and the backward pass finite.
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)

    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)

    stats: dict[str, Tensor] = {}
    if dual_clip is not None:
        cap = -advantages * dual_clip
        capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(capped, cap, per_token)
        stats["dual_clipfrac"] = masked_mean(capped.to(logprobs.dtype), mask).detach()
    if token_weights is not None:
        per_token = per_token * token_weights.detach()

    loss = aggregate_loss(per_token, mask, loss_agg, normalizer)

    with torch.no_grad():
        stats["clipfrac"] = masked_mean((pg_clipped > pg_unclipped).to(logprobs.dtype), mask)
        stats["approx_kl"] = masked_mean(0.5 * log_ratio.square(), mask)
        stats["ratio_mean"] = masked_mean(ratio, mask)
        # ratio > 0, so filling padding with 0 leaves the valid max (or 0 if empty).
        stats["ratio_max"] = torch.where(valid, ratio, torch.zeros_like(ratio)).max()
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float | None = 0.2,
    loss_agg: str = DEFAULT_LOSS_AGGREGATION,
    normalizer: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value-function loss.

    values: ``(batch, resp_len)`` current predictions (with grad);
    old_values, returns: ``(batch, resp_len)`` from the rollout (detached here).

    ``V_clip = V_old + clip(V - V_old, -c, c)``
    ``l_t = 0.5 * max((V - R)^2, (V_clip - R)^2)``

    The pessimistic max keeps the critic from moving more than ``c`` away from
    its rollout-time prediction in one update. ``clip_range_value=None`` gives
    the plain ``0.5 * (V - R)^2``.
    Stats: ``vf_clipfrac`` (fraction of valid tokens where the clipped error
    is the larger one) and ``value_error`` (masked mean of ``(V - R)^2``).
    ``loss_agg`` and ``normalizer`` as in `aggregate_loss`.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    err_unclipped = (values - returns).square()

    if clip_range_value is None:
        per_token = 0.5 * err_unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        if clip_range_value <= 0:
            raise ValueError(f"clip_range_value must be > 0 or None, got {clip_range_value}")
        v_clipped = old_values + torch.clamp(
            values - old_values, -clip_range_value, clip_range_value
        )
        err_clipped = (v_clipped - returns).square()
        per_token = 0.5 * torch.maximum(err_unclipped, err_clipped)
        clipfrac = masked_mean((err_clipped > err_unclipped).to(values.dtype), mask)

    loss = aggregate_loss(per_token, mask, loss_agg, normalizer)
    stats = {
        "vf_clipfrac": clipfrac.detach(),
        "value_error": masked_mean(err_unclipped, mask).detach(),
    }
    return loss, stats


@dataclass(frozen=True)
class PPOCoefficients:
    """The scalar settings of the PPO loss (`ppo_objective`); the trainer builds them from the config's
    ppo section once per update (kl_coef follows the KL controller)."""

    clip_range: float = 0.2  # ratio clip epsilon
    clip_range_high: Optional[float] = None  # upper clip epsilon (None: clip_range)
    dual_clip: Optional[float] = None  # c > 1 bounds the loss of negative advantages (None: off)
    clip_range_value: Optional[float] = 0.2  # value clip (None: off)
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    kl_coef: float = 0.0  # weight of the KL term (only with ref_logprobs, kl_placement: loss)
    kl_estimator: str = default_kl_estimator("loss")
    kl_ratio_weighted: bool = False  # the KL term of each token times pi / pi_old (with its gradient)
    loss_agg: str = DEFAULT_LOSS_AGGREGATION


def ppo_objective(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    token_entropy: Tensor,
    values: Tensor | None = None,
    old_values: Tensor | None = None,
    returns: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    coefficients: PPOCoefficients = PPOCoefficients(),
    normalizer: Tensor | float | None = None,
    importance_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The whole PPO loss of a batch, and its metrics under their logged names.

    ``loss = policy + vf_coef * value - ent_coef * entropy (+ kl_coef * KL)`` (`coefficients`), every term
    aggregated by ``loss_agg`` over ``mask`` and divided by ``normalizer`` (see `aggregate_loss`). All per-token inputs
    are ``(batch, resp_len)``; ``logprobs``, ``values`` and ``token_entropy`` carry the gradient, the rest
    are rollout constants. ``values=None``: no critic (no value term). ``ref_logprobs`` given: KL to the
    reference as a loss term (``kl_placement: loss``) with ``kl_estimator``, masked before its ``exp``; with
    ``kl_ratio_weighted`` each token's KL is multiplied by ``pi / pi_old`` (1 in value on-policy, not in
    gradient), which makes the term's gradient that of the reverse KL (TRL's ``use_bias_correction_kl``).
    ``importance_weights``: the policy term's per-token weights (`policy_loss`'s ``token_weights``).
    """
    from llm_rl.algorithms.kl import kl_penalty

    c, loss_agg = coefficients, coefficients.loss_agg
    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=c.clip_range,
                                    dual_clip=c.dual_clip, loss_agg=loss_agg, normalizer=normalizer,
                                    token_weights=importance_weights, clip_range_high=c.clip_range_high)
    loss, stats = pg_loss, {"loss/policy": pg_loss.detach()}
    if values is not None:
        vf_loss, vf_stats = value_loss(values.float(), old_values, returns, mask, clip_range_value=c.clip_range_value,
                                       loss_agg=loss_agg, normalizer=normalizer)
        loss = loss + c.vf_coef * vf_loss
        stats.update({"loss/value": vf_loss.detach(), "value/clipfrac": vf_stats["vf_clipfrac"],
                      "value/error": vf_stats["value_error"]})
    else:
        stats["loss/value"] = torch.zeros((), device=logprobs.device)
    entropy = aggregate_loss(token_entropy, mask, loss_agg, normalizer)
    loss = loss - c.ent_coef * entropy
    valid = mask.bool()
    if ref_logprobs is not None:
        token_kl = kl_penalty(logprobs, ref_logprobs, c.kl_estimator, mask)
        if c.kl_ratio_weighted:
            token_kl = token_kl * torch.where(valid, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs)).exp()
        kl = aggregate_loss(token_kl, mask, loss_agg, normalizer)
        loss = loss + c.kl_coef * kl
        stats["loss/kl"] = kl.detach()
    stats.update({
        "loss/total": loss.detach(),
        "entropy": entropy.detach(),
        "policy/clipfrac": pg_stats["clipfrac"],
        "policy/approx_kl": pg_stats["approx_kl"],
        # before any step this is 0 (ratio 1): otherwise rollout and training forwards disagree
        "policy/ratio_max_dev": (logprobs.detach() - old_logprobs).exp().sub(1).abs().masked_fill(~valid, 0).max(),
    })
    return loss, stats


def pairwise_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a reward model on preference pairs, and its accuracy.

    chosen_scores, rejected_scores: (batch,) scores r_c, r_r; margin: (batch,) or a float m
    that r_c must exceed r_r by (Touvron et al. 2023, Llama 2, eq. 2), default 0.

        loss = mean(-log sigmoid(r_c - r_r - m)) + center_coef * mean((r_c + r_r)^2)

    The second term pulls each pair's scores to sum to zero, so rewards stay centred
    (Eisenstein et al. 2023, "Helping or Herding?", sec. 3). `logsigmoid` keeps the
    first term finite for any score gap. Stats (detached): `accuracy`, the fraction of
    pairs with r_c > r_r (a tie counts as wrong), and `margin`, the mean of r_c - r_r.
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(
            f"chosen and rejected scores must both be (batch,), got {tuple(chosen_scores.shape)} "
            f"and {tuple(rejected_scores.shape)}"
        )
    gap = chosen_scores - rejected_scores
    shifted = gap if margin is None else gap - torch.as_tensor(margin, dtype=gap.dtype, device=gap.device)
    loss = -torch.nn.functional.logsigmoid(shifted).mean()
    if center_coef:
        loss = loss + center_coef * (chosen_scores + rejected_scores).pow(2).mean()
    stats = {"accuracy": (gap > 0).float().mean().detach(), "margin": gap.mean().detach()}
    return loss, stats
