"""Configuration: typed sections, YAML and command-line loading, TRL/OpenRLHF aliases, user errors.

The modules: `sections` (the PPO config) and `reward_training` (the reward-model config), built
from the option groups of `groups`; `rules` (what `validate` checks); `variants` (the advantage
estimators, KL estimators and loss aggregations, with their properties) and `choices` (the
option types); `loading`, `aliases`, `paths`, `specs` and `errors`.

The lowest layer: it imports nothing else of llm_rl and no torch, so reading a config and reporting
its mistakes is fast.
"""

from llm_rl.config.errors import ConfigError, ModelLoadError, UserError, loading
from llm_rl.config.loading import split_config_arg
from llm_rl.config.reward_training import RewardTrainingConfig
from llm_rl.config.sections import (
    Config,
    DataConfig,
    EnvironmentConfig,
    ModelConfig,
    PPOConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "EnvironmentConfig", "ModelConfig", "ModelLoadError", "PPOConfig",
    "RewardConfig", "RewardTrainingConfig", "SamplingConfig", "TrainConfig", "UserError", "loading",
    "split_config_arg",
]
