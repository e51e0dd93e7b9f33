"""From a Config to a finished run: load tokenizer, policy, reference, rewards and prompts, then train.

`recipes/ppo.py` and `llm-rl ppo` both call `run_ppo(config)`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

from accelerate.utils import set_seed

from llm_rl.advantages import ESTIMATORS
from llm_rl.config import Config, ConfigError, loading
from llm_rl.data import EpisodeRows, PromptData, load_prompt_dataset
from llm_rl.modeling import CausalLMWithValueHead
from llm_rl.rewards import RewardModel, load_reward_function

logger = logging.getLogger(__name__)


PAD_TOKEN = "<|pad|>"


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer with left padding for generation and a pad token distinct from EOS (`ensure_distinct_pad`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    ensure_distinct_pad(tokenizer)
    return tokenizer


def ensure_distinct_pad(tokenizer) -> bool:
    """Give the tokenizer a pad token that is not EOS: its unk token when that differs from EOS, else
    a new `<|pad|>`; True when a token was added (the model's embeddings may need a new row).

    llm_rl never infers masks from pad ids, but a distinct pad keeps EOS visible to any code that
    does: transformers' last-token pooling in sequence classifiers (reward models) among them.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def load_policy(config: Config, tokenizer) -> CausalLMWithValueHead:
    m = config.model
    if m.model_name_or_path is None:
        raise ConfigError("model_name_or_path is not set: give a Hub id or a local folder of a causal LM")
    policy = CausalLMWithValueHead.from_pretrained(
        m.model_name_or_path,
        value_head=ESTIMATORS[config.ppo.advantage_estimator].needs_values,  # critic-free: no head to store or train
        value_head_path=m.value_model_name_or_path,
        value_head_init_std=m.value_head_init_std,
        torch_dtype=m.torch_dtype,
        trust_remote_code=m.trust_remote_code,
    )
    resize_for_tokenizer(policy.pretrained_model, tokenizer)
    if m.use_peft:
        policy.pretrained_model = add_lora(policy.pretrained_model, m, gradient_checkpointing=m.gradient_checkpointing)
    return policy


def add_lora(model, lora_options, task_type: str = "CAUSAL_LM", gradient_checkpointing: bool = False):
    """Wrap `model` in a peft LoRA model: only adapter weights stay trainable.

    `lora_options` holds lora_r, lora_alpha, lora_dropout and lora_target_modules (a PPO
    `ModelConfig` or a `RewardTrainingConfig`). `task_type` "SEQ_CLS" (reward models) also trains
    and saves the classifier's score head (peft's modules_to_save).
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora_options.lora_target_modules
    lora = LoraConfig(
        task_type=task_type,
        r=lora_options.lora_r,
        lora_alpha=lora_options.lora_alpha,
        lora_dropout=lora_options.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2 stores weights transposed
    )
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input when the embeddings are frozen
    return get_peft_model(model, lora)


def resize_for_tokenizer(lm, tokenizer) -> bool:
    """Grow the embeddings when the tokenizer gained a token (the pad) the model has no row for;
    True when they grew (a LoRA adapter must then carry the embeddings)."""
    if len(tokenizer) <= lm.get_input_embeddings().weight.shape[0]:
        return False
    logger.warning("resizing token embeddings to %d for the added pad token", len(tokenizer))
    lm.resize_token_embeddings(len(tokenizer))
    return True


def load_reference(config: Config, tokenizer) -> Optional[CausalLMWithValueHead]:
    """An explicit reference model, or None (the trainer then copies the initial policy)."""
    m = config.model
    if m.ref_model_name_or_path is None:
        return None
    ref = CausalLMWithValueHead.from_pretrained(
        m.ref_model_name_or_path, value_head=False, torch_dtype=m.torch_dtype, trust_remote_code=m.trust_remote_code
    )
    resize_for_tokenizer(ref.pretrained_model, tokenizer)
    return ref


def load_rewards(config: Config) -> list:
    r = config.reward
    rewards = []
    if r.reward_model_name_or_path is not None:
        rewards.append(
            RewardModel.from_pretrained(
                r.reward_model_name_or_path,
                trust_remote_code=config.model.trust_remote_code,
                torch_dtype=config.model.torch_dtype,
            )
        )
    rewards += [load_reward_function(spec) for spec in r.reward_funcs]
    if not rewards and config.environment.environment is None:  # an environment gives its own rewards
        raise ConfigError("no reward: set reward_model_name_or_path and/or reward_funcs ('module:function')")
    return rewards


def load_prompts(config: Config, tokenizer) -> PromptData | EpisodeRows:
    """The training prompts; with an environment, the dataset rows its episodes start from."""
    d = config.data
    if d.dataset_name is None:
        raise ConfigError("dataset_name is not set: give a Hub dataset id or a local .json/.jsonl/.csv/.parquet file")
    dataset = load_prompt_dataset(d.dataset_name, d.dataset_split, d.dataset_config)
    if config.environment.environment is not None:
        return EpisodeRows(dataset)
    return PromptData(dataset, tokenizer, d.prompt_column, d.max_prompt_length, d.truncate_prompts)


def load_eval_prompts(config: Config, tokenizer) -> Optional[PromptData]:
    """The held-out prompts (`eval_dataset_name` / `eval_split`), or None when none are configured."""
    if config.eval_dataset is None:
        return None
    name, split = config.eval_dataset
    d = config.data
    dataset = load_prompt_dataset(name, split, d.dataset_config if name == d.dataset_name else None)
    if d.eval_max_prompts is not None and len(dataset) > d.eval_max_prompts:
        dataset = dataset.select(range(d.eval_max_prompts))
    return PromptData(dataset, tokenizer, d.prompt_column, d.max_prompt_length, d.truncate_prompts)


def load_eval_rewards(config: Config) -> Optional[list]:
    """The eval reward functions, or None: evaluation then uses the training rewards."""
    specs = config.reward.eval_reward_funcs
    return [load_reward_function(spec) for spec in specs] if specs else None


def run_ppo(config: Config, callbacks: Sequence = ()):
    """Load everything the config names and train (with `llm_rl.callbacks.TrainerCallback`s); returns the
    trainer and per-update metrics."""
    from llm_rl.trainer import PPOTrainer

    config.validate()
    config.check_paths()
    set_seed(config.train.seed)  # identical initial weights (value head) on every process
    m = config.model
    tokenizer_name = m.tokenizer_name_or_path or m.model_name_or_path
    with loading("tokenizer_name_or_path" if m.tokenizer_name_or_path else "model_name_or_path", tokenizer_name):
        tokenizer = load_tokenizer(tokenizer_name, m.trust_remote_code)
    with loading("reward_model_name_or_path", config.reward.reward_model_name_or_path):
        rewards = load_rewards(config)
    prompts = load_prompts(config, tokenizer)
    with loading("model_name_or_path", m.model_name_or_path):
        policy = load_policy(config, tokenizer)
    with loading("ref_model_name_or_path", m.ref_model_name_or_path):
        reference = load_reference(config, tokenizer)
    trainer = PPOTrainer(
        config, policy, tokenizer, prompts, rewards, ref_model=reference, callbacks=callbacks,
        eval_prompts=load_eval_prompts(config, tokenizer), eval_rewards=load_eval_rewards(config),
    )
    history = trainer.train()
    return trainer, history
