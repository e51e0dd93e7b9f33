"""The rewards a config names: the reward model (`reward_model_name_or_path`), then the reward functions
(`reward_funcs`, 'module:function'), and the held-out evaluation's (`eval_reward_funcs`)."""

from __future__ import annotations

from typing import Optional

from llm_rl.config.errors import ConfigError
from llm_rl.config.sections import Config
from llm_rl.rewards.functions import load_reward_function
from llm_rl.rewards.model import RewardModel


def load_rewards(config: Config) -> list:
    r = config.reward
    rewards = []
    if r.reward_model_name_or_path is not None:
        rewards.append(
            RewardModel.from_pretrained(
                r.reward_model_name_or_path,
                trust_remote_code=config.model.trust_remote_code,
                torch_dtype=config.model.torch_dtype,
            )
        )
    rewards += [load_reward_function(spec) for spec in r.reward_funcs]
    if not rewards and not config.environment.plays_episodes:  # an environment gives its own rewards
        raise ConfigError("no reward: set reward_model_name_or_path and/or reward_funcs ('module:function')")
    return rewards


def load_eval_rewards(config: Config) -> Optional[list]:
    """The eval reward functions, or None: evaluation then uses the training rewards."""
    specs = config.reward.eval_reward_funcs
    return [load_reward_function(spec) for spec in specs] if specs else None
