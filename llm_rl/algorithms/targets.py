"""Phase 4 of an update: from a rollout and its scores to what the loss trains towards.

    kl_t          = KL estimate of pi_old vs pi_ref at each action              (kl.kl_penalty)
    r_t           = -beta * kl_t + token score_t (+ the sequence score on the last action)
    A_t, returns  = the configured estimator over r (advantages.ESTIMATORS), whitened if it asks
    loss_mask     = the actions of rows with valid scores (mask_truncated: and a stop token), after the estimator

A pure function of its inputs: the trainer passes the config's numbers and a `reduce` that sums
batch statistics over processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from llm_rl.algorithms.advantages import ESTIMATORS, EstimatorInput
from llm_rl.algorithms.kl import kl_penalty
from llm_rl.algorithms.ops import masked_whiten, select_rows
from llm_rl.algorithms.scores import Scores, kl_rewards, place_scores
from llm_rl.config.variants import default_kl_estimator

Tensor = torch.Tensor


class RolloutTensors(Protocol):
    """What the targets read of a rollout (`llm_rl.sampling.rollout.Rollout`), all aligned to response
    positions: (batch, resp_len) unless noted."""

    action_mask: Tensor  # 1 on the policy's tokens
    ended: Tensor  # (batch,) bool: the response emitted a stop token
    logprobs: Tensor  # log pi_old(a_t | x_t)
    ref_logprobs: Optional[Tensor]  # None when nothing reads the reference
    values: Optional[Tensor]  # V_old(x_t), None without a value head
    is_episode: bool  # multi-turn: turns, observations, bootstrap values below are meaningful
    turn_ends: Optional[Tensor]  # bool: last token of each bot turn
    final_values: Optional[Tensor]  # (batch,) V after an episode cut before done


@dataclass(frozen=True)
class Targets:
    """Per-token training targets of a rollout, all (batch, resp_len) and 0 off `loss_mask`."""

    loss_mask: Tensor  # the actions of the rows whose rewards were valid: every loss averages over these
    kl: Tensor  # KL estimate of the old policy vs the reference (0 when no reference was taken)
    token_rewards: Tensor  # what the estimator saw: -beta * KL, token scores, the sequence score on the last action
    advantages: Tensor
    returns: Optional[Tensor]  # the value head's targets (gae), else None
    # weights of the policy loss correcting an engine's own sampling distribution (rollout_correction); None: 1
    importance_weights: Optional[Tensor] = None

    def select(self, rows: Tensor, width: Optional[int] = None) -> Targets:
        """The `rows` of every field, response columns cut to `width`."""
        return Targets(**{"returns": None, **select_rows(self, rows, width)})


def compute_targets(
    rollout: RolloutTensors,
    scores: Scores,
    *,
    estimator: str,
    beta: float,
    kl_estimator: str = default_kl_estimator("reward"),
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
    whiten_advantages: bool = True,
    whiten_rewards: bool = False,
    turn_discount: bool = True,
    reduce: Optional[Callable[[Tensor], Tensor]] = None,
    advantage_scaling: str = "group",
    mask_truncated: bool = False,
) -> Targets:
    """Targets of `rollout` (its old log-probs, values if the estimator needs them, reference log-probs or
    None) under `scores`. `beta` weighs the KL in the rewards (0 when the KL is a loss term instead);
    `turn_discount`: multi-turn episodes take gamma per turn boundary, not per action; `advantage_scaling`:
    grpo's std (group, batch or none). `mask_truncated`: rows without a stop token keep their part in the
    estimator's statistics (group means and stds) but get no loss: 0 in loss_mask, advantages, KL, returns."""
    loss_mask = rollout.action_mask * scores.valid[:, None].to(rollout.action_mask.dtype)
    if rollout.ref_logprobs is not None:
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, kl_estimator, loss_mask)
    else:
        kl = torch.zeros_like(rollout.logprobs)
    rewards = kl_rewards(kl, loss_mask, beta) + place_scores(scores.sequence.to(kl.dtype), loss_mask)
    if scores.tokens is not None:
        rewards = rewards + scores.tokens * loss_mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, loss_mask, shift_mean=False, reduce=reduce)
    episodes = rollout.is_episode
    spec = ESTIMATORS[estimator]
    advantages, returns = spec.estimate(EstimatorInput(
        rewards, loss_mask, gamma=gamma, lam=lam, values=rollout.values, group_size=group_size,
        prefix=scores.prefix, episodes=episodes, turn_ends=rollout.turn_ends if episodes and turn_discount else None,
        final_values=rollout.final_values, reduce=reduce, scaling=advantage_scaling,
    ))
    if whiten_advantages and spec.whitened_by_trainer:
        advantages = masked_whiten(advantages, loss_mask, reduce=reduce)
    if mask_truncated:
        loss_mask = loss_mask * rollout.ended[:, None].to(loss_mask.dtype)
        kl, advantages = kl * loss_mask, advantages * loss_mask
        returns = None if returns is None else returns * loss_mask
    return Targets(loss_mask, kl, rewards, advantages, returns)
