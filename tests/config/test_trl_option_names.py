"""The command line as users of TRL's parser and OpenRLHF type it: --config anywhere, list values, --no_<flag>,
their option names pointing to the key meant, and trackers checked before any model loads."""

from __future__ import annotations

import pytest

from llm_rl.config.errors import ConfigError
from llm_rl.config.loading import parse_overrides, split_config_arg
from llm_rl.config.sections import Config


def test_command_line_as_trl_parser_users_type_it():
    assert split_config_arg(["--lr", "1", "--config", "a.yaml", "--x"]) == ("a.yaml", ["--lr", "1", "--x"])
    assert split_config_arg(["--config=a.yaml"]) == ("a.yaml", [])
    values = parse_overrides(["--reward_funcs", "m:a", "n:b", "--no_shuffle", "--seed", "3"], frozenset({"shuffle"}))
    assert values == {"reward_funcs": ["m:a", "n:b"], "shuffle": False, "seed": 3}
    config = Config.from_yaml(None, ["--reward_funcs", "m:a", "n:b", "--no_shuffle", "--reward_weights", "1", "0.5"])
    assert config.reward.reward_funcs == ["m:a", "n:b"] and config.data.shuffle is False
    assert config.reward.reward_weights == [1.0, 0.5]
    with pytest.raises(ConfigError, match="'seed' expects int"):
        Config.from_yaml(None, ["--seed", "1", "2"])


def test_report_to_is_checked_before_models_load():
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'.*Did you mean tensorboard"):
        Config.from_yaml(None, ["--report_to", "tensorbord"])
    missing = next((n for n in ("wandb", "comet_ml", "mlflow", "aim") if not _installed(n)), None)
    if missing:
        with pytest.raises(ConfigError, match=f"{missing} is not installed"):
            Config.from_yaml(None, ["--report_to", missing])


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("typed, meant, note", [
    ("per_device_train_batch_size", "batch_size", "prompts per process"),
    ("max_completion_length", "max_new_tokens", None),
    ("response_length", "max_new_tokens", None),
    ("beta", "kl_coef", "kl_placement"),
    ("epsilon", "clip_range", None),
    ("eps_clip", "clip_range", None),
    ("num_ppo_epochs", "ppo_epochs", None),
    ("loss_type", "loss_agg", "token_mean is TRL's dapo"),
    ("epsilon_high", "clip_range_high", None),
    ("scale_rewards", "advantage_scaling", None),
    ("bf16", "torch_dtype", "mixed_precision"),
    ("total_episodes", "max_updates", None),
])
def test_trl_and_openrlhf_names_point_to_the_key_meant(typed, meant, note):
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({typed: 1})
    assert f"Did you mean {meant}?" in str(caught.value)
    if note:
        assert note in str(caught.value)


def test_reward_training_names_pairs_not_prompts():
    from llm_rl.config.reward_training import RewardTrainingConfig

    with pytest.raises(ConfigError, match="Did you mean batch_size.*pairs per process"):
        RewardTrainingConfig().set_values({"per_device_train_batch_size": 8})
