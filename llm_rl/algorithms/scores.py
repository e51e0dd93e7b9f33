"""Scores and how they become rewards: the `Scores` type (phase 2's output), score shaping (scale, clip,
missing-EOS penalty), and the per-token rewards PPO optimises (r_t = -beta * KL_t + the sequence score
on the last action)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Scores:
    """What the rewards said about a batch of completions, in score units (phase 2's output).

    `llm_rl.rewards.functions.compute_rewards` gives the weighted sum of the rewards; phase 2
    (`llm_rl.rewards.scoring`) then shapes it for the update: scaled, clipped, missing-EOS penalised.
    "Score" is what a reward gives; "reward" (`targets.Targets.token_rewards`) is what the estimator sees."""

    sequence: torch.Tensor  # (batch,) each completion's score
    tokens: Optional[torch.Tensor]  # (batch, resp_len) token-level scores (reward functions', environment's turns)
    valid: torch.Tensor  # (batch,) bool: every reward gave a usable value; other rows get no loss
    per_reward: dict  # reward name -> (batch,) its value per row (NaN where unusable), for the completions log
    means: dict  # reward name -> mean over the valid rows
    prefix: Optional[tuple] = None  # prefix_diff: ((batch, resp_len) Q_t, (batch,) Q_{-1}) in score units


def shape_scores(
    scores: torch.Tensor,
    ended: torch.Tensor,
    scale: float = 1.0,
    clip: Optional[float] = None,
    missing_eos_penalty: Optional[float] = None,
) -> torch.Tensor:
    """Scale, clip, then penalise responses that never stopped: (batch,) -> (batch,)."""
    scores = scores * scale
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ended.bool()).float()
    return scores


def kl_rewards(kl: torch.Tensor, action_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """KL as a reward: r_t = -beta * KL_t on the policy's tokens, 0 elsewhere. (batch, resp_len) -> same."""
    return torch.where(action_mask.bool(), -beta * kl, torch.zeros_like(kl))


def place_scores(scores: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Each sequence score on its last response token: (batch,), (batch, resp_len) -> (batch, resp_len).

    The last response token is the stop token when the response ended, never a pad position; a row
    with no response tokens gets nothing."""
    placed = torch.zeros(action_mask.shape, dtype=scores.dtype, device=scores.device)
    lengths = action_mask.long().sum(dim=1)  # (batch,)
    has_tokens = lengths > 0
    rows = torch.arange(placed.shape[0], device=placed.device)
    placed[rows[has_tokens], lengths[has_tokens] - 1] = scores[has_tokens]
    return placed


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token rewards r_t = -beta * KL_t, plus the sequence score on the last response token.

    scores (batch,), kl (batch, resp_len), action_mask (batch, resp_len) -> (batch, resp_len).
    """
    return kl_rewards(kl, action_mask, beta) + place_scores(scores.to(kl.dtype), action_mask)
