"""llm_rl: token-level reinforcement learning for causal language models (PPO and friends).

The public names below load on first use (PEP 562), so `llm-rl --help` and config errors
answer without importing torch and transformers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "action_gae": "advantages",
    "compute_gae": "advantages",
    "discounted_returns": "advantages",
    "grpo_advantages": "advantages",
    "prefix_diff_advantages": "advantages",
    "reinforce_pp_advantages": "advantages",
    "rloo_advantages": "advantages",
    "ESTIMATORS": "advantages",
    "TrainerCallback": "callbacks",
    "Config": "config",
    "ConfigError": "config",
    "AdaptiveKLController": "kl",
    "FixedKLController": "kl",
    "kl_penalty": "kl",
    "pairwise_loss": "losses",
    "policy_loss": "losses",
    "ppo_objective": "losses",
    "value_loss": "losses",
    "CausalLMWithValueHead": "modeling",
    "entropy_from_logits": "ops",
    "logprobs_from_logits": "ops",
    "masked_mean": "ops",
    "masked_moments": "ops",
    "masked_var": "ops",
    "masked_whiten": "ops",
    "RewardModel": "rewards",
    "Scores": "rewards",
    "kl_rewards": "rewards",
    "place_scores": "rewards",
    "token_rewards": "rewards",
    "Rollout": "rollout",
    "Targets": "targets",
    "compute_targets": "targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llm_rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llm_rl.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
