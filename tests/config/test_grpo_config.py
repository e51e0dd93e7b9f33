"""`llm-rl grpo`'s config: TRL GRPOConfig's names and defaults, translated to llm_rl's Config; what llm_rl
cannot do exactly is refused by name, and llm_rl's own names point to TRL's."""

from __future__ import annotations

import pytest

from llm_rl.config.errors import ConfigError
from llm_rl.config.grpo import GRPOArguments

BASE = {"model_name_or_path": "m", "dataset_name": "d.jsonl", "reward_funcs": ["pkg.mod:fn"]}


def grpo(**values):
    return GRPOArguments.from_dict({**BASE, **values}).to_config()


def test_trls_defaults_become_llm_rl_values():
    """TRL 1.16: 8 completions per micro-batch, 8 per prompt, one optimizer step per generation, beta 0 (no
    reference), lr 1e-6, 512 tokens, dapo (token_mean), group std, linear schedule, 3 epochs."""
    c = grpo()
    assert (c.ppo.advantage_estimator, c.ppo.num_generations, c.ppo.batch_size) == ("grpo", 8, 1)
    assert (c.ppo.num_mini_batches, c.ppo.gradient_accumulation_steps, c.ppo.ppo_epochs) == (1, 1, 1)
    assert (c.ppo.kl_coef, c.ppo.adaptive_kl, c.ppo.learning_rate) == (0.0, False, 1e-6)
    assert (c.ppo.clip_range, c.ppo.clip_range_high) == (0.2, None)
    assert (c.ppo.loss_agg, c.ppo.advantage_scaling, c.ppo.mask_truncated_completions) == ("token_mean", "group", False)
    assert (c.sampling.max_new_tokens, c.sampling.temperature, c.sampling.top_k, c.sampling.top_p) == (512, 1.0, 0, 1.0)
    assert (c.ppo.lr_scheduler_type, c.ppo.max_grad_norm, c.ppo.weight_decay) == ("linear", 1.0, 0.0)
    assert (c.train.num_train_epochs, c.train.max_updates, c.train.logging_steps, c.train.save_steps) == (3.0, None, 10, 500)
    assert (c.train.output_dir, c.train.seed, c.model.gradient_checkpointing) == ("trainer_output", 42, True)
    assert c.reward.reward_funcs == ["pkg.mod:fn"] and c.data.dataset_split == "train"


def test_completions_per_micro_batch_become_prompts_per_update():
    """16 completions per micro-batch, 2 micro-batches per step, 4 per generation, 4 per prompt, 2 passes:
    (bnpo: dapo refuses steps_per_generation above gradient_accumulation_steps) 64 completions = 16 prompts per update, 2 optimizer steps per pass, 4 per update; max_steps 8 = 2 updates;
    logging_steps 10 -> every 3 updates (rounded up), save_steps 500 -> 125."""
    c = grpo(per_device_train_batch_size=16, gradient_accumulation_steps=2, steps_per_generation=4,
             num_generations=4, num_iterations=2, max_steps=8, loss_type="bnpo")
    assert (c.ppo.batch_size, c.ppo.num_generations, c.ppo.num_mini_batches) == (16, 4, 2)
    assert (c.ppo.gradient_accumulation_steps, c.ppo.ppo_epochs, c.train.max_updates) == (2, 2, 2)
    assert (c.train.logging_steps, c.train.save_steps) == (3, 125)


@pytest.mark.parametrize("loss_type, loss_agg", [("grpo", "seq_mean_token_mean"), ("dapo", "token_mean"),
                                                 ("bnpo", "micro_batch_token_mean"),
                                                 ("dr_grpo", "token_sum_over_max_length")])
def test_loss_types(loss_type, loss_agg):
    assert grpo(loss_type=loss_type).ppo.loss_agg == loss_agg


def test_beta_puts_k3_in_the_loss_and_epsilon_high_clips_above():
    c = grpo(beta=0.04, epsilon=0.1, epsilon_high=0.28)
    assert (c.ppo.kl_coef, c.ppo.kl_placement, c.ppo.kl_estimator, c.ppo.kl_ratio_weighted) == (0.04, "loss", "k3", True)
    assert (c.ppo.clip_range, c.ppo.clip_range_high) == (0.1, 0.28)
    assert grpo(beta=0.04, use_bias_correction_kl=False).ppo.kl_ratio_weighted is False


