"""The option names of TRL and OpenRLHF, mapped to the keys they mean here, and the "unknown key" message.

A key a config does not have is reported with the key meant (when it is a known alias, with what
differs in meaning) or the closest valid keys; aliases are only suggested, never applied.
"""

from __future__ import annotations

import difflib
from typing import Optional

# Names TRL (PPOConfig, GRPOConfig, RewardConfig, ScriptArguments) and OpenRLHF users type, the key
# they mean here, and what differs in meaning. Only suggested, never applied: a silent rename could
# hide such a difference.
ALIASES: dict[str, tuple[str, str]] = {
    "per_device_train_batch_size": ("batch_size", "batch_size counts prompts per process per update; each gives "
                                    "num_generations completions (TRL's GRPO counts completions)"),
    "rollout_batch_size": ("batch_size", "batch_size is per process: OpenRLHF's rollout_batch_size / processes"),
    "train_batch_size": ("num_mini_batches", "the optimizer steps num_mini_batches times per epoch over the rollout"),
    "micro_train_batch_size": ("gradient_accumulation_steps",
                               "micro-batch size = batch_size * num_generations / (num_mini_batches * "
                               "gradient_accumulation_steps)"),
    "max_completion_length": ("max_new_tokens", ""),
    "response_length": ("max_new_tokens", ""),
    "generate_max_len": ("max_new_tokens", ""),
    "prompt_max_len": ("max_prompt_length", ""),
    "beta": ("kl_coef", "the KL goes into the token rewards by default; kl_placement: loss puts it in the loss "
                        "like GRPO's beta"),
    "init_kl_coef": ("kl_coef", ""),
    "adap_kl_ctrl": ("adaptive_kl", ""),
    "target_kl": ("kl_target", "a KL per sequence that the adaptive controller steers towards"),
    "epsilon": ("clip_range", "clip_range_high is the upper bound (TRL's epsilon_high)"),
    "epsilon_high": ("clip_range_high", ""),
    "epsilon_low": ("clip_range", ""),
    "use_bias_correction_kl": ("kl_ratio_weighted", "TRL 1.16 defaults it to true; here it is off unless set"),
    "cliprange": ("clip_range", ""),
    "eps_clip": ("clip_range", ""),
    "cliprange_value": ("clip_range_value", ""),
    "value_clip": ("clip_range_value", ""),
    "num_ppo_epochs": ("ppo_epochs", ""),
    "max_epochs": ("ppo_epochs", "passes over each rollout batch"),
    "num_iterations": ("ppo_epochs", ""),
    "lambd": ("lam", ""),
    "entropy_coef": ("ent_coef", ""),
    "loss_type": ("loss_agg", "token_mean is TRL's dapo, seq_mean_token_mean grpo, micro_batch_token_mean bnpo, "
                              "token_sum_over_max_length dr_grpo; `llm-rl grpo` takes loss_type itself"),
    "scale_rewards": ("advantage_scaling", "group, batch or none, for advantage_estimator grpo"),
    "n_samples_per_prompt": ("num_generations", ""),
    "max_tool_calling_iterations": ("max_turns", "max_turns counts every bot turn, the answer after the last tool "
                                                 "result included: max_tool_calling_iterations + 1"),
    "bf16": ("torch_dtype", "mixed precision comes from accelerate (`accelerate launch --mixed_precision bf16`); "
                            "torch_dtype: bfloat16 is for a frozen LoRA base only (trained weights stay float32)"),
    "fp16": ("torch_dtype", "mixed precision comes from accelerate (`accelerate launch --mixed_precision fp16`)"),
    "lr": ("learning_rate", ""),
    "actor_learning_rate": ("learning_rate", "one optimizer trains policy and value head; vf_coef weights the value loss"),
    "critic_learning_rate": ("vf_coef", "the value head shares the policy's optimizer; vf_coef weights its loss"),
    "max_norm": ("max_grad_norm", ""),
    "l2": ("weight_decay", ""),
    "warmup_ratio": ("warmup_steps", "warmup is counted in optimizer steps, not as a fraction"),
    "lr_warmup_ratio": ("warmup_steps", "warmup is counted in optimizer steps, not as a fraction"),
    "total_episodes": ("max_updates", "one update uses batch_size prompts per process"),
    "max_steps": ("max_updates", "one update = one rollout and its PPO epochs"),
    "num_episodes": ("num_train_epochs", "passes over the prompts"),
    "sft_model_path": ("model_name_or_path", ""),
    "pretrain": ("model_name_or_path", ""),
    "ref_model_path": ("ref_model_name_or_path", ""),
    "ref_pretrain": ("ref_model_name_or_path", ""),
    "reward_model_path": ("reward_model_name_or_path", ""),
    "reward_pretrain": ("reward_model_name_or_path", ""),
    "value_model_path": ("value_model_name_or_path", "only a value head (value_head.safetensors) is read from it"),
    "critic_pretrain": ("value_model_name_or_path", "only a value head (value_head.safetensors) is read from it"),
    "prompt_data": ("dataset_name", ""),
    "dataset_train_split": ("dataset_split", ""),
    "dataset_test_split": ("eval_split", ""),
    "eval_dataset": ("eval_dataset_name", ""),
    "input_key": ("prompt_column", ""),
    "lora_rank": ("lora_r", ""),
    "target_modules": ("lora_target_modules", ""),
    "stop_token_id": ("stop_token", "give the token's text"),
    "save_path": ("output_dir", ""),
    "ckpt_path": ("output_dir", "checkpoints go to OUTPUT_DIR/checkpoint-N"),
    "load_checkpoint": ("resume_from_checkpoint", "'latest' or a checkpoint-N folder"),
    "logging_first_step": ("logging_steps", ""),
    "log_completions": ("log_completions_steps", "every N updates instead of a switch"),
    "use_wandb": ("report_to", "report_to: wandb"),
    "wandb_project": ("run_name", "the project comes from WANDB_PROJECT"),
    "use_vllm": ("rollout_engine", "rollout_engine: vllm (in the training process, TRL's vllm_mode colocate)"),
    "vllm_mode": ("rollout_engine", "the engine always runs colocated, in each training process"),
    "vllm_max_model_length": ("vllm_max_model_len", ""),
    "vllm_importance_sampling_cap": ("vllm_importance_sampling_clip_max", ""),
}


