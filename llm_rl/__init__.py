"""llm_rl: token-level reinforcement learning for causal language models (PPO and friends)."""

__version__ = "0.1.0"

from llm_rl.advantages import (
    compute_gae,
    discounted_returns,
    grpo_advantages,
    prefix_diff_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from llm_rl.config import Config, ConfigError
from llm_rl.kl import AdaptiveKLController, FixedKLController, kl_penalty
from llm_rl.losses import policy_loss, value_loss
from llm_rl.modeling import CausalLMWithValueHead
from llm_rl.ops import entropy_from_logits, logprobs_from_logits, masked_mean, masked_var, masked_whiten
from llm_rl.rewards import RewardModel, token_rewards
from llm_rl.rollout import Rollout

__all__ = [
    "AdaptiveKLController",
    "CausalLMWithValueHead",
    "Config",
    "ConfigError",
    "FixedKLController",
    "RewardModel",
    "Rollout",
    "compute_gae",
    "discounted_returns",
    "entropy_from_logits",
    "grpo_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "prefix_diff_advantages",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "token_rewards",
    "value_loss",
]
