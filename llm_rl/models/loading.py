"""From a config to models: the tokenizer (left padding, a pad distinct from EOS), the policy with or
without a value head (the estimator decides), an explicit reference, embeddings grown for an added pad
token, and LoRA adapters (peft). A Hub id and a local folder take the same `from_pretrained` path."""

from __future__ import annotations

import logging
from typing import Optional

from llm_rl.config.errors import ConfigError
from llm_rl.config.sections import Config
from llm_rl.config.variants import ADVANTAGE_ESTIMATORS
from llm_rl.models.value_head import CausalLMWithValueHead

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
        # critic-free: no head to store or train
        value_head=ADVANTAGE_ESTIMATORS[config.ppo.advantage_estimator].needs_values,
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