def alias_hint(key: str, candidates: list[str], aliases: dict[str, tuple[str, str]],
               sections: Optional[dict[str, str]] = None) -> Optional[str]:
    """' Did you mean X? (note)' for a TRL/OpenRLHF name whose counterpart is among `candidates`, or
    (`sections`: every key's section) stands in another section."""
    target, note = aliases.get(key, (None, ""))
    note = f" Note: {note}." if note else ""
    if target in candidates:
        return f" Did you mean {target}?{note}"
    if sections and target in sections:
        return f" Did you mean {target} (in section '{sections[target]}')?{note}"
    return None


def unknown_key_message(
    key: str, source: str, candidates: list[str], section: Optional[str] = None,
    help_command: str = "llm-rl ppo --help", aliases: Optional[dict[str, tuple[str, str]]] = None,
    sections: Optional[dict[str, str]] = None,
) -> str:
    """'unknown key' naming the key meant (TRL/OpenRLHF names, `aliases`), or the closest of the valid
    keys `candidates` (those of `section` when one was given; `sections` maps every key to its section)."""
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    where = f" in section '{section}'" if section else ""
    hint = alias_hint(key, candidates, ALIASES if aliases is None else aliases, sections)
    if hint is None:
        hint = f" Did you mean: {', '.join(close)}?" if close else f" Run `{help_command}` for the list of keys."
    return f"{source}: unknown key '{key}'{where}.{hint}"
