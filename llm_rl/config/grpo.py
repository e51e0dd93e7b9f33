"""`llm-rl grpo`: a run configured in TRL's `GRPOConfig` names, with TRL's defaults, translated to llm_rl's `Config`.

A TRL user's YAML (GRPOConfig fields plus the script's model_name_or_path, dataset_name, reward_funcs)
runs unchanged. Each TRL name maps to the llm_rl key that does the same thing (`TRL_KEYS`); a setting
llm_rl does only at one value is accepted at that value and refused at any other (`FIXED`); a TRL name
llm_rl cannot do is refused with the reason (`REFUSED`). Other keys are llm_rl's own and pass through.
The defaults (`TRL_DEFAULTS`) are TRL 1.16's where they differ from `llm-rl ppo`'s. No torch here.
"""

from __future__ import annotations

from typing import Any

from llm_rl.config.errors import ConfigError

# GRPOConfig's defaults (TRL 1.16.0, read from its dataclass) that differ from llm-rl ppo's
TRL_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6, "num_generations": 8, "beta": 0.0, "max_completion_length": 512, "epsilon": 0.2,
    "loss_type": "dapo", "scale_rewards": "group", "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
    "num_train_epochs": 3.0, "lr_scheduler_type": "linear", "save_steps": 500, "gradient_checkpointing": True,
}

# TRL name -> llm_rl key, for names whose value carries over as it is
TRL_KEYS = {
    "max_completion_length": "max_new_tokens", "epsilon": "clip_range", "epsilon_high": "clip_range_high",
    "num_iterations": "ppo_epochs", "dataset_train_split": "dataset_split", "dataset_test_split": "eval_split",
    "dataset_config": "dataset_config", "model_name_or_path": "model_name_or_path",
    "vllm_max_model_length": "vllm_max_model_len",
}

LOSS_TYPES = {  # TRL loss_type -> llm_rl loss_agg
    "grpo": "seq_mean_token_mean",  # mean over each completion's tokens, then over completions
    "dapo": "token_mean",  # over all tokens of the mini-batch, on every process
    "bnpo": "token_mean",  # TRL: this process's tokens; here all processes' (the same on one process)
    "dr_grpo": "token_sum_fixed",  # sum / (completions x max_completion_length)
}
SCALES = {"group": "group", "batch": "batch", "none": "none", True: "group", False: "none"}

# settings llm_rl does at one value only: (that value, why)
FIXED: dict[str, tuple[Any, str]] = {
    "importance_sampling_level": ("token", "sequence-level ratios (GSPO) are not implemented"),
    "vllm_mode": ("colocate", "the engine runs inside each training process; there is no vLLM server mode"),
    "repetition_penalty": (1.0, "PPO scores every token under softmax(logits / temperature); a penalty would change it"),
    "min_p": (None, "see repetition_penalty"),
    "top_entropy_quantile": (1.0, "training on the high-entropy tokens only is not implemented"),
    "delta": (None, "two-sided clipping (delta) is not implemented; dual_clip is the llm_rl key for negative advantages"),
    "multi_objective_aggregation": ("sum_then_normalize", "rewards are summed with reward_weights, then normalised"),
    "sync_ref_model": (False, "the reference stays the initial policy"),
    "shuffle_dataset": (True, "prompts are always drawn in a seeded shuffled order"),
    "disable_dropout": (True, "dropout is always off in the policy, so sampling and training see one model"),
    "adam_beta1": (0.9, "AdamW runs with torch's betas"), "adam_beta2": (0.999, "AdamW runs with torch's betas"),
    "adam_epsilon": (1e-8, "AdamW runs with torch's eps"),
    "bf16": (False, "mixed precision comes from accelerate: `accelerate launch --mixed_precision bf16 -m llm_rl.cli grpo`"),
    "fp16": (False, "mixed precision comes from accelerate: `accelerate launch --mixed_precision fp16 -m llm_rl.cli grpo`"),
}
FIXED_DEFAULTS_UNSET = {"min_p", "delta", "bf16", "fp16", "disable_dropout"}  # TRL's default is None/False: accepted too

