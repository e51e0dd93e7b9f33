"""llm_rl: token-level reinforcement learning for causal language models (PPO and friends).

The public names below load on first use (PEP 562), so `llm-rl --help` and config errors
answer without importing torch and transformers.
"""

import importlib

from llm_rl.version import __version__  # noqa: F401  (llm_rl.__version__)

_EXPORTS = {  # public name -> the module (below llm_rl) that defines it
    "action_gae": "algorithms.advantages",
    "AdaptiveKLController": "algorithms.kl",
    "CausalLMWithValueHead": "models.value_head",
    "chunked_logprobs_and_entropy": "algorithms.chunked",
    "compute_gae": "algorithms.advantages",
    "compute_targets": "algorithms.targets",
    "Config": "config.sections",
    "ConfigError": "config.errors",
    "discounted_returns": "algorithms.advantages",
    "entropy_from_logits": "algorithms.ops",
    "Episodes": "sampling.episodes",
    "EpisodeSampler": "sampling.episodes",
    "ESTIMATORS": "algorithms.advantages",
    "Evaluate": "training.callbacks",
    "FixedKLController": "algorithms.kl",
    "grpo_advantages": "algorithms.advantages",
    "HFSampler": "sampling.hf",
    "kl_penalty": "algorithms.kl",
    "kl_rewards": "algorithms.scores",
    "load_policy": "models.loading",
    "load_prompts": "data.prompts",
    "load_rewards": "rewards.loading",
    "load_tokenizer": "models.loading",
    "logprobs_from_logits": "algorithms.ops",
    "masked_mean": "algorithms.ops",
    "masked_moments": "algorithms.ops",
    "masked_var": "algorithms.ops",
    "masked_whiten": "algorithms.ops",
    "pairwise_loss": "algorithms.losses",
    "place_scores": "algorithms.scores",
    "policy_loss": "algorithms.losses",
    "ppo_objective": "algorithms.losses",
    "PPOCoefficients": "algorithms.losses",
    "PPOTrainer": "training.ppo_trainer",
    "prefix_diff_advantages": "algorithms.advantages",
    "reinforce_pp_advantages": "algorithms.advantages",
    "RewardModel": "rewards.model",
    "RewardTrainer": "training.reward_trainer",
    "RewardTrainingConfig": "config.reward_training",
    "rloo_advantages": "algorithms.advantages",
    "Rollout": "sampling.rollout",
    "run_episodes": "sampling.episodes",
    "run_ppo": "training.pipeline",
    "Sampler": "sampling.sampler",
    "SamplingSettings": "sampling.sampler",
    "Scores": "algorithms.scores",
    "Targets": "algorithms.targets",
    "token_rewards": "algorithms.scores",
    "TrainerCallback": "training.callbacks",
    "TrainingRun": "training.run",
    "value_loss": "algorithms.losses",
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
