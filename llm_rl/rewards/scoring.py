"""Phase 2 of an update: what the rewards say about a rollout, as `Scores` ready for the targets.

The trainer picks one scorer when it is built: `RewardScorer` (reward models and functions, shaped by
the config's scale, clip and missing-EOS penalty; prefix scores for estimators that read them) or
`EnvironmentScorer` (multi-turn episodes, whose environment scored every turn while it was played).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional, Protocol

import torch

from llm_rl.algorithms.scores import Scores, shape_scores
from llm_rl.config.errors import ConfigError
from llm_rl.rewards.functions import RewardFn, TrainerState, compute_rewards
from llm_rl.rewards.model import RewardModel, prefix_scores


class Scorer(Protocol):
    def score(self, rollout, state: Optional[TrainerState] = None) -> Scores: ...


class EnvironmentScorer:
    """Episodes: each turn's reward sits on that turn's last token (`Rollout.turn_scores`). `rewards`: reward
    functions that also score each whole episode (environment_factory, as TRL adds them to get_reward()), their
    weighted, shaped sum on its last bot token."""

    def __init__(self, rewards: Optional[RewardScorer] = None):
        self.rewards = rewards

    def score(self, rollout, state: Optional[TrainerState] = None) -> Scores:
        device = rollout.turn_scores.device
        environment = rollout.turn_scores.sum(dim=1)
        if self.rewards is not None:
            scores = self.rewards.score(rollout, state)
            tokens = rollout.turn_scores if scores.tokens is None else scores.tokens + rollout.turn_scores
            return dataclasses.replace(scores, tokens=tokens, per_reward={**scores.per_reward, "environment": environment},
                                       means={**scores.means, "environment": float(environment.mean())})
        return Scores(
            sequence=torch.zeros(len(rollout), device=device), tokens=rollout.turn_scores,
            valid=torch.ones(len(rollout), dtype=torch.bool, device=device),
            per_reward={"environment": environment}, means={},
        )


class RewardScorer:
    """Every reward's value per completion, combined with `reward_weights`, then scaled, clipped and
    EOS-penalised (`reward` and `sampling` are the config's sections). `prefix_model`: the reward model
    whose prefix scores the estimator reads (prefix_diff), in score units of its weight x scale."""

    def __init__(self, rewards: Sequence[RewardFn], reward, sampling, device, prefix_model: Optional[RewardModel] = None):
        self.rewards, self.reward, self.sampling, self.device = list(rewards), reward, sampling, device
        self.prefix_model = prefix_model

    def score(self, rollout, state: Optional[TrainerState] = None) -> Scores:
        """`state`: what the rewards see as trainer_state (updates done and planned)."""
        reward = self.reward
        lengths = rollout.action_mask.sum(dim=1).tolist()
        raw = compute_rewards(
            self.rewards, reward.reward_weights, rollout.prompts, rollout.completions, rollout.columns,
            prompt_messages=rollout.prompt_messages,
            completion_ids=[row[:n] for row, n in zip(rollout.response_ids.tolist(), lengths)],
            skip_invalid=reward.skip_invalid_rewards, trainer_state=state,
        )
        sequence = shape_scores(raw.sequence.to(self.device), rollout.ended, scale=reward.reward_scale,
                                clip=reward.reward_clip, missing_eos_penalty=self.sampling.missing_eos_penalty)
        tokens = None
        if raw.tokens is not None:
            tokens = (reward.reward_scale * raw.tokens[:, : rollout.response_ids.shape[1]]).to(self.device)
        return dataclasses.replace(raw, sequence=sequence, tokens=tokens, valid=raw.valid.to(self.device),
                                   prefix=self.prefix(rollout))

    @torch.no_grad()
    def prefix(self, rollout) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """((batch, resp_len) Q_t, (batch,) Q_{-1}) of the prefix model in score units, or None without one.
        Clipping and missing_eos_penalty act on the whole score, which the estimator takes as terminal."""
        if self.prefix_model is None:
            return None
        prompt_score, prefix_score = prefix_scores(
            self.prefix_model, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1]
        )
        weights = self.reward.reward_weights or [1.0] * len(self.rewards)
        unit = self.reward.reward_scale * weights[self.rewards.index(self.prefix_model)]
        return unit * prefix_score, unit * prompt_score


def prefix_reward_model(rewards: Sequence[RewardFn], tokenizer, estimator: str) -> RewardModel:
    """The reward model the advantage `estimator` reads at every response position: it must share the
    policy's tokens."""
    model = next((r for r in rewards if isinstance(r, RewardModel)), None)
    if model is None:
        raise ConfigError(f"advantage_estimator {estimator} needs a reward model (reward_model_name_or_path)")
    if model.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"advantage_estimator {estimator} scores the policy's own tokens: the reward model must use the "
            "policy's tokenizer (same vocabulary)"
        )
    return model
