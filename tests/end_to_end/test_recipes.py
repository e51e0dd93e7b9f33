"""The shipped YAML configs load and validate, and the addition recipe is the demo's run."""

from __future__ import annotations

import pytest
from conftest import REPO

from llm_rl.config.grpo import grpo_values
from llm_rl.config.loading import load_yaml
from llm_rl.config.sections import Config
from llm_rl.demos.addition import DEMO_CONFIG

GRPO_CONFIGS = [REPO / "recipes" / "configs" / "grpo_trl.yaml"]  # TRL's GRPOConfig names: `llm-rl grpo`
PPO_CONFIGS = sorted(set((REPO / "recipes" / "configs").glob("*.yaml")) - set(GRPO_CONFIGS)) + [
    REPO / "reward_models" / "configs" / "addition_ppo_rm.yaml"
]


@pytest.mark.parametrize("path", PPO_CONFIGS + GRPO_CONFIGS, ids=lambda p: p.name)
def test_ppo_configs_validate(path):
    """Every recipe validates as the command its header names loads it."""
    if path in GRPO_CONFIGS:
        config = Config.from_dict(grpo_values(load_yaml(path)), str(path))
        config.validate()
    else:
        config = Config.from_yaml(path)
    assert config.model.model_name_or_path and config.data.dataset_name
    assert config.reward.reward_funcs or config.reward.reward_model_name_or_path or config.environment.plays_episodes


def test_addition_recipe_is_the_demo_run():
    recipe, demo = load_yaml(REPO / "recipes" / "configs" / "addition.yaml"), load_yaml(DEMO_CONFIG)
    training_keys = set(demo) - {"eval_steps", "logging_steps"}  # evaluation needs the demo's held-out set
    assert {k: recipe.get(k) for k in training_keys} == {k: demo[k] for k in training_keys}


def test_dialogue_recipe_is_the_demos_far_sighted_run():
    from llm_rl.demos.dialogue import DIALOGUE_CONFIG

    recipe, demo = load_yaml(REPO / "recipes" / "configs" / "dialogue.yaml"), load_yaml(DIALOGUE_CONFIG)
    training_keys = set(demo) - {"eval_steps"}  # the demo's evaluation is its eval_fn on held-out bug reports
    assert {k: recipe.get(k) for k in training_keys} == {k: demo[k] for k in training_keys}
    assert recipe["gamma"] == 0.9


def test_reward_model_config_validates():
    from llm_rl.config.reward_training import RewardTrainingConfig

    config = RewardTrainingConfig.from_yaml(REPO / "reward_models" / "configs" / "addition_rm.yaml")
    assert config.model_name_or_path and config.dataset_name
