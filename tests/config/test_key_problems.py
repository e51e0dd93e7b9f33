"""Every bad key of a config is reported in one run: unknown keys with their hints, keys in the
wrong section with the section they belong to, wrong types, from the YAML and the command line."""

from __future__ import annotations

import pytest

from llm_rl.config import Config, ConfigError, RewardTrainingConfig


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_all_unknown_keys_of_the_file_and_the_command_line_in_one_error(tmp_path):
    path = write(tmp_path, "per_device_train_batch_size: 4\nmax_completion_length: 32\nbeta: 0.1\n"
                           "ppo:\n  num_ppo_epochs: 2\n  lr: 1e-5\nnum_train_epochz: 2\n")
    with pytest.raises(ConfigError) as caught:
        Config.from_yaml(path, ["--learningrate", "1e-5", "--cliprange", "0.1"])
    lines = str(caught.value).splitlines()
    assert lines[0] == f"8 unknown keys in {path} and the command line:"
    expected = [
        ("per_device_train_batch_size", "Did you mean batch_size?"),
        ("max_completion_length", "Did you mean max_new_tokens?"),
        ("beta", "Did you mean kl_coef?"),
        ("num_ppo_epochs", "Did you mean ppo_epochs?"),
        ("lr", "Did you mean learning_rate?"),
        ("num_train_epochz", "Did you mean: num_train_epochs?"),
        ("learningrate", "Did you mean: learning_rate?"),
        ("cliprange", "Did you mean clip_range?"),
    ]
    assert len(lines) == 1 + len(expected)
    for line, (key, hint) in zip(lines[1:], expected, strict=True):
        assert f"'{key}'" in line and hint in line, line
    assert all(str(path) in line for line in lines[1:7]) and all("command line" in line for line in lines[7:])


def test_a_key_in_the_wrong_section_names_the_section_it_belongs_to(tmp_path):
    path = write(tmp_path, "ppo:\n  use_peft: true\n  lora_r: 8\n  learning_rate: 1e-5\n")
    with pytest.raises(ConfigError) as caught:
        Config.from_yaml(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"2 unknown keys in {path}:"
    assert "'use_peft' belongs in section 'model', not 'ppo'" in lines[1]
    assert "'lora_r' belongs in section 'model', not 'ppo'" in lines[2]


def test_an_alias_of_a_key_of_another_section_names_that_section(tmp_path):
    path = write(tmp_path, "ppo:\n  max_completion_length: 32\n")
    with pytest.raises(ConfigError, match=r"Did you mean max_new_tokens \(in section 'sampling'\)\?"):
        Config.from_yaml(path)


def test_one_bad_key_keeps_the_one_line_message(tmp_path):
    with pytest.raises(ConfigError) as caught:
        Config.from_yaml(None, ["--learning_rat", "1e-5"])
    assert str(caught.value) == "command line: unknown key 'learning_rat'. Did you mean: learning_rate?"


def test_unknown_keys_and_wrong_types_are_listed_together(tmp_path):
    path = write(tmp_path, "batch_size: many\nlr: 1e-5\n")
    with pytest.raises(ConfigError) as caught:
        Config.from_yaml(path, ["--temperature", "hot"])
    lines = str(caught.value).splitlines()
    assert lines[0] == f"3 keys to fix in {path} and the command line:"
    assert "'batch_size' expects int" in lines[1] and "'lr'" in lines[2] and "'temperature' expects float" in lines[3]


def test_reward_model_config_lists_every_unknown_key(tmp_path):
    path = write(tmp_path, "per_device_train_batch_size: 4\nmax_len: 100\nfoo: 1\n")
    with pytest.raises(ConfigError) as caught:
        RewardTrainingConfig.from_yaml(path, ["--center_rewards_coefficient", "0.01"])
    lines = str(caught.value).splitlines()
    assert lines[0] == f"4 unknown keys in {path} and the command line:"
    assert "Did you mean batch_size? Note: batch_size counts pairs" in lines[1]
    assert "Did you mean max_length?" in lines[2]
    assert "'foo'" in lines[3] and "llm-rl reward train --help" in lines[3]
    assert "Did you mean center_coef?" in lines[4]


def test_good_keys_beside_bad_ones_do_not_hide_them(tmp_path):
    """set_values keeps going after a bad key; the error still stops the load."""
    config = Config()
    with pytest.raises(ConfigError) as caught:
        config.set_values({"learning_rate": 1e-5, "bogus": 1, "ppo": {"bogus2": 2, "clip_range": 0.1}}, "test")
    assert "2 unknown keys in test:" in str(caught.value)
    assert config.ppo.learning_rate == 1e-5 and config.ppo.clip_range == 0.1


def test_a_bad_item_of_a_list_names_the_allowed_values():
    with pytest.raises(ConfigError) as caught:
        Config.from_yaml(None, ["--eval_decoding", "greedy,beam"])
    assert str(caught.value) == "command line: 'eval_decoding' is one of greedy, sampled; got 'beam'"


def test_trls_mask_truncated_completions_is_a_key_of_its_own():
    """It used to point to missing_eos_penalty (which lowers a score, not the loss weight); now it is TRL's switch."""
    config = Config.from_yaml(None, ["--mask_truncated_completions", "true"])
    assert config.ppo.mask_truncated_completions is True
