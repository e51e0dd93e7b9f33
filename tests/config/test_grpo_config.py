"""`llm-rl grpo`: GRPOConfig names and TRL's defaults translated to llm_rl's Config; what it cannot do is refused."""

import subprocess
import sys

import pytest
import yaml

from llm_rl.config.errors import ConfigError
from llm_rl.config.grpo import grpo_values
from llm_rl.config.sections import Config

BASE = {"model_name_or_path": "m", "dataset_name": "d.jsonl", "reward_funcs": ["llm_rl.tasks.arithmetic:reward"]}


def translate(validate=True, **values) -> Config:
    config = Config.from_dict(grpo_values({**BASE, **values}))
    if validate:
        config.validate()
    return config


def test_trl_defaults_where_nothing_is_given():
    c = translate()
    assert c.ppo.learning_rate == 1e-6 and c.ppo.num_generations == 8 and c.ppo.kl_coef == 0.0
    assert c.sampling.max_new_tokens == 512 and c.ppo.clip_range == 0.2 and c.ppo.clip_range_high is None
    assert c.ppo.loss_agg == "token_mean" and c.ppo.advantage_scale == "group"  # dapo, group
    assert c.ppo.advantage_estimator == "grpo" and c.ppo.kl_placement == "loss" and c.ppo.kl_estimator == "k3"
    # 8 completions per device and step = 1 prompt x 8 generations, one optimizer step per generation
    assert (c.ppo.batch_size, c.ppo.num_mini_batches, c.ppo.gradient_accumulation_steps) == (1, 1, 1)
    assert c.train.num_train_epochs == 3.0 and c.train.save_steps == 500 and c.ppo.lr_scheduler_type == "linear"
    assert c.model.gradient_checkpointing is True and c.ppo.mask_truncated_completions is False
    assert c.sampling.rollout_engine == "hf"


@pytest.mark.parametrize("loss_type, loss_agg", [("grpo", "seq_mean_token_mean"), ("dapo", "token_mean"),
                                                 ("bnpo", "token_mean"), ("dr_grpo", "token_sum_fixed")])
def test_loss_types(loss_type, loss_agg):
    assert translate(loss_type=loss_type).ppo.loss_agg == loss_agg


@pytest.mark.parametrize("scale, ours", [("group", "group"), ("batch", "batch"), ("none", "none"), (True, "group"),
                                         (False, "none")])
def test_scale_rewards(scale, ours):
    assert translate(scale_rewards=scale).ppo.advantage_scale == ours


def test_batches_count_completions_per_device():
    # validate=False: use_vllm needs vllm installed to validate
    c = translate(validate=False, per_device_train_batch_size=16, gradient_accumulation_steps=2, steps_per_generation=4,
                  num_generations=4, beta=0.04, epsilon_high=0.28, max_steps=7, use_vllm=True, num_iterations=2)
    # 16 x 4 = 64 completions per process = 16 prompts x 4; 4 steps of 2 micro-batches of 16 completions each
    assert (c.ppo.batch_size, c.ppo.num_mini_batches, c.ppo.gradient_accumulation_steps) == (16, 2, 2)
    assert c.ppo.kl_coef == 0.04 and c.ppo.clip_range_high == 0.28 and c.train.max_updates == 7
    assert c.sampling.rollout_engine == "vllm" and c.ppo.ppo_epochs == 2


def test_what_llm_rl_cannot_do_is_refused_all_at_once():
    with pytest.raises(ConfigError) as e:
        translate(importance_sampling_level="sequence", bf16=True, per_device_train_batch_size=6, loss_type="sapo",
                  warmup_ratio=0.1)
    message = str(e.value)
    assert "importance_sampling_level: 'sequence' is not supported (sequence-level ratios (GSPO)" in message
    assert "bf16: True is not supported (mixed precision comes from accelerate" in message
    assert "6 completions per process is not a multiple of num_generations=8" in message
    assert "loss_type: 'sapo' is not one of grpo, dapo, bnpo, dr_grpo" in message
    assert "warmup_ratio: give warmup_steps" in message


def test_accepted_at_the_value_llm_rl_does():
    translate(importance_sampling_level="token", bf16=False, disable_dropout=True, adam_beta1=0.9, shuffle_dataset=True)


def test_a_config_error_comes_before_torch(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({**BASE, "loss_type": "sapo"}))
    code = ("import sys; from llm_rl.cli import main; rc = main(['grpo', '--config', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "loss_type: 'sapo' is not one of grpo, dapo, bnpo, dr_grpo" in proc.stderr