REFUSED = {
    "generation_batch_size": "give steps_per_generation (generation_batch_size = per_device_train_batch_size x "
                             "steps_per_generation per process)",
    "vllm_server_host": "there is no vLLM server mode", "vllm_server_port": "there is no vLLM server mode",
    "warmup_ratio": "give warmup_steps", "use_liger_loss": "the Liger kernel loss is not used",
}


def grpo_values(raw: dict) -> dict:
    """llm_rl's flat config values for a GRPOConfig-shaped dict (TRL's defaults under what it leaves out)."""
    given = {**TRL_DEFAULTS, **raw}
    problems = [f"{k}: {why}" for k, why in REFUSED.items() if k in raw]
    problems += [fixed_problem(k, given[k]) for k in FIXED if k in given and fixed_problem(k, given[k])]
    out = {TRL_KEYS[k]: v for k, v in given.items() if k in TRL_KEYS}
    out.update(critic_free(given, problems))
    out.update(batches(given, problems))
    used = {*TRL_KEYS, *FIXED, *REFUSED, *CONSUMED}
    out.update({k: v for k, v in given.items() if k not in used})  # llm_rl's own keys and the shared names
    if problems:
        raise ConfigError("llm-rl grpo cannot do what these GRPOConfig settings ask:\n  " + "\n  ".join(problems))
    return out


CONSUMED = {"beta", "loss_type", "scale_rewards", "use_vllm", "per_device_train_batch_size", "steps_per_generation",
            "gradient_accumulation_steps", "max_steps"}


def fixed_problem(key: str, value: Any) -> str:
    allowed, why = FIXED[key]
    if value == allowed or (value in (None, False) and key in FIXED_DEFAULTS_UNSET):
        return ""
    return f"{key}: {value!r} is not supported ({why}); leave it out or set {allowed!r}"


def critic_free(given: dict, problems: list[str]) -> dict:
    """GRPO's algorithm keys: group advantages, no value head; beta > 0 puts a k3 KL in the loss."""
    loss_type, scale = given["loss_type"], given["scale_rewards"]
    if loss_type not in LOSS_TYPES:
        problems.append(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if scale not in SCALES:
        problems.append(f"scale_rewards: {scale!r} is not one of group, batch, none")
    beta = float(given["beta"])
    out = {"advantage_estimator": "grpo", "loss_agg": LOSS_TYPES.get(loss_type), "advantage_scale": SCALES.get(scale),
           "kl_coef": beta, "kl_placement": "loss", "kl_estimator": "k3",
           "rollout_engine": "vllm" if given.get("use_vllm") else "hf"}
    if given.get("max_steps", -1) not in (-1, None):
        out["max_updates"] = given["max_steps"]
    return out


def batches(given: dict, problems: list[str]) -> dict:
    """TRL counts completions per device and step; llm_rl counts prompts per process and update. One
    generation of steps_per_generation x per_device_train_batch_size completions is one llm_rl update whose
    optimizer steps (num_mini_batches) are steps_per_generation / gradient_accumulation_steps."""
    per_device, accumulation = int(given["per_device_train_batch_size"]), int(given["gradient_accumulation_steps"])
    steps = int(given.get("steps_per_generation") or accumulation)
    generations = int(given["num_generations"])
    completions = per_device * steps
    if completions % generations:
        problems.append(f"per_device_train_batch_size x steps_per_generation = {completions} completions per process "
                        f"is not a multiple of num_generations={generations}: each process samples whole groups")
    if steps % accumulation:
        problems.append(f"steps_per_generation={steps} is not a multiple of gradient_accumulation_steps={accumulation}")
    return {"batch_size": max(completions // generations, 1), "num_generations": generations,
            "gradient_accumulation_steps": accumulation, "num_mini_batches": max(steps // accumulation, 1)}
