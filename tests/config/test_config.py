import pytest

from llm_rl.config.errors import ConfigError
from llm_rl.config.loading import parse_overrides
from llm_rl.config.sections import Config


def write(tmp_path, text: str, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------- YAML files


def test_flat_yaml(tmp_path):
    path = write(
        tmp_path,
        "model_name_or_path: my/model\n"
        "learning_rate: 1e-5\n"  # PyYAML reads 1e-5 (no dot) as a string: it must still become a float
        "batch_size: 8\n"
        "temperature: 0.7\n"
        "whiten_rewards: true\n"
        "reward_funcs: ['pkg.mod:f']\n"
        "reward_clip: null\n",
    )
    config = Config.from_yaml(path)
    assert config.model.model_name_or_path == "my/model"
    assert config.ppo.learning_rate == 1e-5 and isinstance(config.ppo.learning_rate, float)
    assert config.ppo.batch_size == 8 and isinstance(config.ppo.batch_size, int)
    assert config.sampling.temperature == 0.7
    assert config.reward.whiten_rewards is True
    assert config.reward.reward_funcs == ["pkg.mod:f"]
    assert config.reward.reward_clip is None
    # untouched keys keep their defaults
    assert config.ppo.clip_range == 0.2
    assert config.train.seed == 42


def test_sectioned_yaml(tmp_path):
    path = write(
        tmp_path,
        "model:\n  model_name_or_path: my/model\n"
        "ppo:\n  learning_rate: 3.0e-6\n  batch_size: 4\n  num_mini_batches: 2\n"
        "sampling:\n  max_new_tokens: 5\n"
        "train:\n  seed: 7\n",
    )
    config = Config.from_yaml(path)
    assert config.model.model_name_or_path == "my/model"
    assert config.ppo.learning_rate == 3e-6
    assert config.ppo.batch_size == 4
    assert config.ppo.num_mini_batches == 2
    assert config.sampling.max_new_tokens == 5
    assert config.train.seed == 7


def test_key_in_the_wrong_section_is_rejected(tmp_path):
    path = write(tmp_path, "ppo:\n  temperature: 0.5\n")
    with pytest.raises(ConfigError, match="temperature"):
        Config.from_yaml(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        Config.from_yaml(write(tmp_path, "- a\n- b\n"))


# ----------------------------------------------------------------- command-line overrides


def test_space_separated_overrides_coerce_types(tmp_path):
    path = write(tmp_path, "batch_size: 8\nreward_clip: 2.0\nmax_grad_norm: 1.0\n")
    config = Config.from_yaml(
        path,
        [
            "--batch_size", "32",
            "--learning_rate", "1e-5",
            "--temperature", "0.5",
            "--whiten_rewards",  # a bare flag switches a boolean on
            "--shuffle", "false",
            "--reward_clip", "null",
            "--max_grad_norm", "None",
            "--reward_funcs", "pkg.a:f, pkg.b:g",
            "--max-new-tokens", "7",  # dashes in a key mean underscores
        ],
    )  # fmt: skip
    assert config.ppo.batch_size == 32 and isinstance(config.ppo.batch_size, int)
    assert config.ppo.learning_rate == 1e-5 and isinstance(config.ppo.learning_rate, float)
    assert config.sampling.temperature == 0.5
    assert config.reward.whiten_rewards is True
    assert config.data.shuffle is False
    assert config.reward.reward_clip is None
    assert config.ppo.max_grad_norm is None
    assert config.reward.reward_funcs == ["pkg.a:f", "pkg.b:g"]
    assert config.sampling.max_new_tokens == 7


def test_equals_overrides_coerce_types():
    config = Config.from_yaml(
        None,
        ["--batch_size=32", "--temperature=0.5", "--whiten_rewards=true", "--reward_clip=null", "--seed=3"],
    )
    assert config.ppo.batch_size == 32
    assert config.sampling.temperature == 0.5
    assert config.reward.whiten_rewards is True
    assert config.reward.reward_clip is None
    assert config.train.seed == 3


def test_equals_overrides_keep_dashes_in_the_value():
    # Only the key's dashes mean underscores; the value after '=' must be kept as written.
    config = Config.from_yaml(None, ["--learning_rate=1e-5", "--output_dir=runs/ppo-tiny", "--max-new-tokens=5"])
    assert config.ppo.learning_rate == 1e-5
    assert config.train.output_dir == "runs/ppo-tiny"
    assert config.sampling.max_new_tokens == 5
    assert parse_overrides(["--reward_clip=-1.5"]) == {"reward_clip": -1.5}


def test_space_and_equals_forms_agree():
    args = ["--learning_rate", "2e-4", "--run_name", "a-b", "--kl_coef", "0.1"]
    equals = [f"{k}={v}" for k, v in zip(args[::2], args[1::2])]
    assert parse_overrides(args) == parse_overrides(equals)


def test_reward_weights_from_comma_string_are_numbers():
    config = Config.from_yaml(None, ["--reward_funcs", "pkg.a:f,pkg.b:g", "--reward_weights", "0.5,2"])
    assert config.reward.reward_weights == [0.5, 2.0]
    assert all(isinstance(w, (int, float)) for w in config.reward.reward_weights)


def test_unknown_key_suggests_the_closest_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        Config.from_yaml(None, ["--learning_rat", "1e-5"])
    assert "learning_rat'" in str(e.value) and "learning_rate" in str(e.value)
    assert "command line" in str(e.value)

    path = write(tmp_path, "ppo:\n  bach_size: 4\n")
    with pytest.raises(ConfigError) as e:
        Config.from_yaml(path)
    assert "batch_size" in str(e.value) and str(path) in str(e.value)

    with pytest.raises(ConfigError, match="temperature"):
        Config.from_yaml(write(tmp_path, "temprature: 0.5\n", "flat.yaml"))


@pytest.mark.parametrize(
    "args, key",
    [
        (["--batch_size", "abc"], "batch_size"),
        (["--batch_size", "2.5"], "batch_size"),
        (["--learning_rate", "fast"], "learning_rate"),
        (["--learning_rate", "true"], "learning_rate"),
        (["--whiten_rewards", "maybe"], "whiten_rewards"),
        (["--temperature", "null"], "temperature"),  # not Optional
        (["--reward_funcs", "3"], "reward_funcs"),
    ],
)
def test_wrong_type_names_the_key(args, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        Config.from_yaml(None, args)


def test_override_without_dashes_is_rejected():
    with pytest.raises(ConfigError, match="batch_size"):
        Config.from_yaml(None, ["batch_size", "4"])


# ----------------------------------------------------------------- validation


def test_validate_batch_divisibility():
    Config.from_dict({"batch_size": 8, "num_mini_batches": 2, "gradient_accumulation_steps": 2}).validate()
    config = Config.from_dict({"batch_size": 10, "num_mini_batches": 2, "gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError, match="batch_size") as e:
        config.validate()
    assert "divisible" in str(e.value) and "10" in str(e.value)


def test_validate_temperature():
    with pytest.raises(ConfigError, match="temperature"):
        Config.from_dict({"temperature": 0}).validate()
    with pytest.raises(ConfigError, match="temperature"):
        Config.from_yaml(None, ["--temperature", "0"])


def test_validate_reward_weights_count():
    ok = Config.from_dict({"reward_model_name_or_path": "rm", "reward_funcs": ["a.b:f"], "reward_weights": [1.0, 0.5]})
    ok.validate()
    bad = Config.from_dict({"reward_funcs": ["a.b:f"], "reward_weights": [1.0, 0.5]})
    with pytest.raises(ConfigError, match="reward_weights") as e:
        bad.validate()
    assert "2" in str(e.value) and "1" in str(e.value)


def test_validate_reward_funcs_spec():
    with pytest.raises(ConfigError, match="no_colon_here"):
        Config.from_dict({"reward_funcs": ["no_colon_here"]}).validate()


def test_defaults_are_valid():
    Config().validate()


# ----------------------------------------------------------------- save / load


def test_save_yaml_round_trip(tmp_path):
    config = Config.from_dict(
        {
            "model": {"model_name_or_path": "some/model", "value_head_init_std": 0.01},
            "learning_rate": 3e-6,
            "batch_size": 12,
            "num_mini_batches": 3,
            "max_grad_norm": None,
            "reward_funcs": ["pkg.a:f", "pkg.b:g"],
            "reward_weights": [1.0, 0.25],
            "missing_eos_penalty": 1.5,
            "stop_token": "</s>",
            "whiten_advantages": False,
            "seed": 123,
        }
    )
    path = tmp_path / "saved.yaml"
    config.save_yaml(path)
    loaded = Config.from_yaml(path)
    assert loaded == config
    assert loaded.ppo.max_grad_norm is None
    assert loaded.reward.reward_weights == [1.0, 0.25]
    assert loaded != Config()


def test_kl_in_the_loss_defaults_to_k2_and_refuses_k1_and_abs():
    config = Config.from_dict({"kl_placement": "loss"})
    config.validate()
    assert config.ppo.kl_estimator_in_use == "k2"
    assert Config().ppo.kl_estimator_in_use == "k1"  # in the reward
    for estimator, why in (("k1", "expected gradient is 0"), ("abs", "no KL")):
        with pytest.raises(ConfigError, match=why):
            Config.from_dict({"kl_placement": "loss", "kl_estimator": estimator}).validate()
    Config.from_dict({"kl_placement": "loss", "kl_estimator": "k3"}).validate()  # the forward KL's gradient


def test_prefix_diff_refuses_reward_whitening():
    config = Config.from_dict({"advantage_estimator": "prefix_diff", "reward_model_name_or_path": "rm",
                               "whiten_rewards": True})
    with pytest.raises(ConfigError, match="whiten_rewards"):
        config.validate()


def test_validate_warmup_steps():
    with pytest.raises(ConfigError, match="warmup_steps"):
        Config.from_dict({"warmup_steps": -1}).validate()


# ----------------------------------------------------------------- variant tables, rules, shared option groups


def test_choice_types_are_the_variant_tables_keys():
    import typing

    from llm_rl.config.choices import AdvantageEstimator, KLEstimator, LossAggregation
    from llm_rl.config.variants import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS

    for choice, table in ((AdvantageEstimator, ADVANTAGE_ESTIMATORS), (KLEstimator, KL_ESTIMATORS),
                          (LossAggregation, LOSS_AGGREGATIONS)):
        assert typing.get_args(choice) == tuple(table)
    with pytest.raises(ConfigError, match="'advantage_estimator' is one of " + ", ".join(ADVANTAGE_ESTIMATORS)):
        Config.from_yaml(None, ["--advantage_estimator", "ppo2"])


def test_estimator_rules_follow_the_table():
    from llm_rl.config.variants import ADVANTAGE_ESTIMATORS

    for name, variant in ADVANTAGE_ESTIMATORS.items():
        ok = {"advantage_estimator": name, "num_generations": variant.min_generations,
              "reward_model_name_or_path": "rm" if variant.needs_reward_model else None}
        Config.from_dict(ok).validate()
        if variant.min_generations > 1:
            with pytest.raises(ConfigError, match=f"set num_generations >= {variant.min_generations}"):
                Config.from_dict({**ok, "num_generations": variant.min_generations - 1}).validate()
        if variant.needs_reward_model:
            with pytest.raises(ConfigError, match="set reward_model_name_or_path"):
                Config.from_dict({**ok, "reward_model_name_or_path": None}).validate()
        with_environment = {**ok, "environment": "pkg.env:Env", "reward_model_name_or_path": None}
        if variant.multi_turn and not variant.needs_reward_model:
            Config.from_dict(with_environment).validate()
        elif not variant.multi_turn:
            with pytest.raises(ConfigError, match="it has no multi-turn form"):
                Config.from_dict({**ok, "environment": "pkg.env:Env"}).validate()


def test_rule_tables_have_unique_names():
    from llm_rl.config.rules import PPO_REWARD_RULES, PPO_RULES, REWARD_TRAINING_RULES

    for table in (PPO_RULES + PPO_REWARD_RULES, REWARD_TRAINING_RULES):
        names = [rule.name for rule in table]
        assert len(names) == len(set(names))


def test_validate_zero_divisors_are_config_errors():
    # the rules run in order and stop at the first broken one, so the divisibility rule never divides by 0
    for key in ("num_mini_batches", "gradient_accumulation_steps"):
        with pytest.raises(ConfigError, match=f"{key} must be >= 1"):
            Config.from_dict({key: 0}).validate()


def test_variant_set_in_code_is_checked():
    config = Config()
    config.ppo.advantage_estimator = "ppo2"  # not through the loader
    with pytest.raises(ConfigError, match="advantage_estimator is one of gae, "):
        config.validate()


def test_shared_keys_are_declared_once_with_one_type():
    import dataclasses
    import typing

    from llm_rl.config.reward_training import RewardTrainingConfig
    from llm_rl.config.sections import FIELD_TYPES

    reward_types = typing.get_type_hints(RewardTrainingConfig)
    shared = set(FIELD_TYPES) & set(reward_types)
    assert len(shared) >= 30
    # the reward model's prompt_column may be null (the pairs are then full texts); PPO's may not
    assert {key for key in shared if FIELD_TYPES[key] != reward_types[key]} == {"prompt_column"}
    # each config keeps its own defaults where they differ
    ppo, reward = Config(), RewardTrainingConfig()
    assert (reward.lora_dropout, ppo.model.lora_dropout) == (0.05, 0.0)
    assert (reward.lr_scheduler_type, ppo.ppo.lr_scheduler_type) == ("linear", "constant")
    assert (reward.eval_steps, ppo.train.eval_steps) == (100, 0)
    assert (reward.output_dir, ppo.train.output_dir) == ("outputs/reward_model", "outputs/ppo")
    reward_help = {f.name: f.metadata["help"] for f in dataclasses.fields(RewardTrainingConfig)}
    assert reward_help["lora_dropout"] == "Dropout on the LoRA input."
    assert reward_help["learning_rate"] == "AdamW learning rate."  # the group's, shared


def test_reward_training_scheduler_is_typed():
    from llm_rl.config.reward_training import RewardTrainingConfig

    with pytest.raises(ConfigError, match="'lr_scheduler_type' is one of constant, linear, cosine; got 'step'"):
        RewardTrainingConfig.from_yaml(None, ["--model_name_or_path", "m", "--dataset_name", "d",
                                              "--lr_scheduler_type", "step"])


def test_one_reward_weight_may_be_a_number():
    base = {"model_name_or_path": "m", "dataset_name": "d"}
    assert Config.from_dict({**base, "reward_funcs": ["a:b"], "reward_weights": 2}).reward.reward_weights == [2.0]
    with pytest.raises(ConfigError) as e:
        Config.from_dict({**base, "reward_funcs": ["a:b", "c:d"], "reward_weights": 1}).validate()
    assert str(e.value).endswith("reward_weights has 1 entry but there are 2 rewards (the reward model first, then "
                                 "reward_funcs in order): give one weight per reward")
