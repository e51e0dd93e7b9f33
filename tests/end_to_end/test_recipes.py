"""The shipped YAML configs load and validate, and the addition recipe is the demo's run."""

from __future__ import annotations

import pytest
from conftest import REPO

from llm_rl.config.loading import load_yaml
from llm_rl.config.sections import Config
from llm_rl.demos.addition import DEMO_CONFIG

# *_trl.yaml files are `llm-rl grpo` configs: TRL GRPOConfig's names
GRPO_CONFIGS = sorted((REPO / "recipes" / "configs").glob("*_trl.yaml"))
PPO_CONFIGS = sorted(set((REPO / "recipes" / "configs").glob("*.yaml")) - set(GRPO_CONFIGS)) + [
    REPO / "reward_models" / "configs" / "addition_ppo_rm.yaml"
]


@pytest.mark.parametrize("path", PPO_CONFIGS, ids=lambda p: p.name)
def test_ppo_configs_validate(path):
    config = Config.from_yaml(path)
    assert config.model.model_name_or_path and config.data.dataset_name
    assert config.reward.reward_funcs or config.reward.reward_model_name_or_path or config.environment.plays_episodes


@pytest.mark.parametrize("path", GRPO_CONFIGS, ids=lambda p: p.name)
def test_grpo_configs_validate(path):
    from llm_rl.config.grpo import GRPOArguments

    config = GRPOArguments.from_yaml(path).to_config()
    assert config.model.model_name_or_path and config.data.dataset_name and config.reward.reward_funcs
    assert config.ppo.advantage_estimator == "grpo"


def test_the_trl_shaped_addition_recipe_is_the_grpo_recipes_rollout():
    """grpo_trl.yaml samples what grpo_addition.yaml samples (32 prompts x 8 completions per update, 6 tokens, 40
    updates), in one optimizer step instead of two (TRL's dapo needs one step per generation)."""
    from llm_rl.config.grpo import GRPOArguments

    trl = GRPOArguments.from_yaml(REPO / "recipes" / "configs" / "grpo_trl.yaml").to_config()
    ours = Config.from_yaml(REPO / "recipes" / "configs" / "grpo_addition.yaml")
    for section, key in [("ppo", "batch_size"), ("ppo", "num_generations"), ("sampling", "max_new_tokens"),
                         ("train", "max_updates"), ("model", "model_name_or_path"), ("data", "dataset_name"),
                         ("reward", "reward_funcs"), ("ppo", "learning_rate")]:
        assert getattr(getattr(trl, section), key) == getattr(getattr(ours, section), key), key
    assert (trl.ppo.num_mini_batches, trl.ppo.gradient_accumulation_steps) == (1, 2)


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