@pytest.mark.parametrize("given, scaling", [("group", "group"), ("batch", "batch"), ("none", "none"),
                                           (True, "group"), (False, "none")])
def test_scale_rewards_with_trls_legacy_booleans(given, scaling):
    assert grpo(scale_rewards=given).ppo.advantage_scaling == scaling


def test_vllm_and_the_rest_of_the_run():
    c = grpo(use_vllm=False, vllm_mode="colocate", mask_truncated_completions=True, disable_tqdm=True,
             log_completions=True, logging_steps=4, hub_private_repo=None, shuffle_dataset=False, bf16=False)
    assert c.sampling.rollout_engine == "hf" and c.ppo.mask_truncated_completions is True
    assert (c.train.progress_bar, c.train.log_completions_steps, c.train.hub_private_repo) == (False, 4, False)
    assert c.data.shuffle is False


@pytest.mark.parametrize("values, message", [
    ({"loss_type": "cispo"}, "loss_type 'cispo' is not supported by llm-rl grpo; use one of bnpo, dapo, dr_grpo, grpo"),
    ({"loss_type": "grpo", "mask_truncated_completions": True}, "counts each masked completion as a 0"),
    ({"steps_per_generation": 2}, "loss_type dapo with steps_per_generation above gradient_accumulation_steps"),
    ({"steps_per_generation": 3, "gradient_accumulation_steps": 2, "loss_type": "bnpo"},
     "steps_per_generation (3) must be a multiple of gradient_accumulation_steps (2)"),
    ({"per_device_train_batch_size": 6, "num_generations": 4},
     "per_device_train_batch_size * steps_per_generation (6) completions per process must be a multiple of "
     "num_generations (4)"),
    ({"max_steps": 3, "num_iterations": 2}, "max_steps (3) must be a multiple of the 2 optimizer steps"),
    ({"num_generations": 1, "per_device_train_batch_size": 1}, "num_generations must be >= 2"),
    ({"scale_rewards": "std"}, "scale_rewards is group, batch or none"),
    ({"epsilon_high": 0}, "epsilon_high must be > 0"),
    ({"importance_sampling_level": "sequence"},
     "importance_sampling_level: 'sequence' is not supported by llm-rl grpo (the ratio is per token"),
    ({"bf16": True}, "bf16: True is not supported by llm-rl grpo (mixed precision comes from accelerate"),
    ({"repetition_penalty": 1.1}, "repetition_penalty: 1.1 is not supported"),
    ({"vllm_mode": "server"}, "vllm_mode: 'server' is not supported"),
    ({"entropy_coef": 0.01}, "entropy_coef: 0.01 is not supported"),
])
def test_what_llm_rl_cannot_do_exactly_is_one_line_naming_the_field(values, message):
    with pytest.raises(ConfigError) as caught:
        grpo(**values)
    assert message in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_every_unsupported_value_and_unknown_key_in_one_error():
    with pytest.raises(ConfigError) as caught:
        grpo(delta=2.0, min_p=0.1)
    assert str(caught.value).splitlines()[0] == "2 keys to fix in the config:"
    with pytest.raises(ConfigError) as caught:
        GRPOArguments.from_dict({**BASE, "kl_coef": 0.1, "max_new_tokens": 8, "batch_size": 4, "learning_rat": 1})
    lines = str(caught.value).splitlines()
    assert lines[0] == "4 unknown keys in config:"
    assert "unknown key 'kl_coef'. Did you mean beta?" in lines[1]
    assert "Did you mean max_completion_length?" in lines[2]
    assert "Did you mean per_device_train_batch_size? Note: it counts completions" in lines[3]
    assert "Did you mean: learning_rate?" in lines[4]


def test_llm_rls_own_checks_still_apply():
    with pytest.raises(ConfigError, match="unknown tracker"):
        grpo(report_to="tensorbord")
    with pytest.raises(ConfigError, match="lr_scheduler_type"):
        grpo(lr_scheduler_type="cosine_with_restarts")
