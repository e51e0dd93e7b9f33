"""`llm-rl grpo`'s config: TRL's `GRPOConfig` names and defaults (TRL 1.16, the newest on PyPI here), the
script arguments of a TRL GRPO script, and the few keys llm_rl needs besides; `to_config` turns it into
llm_rl's `Config` (llm_rl.config.sections), which the same trainer as `llm-rl ppo` runs.

The file is flat, as a TRL user writes `GRPOConfig(...)` / its YAML. A GRPOConfig field llm_rl cannot do
exactly is refused with one line naming it (`RESTRICTED`: accepted only at the values it can do), never
ignored; a key that is neither takes the "unknown key" path (all of them in one error, nearest names).

Sizes: TRL counts completions. `per_device_train_batch_size` completions per process per micro-batch,
`gradient_accumulation_steps` micro-batches per optimizer step, `steps_per_generation` micro-batches per
generation (default: one optimizer step per generation), `num_iterations` passes over each generation. Here
that is `batch_size = per_device_train_batch_size * steps_per_generation / num_generations` prompts per process
per update, `num_mini_batches = steps_per_generation / gradient_accumulation_steps` and
`ppo_epochs = num_iterations`; `max_steps`, `logging_steps` and `save_steps` count optimizer steps there,
updates here.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llm_rl.config.aliases import unknown_key_message
from llm_rl.config.errors import ConfigError
from llm_rl.config.loading import KeyProblems, UnknownKey, coerce, fill_from_yaml, option_lines, set_each
from llm_rl.config.rules import Rule, check
from llm_rl.config.sections import Config
from llm_rl.config.variants import LOSS_AGGREGATIONS, aggregation_of_loss_type

MIXED_PRECISION = ("mixed precision comes from accelerate (`accelerate launch --mixed_precision bf16`); the trained "
                   "weights stay float32")
# GRPOConfig fields llm_rl does only at these values: (the values accepted, why no other)
RESTRICTED: dict[str, tuple[tuple, str]] = {
    "bf16": ((False, None), MIXED_PRECISION),
    "fp16": ((False,), MIXED_PRECISION),
    "importance_sampling_level": (("token",), "the ratio is per token (no GSPO sequence-level ratio)"),
    "delta": ((None,), "there is no two-sided (INTELLECT-2) upper clip of the ratio"),
    "multi_objective_aggregation": (("sum_then_normalize",), "rewards are weighted and summed, then normalised"),
    "entropy_coef": ((0.0,), "TRL's entropy bonus (masked by top_entropy_quantile, adaptive) is not reproduced; "
                             "`llm-rl ppo` has ent_coef"),
    "use_adaptive_entropy": ((False,), "there is no adaptive entropy bonus"),
    "top_entropy_quantile": ((1.0,), "every token trains, whatever its entropy"),
    "sync_ref_model": ((False,), "the reference is the initial policy and never synced"),
    "repetition_penalty": ((1.0,), "the loss scores tokens under the sampling softmax: no other logits processor"),
    "min_p": ((None,), "the loss scores tokens under the sampling softmax: no other logits processor"),
    "generation_kwargs": ((None,), "sampling takes only temperature, top_k and top_p"),
    "chat_template_kwargs": ((None,), "the chat template is applied without extra arguments"),
    "generation_batch_size": ((None,), "set steps_per_generation instead (generation_batch_size = "
                                       "per_device_train_batch_size * processes * steps_per_generation)"),
    "num_generations_eval": ((None,), "there is no GRPO evaluation loop"),
    "vllm_mode": (("colocate",), "the vLLM engine always runs in each training process"),
    "vllm_tensor_parallel_size": ((1,), "one vLLM engine per process, no tensor parallelism"),
    "off_policy_mask_threshold": ((None,), "there is no off-policy sequence mask"),
    "model_init_kwargs": ((None,), "the policy loads with trust_remote_code only (dtype float32)"),
    "remove_unused_columns": ((False,), "every dataset column reaches the reward functions"),
    "disable_dropout": ((True,), "dropout is always off, so the rollout and the training forwards agree"),
    "max_tool_calling_iterations": ((None,), "tools are not called here"),
    "cast_lm_head_to_fp32": ((False,), "the weights are float32 already"),
}
LOSS_TYPES = {v.trl_loss_type for v in LOSS_AGGREGATIONS.values() if v.trl_loss_type}
# llm_rl's names in a `llm-rl grpo` file: the GRPOConfig name meant, and what differs
GRPO_ALIASES: dict[str, tuple[str, str]] = {
    "kl_coef": ("beta", ""), "clip_range": ("epsilon", ""), "clip_range_high": ("epsilon_high", ""),
    "max_new_tokens": ("max_completion_length", ""), "ppo_epochs": ("num_iterations", ""),
    "batch_size": ("per_device_train_batch_size", "it counts completions per process per micro-batch"),
    "num_mini_batches": ("steps_per_generation", "micro-batches per generation"),
    "loss_agg": ("loss_type", ""), "advantage_scaling": ("scale_rewards", ""),
    "max_updates": ("max_steps", "it counts optimizer steps"), "dataset_split": ("dataset_train_split", ""),
    "rollout_engine": ("use_vllm", ""), "vllm_max_model_len": ("vllm_max_model_length", ""),
    "kl_ratio_weighted": ("use_bias_correction_kl", ""), "shuffle": ("shuffle_dataset", ""),
    "progress_bar": ("disable_tqdm", ""), "log_completions_steps": ("log_completions", "a switch"),
    "max_seq_length": ("max_completion_length", ""),
}


@dataclass
class GRPOArguments:
    """A TRL GRPO script's arguments: GRPOConfig's fields (TRL's defaults) and its script arguments."""

    # ---- the script's arguments (TRL's ScriptArguments / ModelConfig) and what llm_rl needs besides
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Policy: a Hub id or a local folder."})
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Prompts: a Hub dataset id, a local folder or a .json/.jsonl/.csv/.parquet file."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to take prompts from."})
    reward_funcs: list[str] = field(
        default_factory=list, metadata={"help": "Reward functions as 'module.path:function' or 'file.py:function'."})
    reward_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "llm_rl: a sequence classifier with one output as a reward (before the "
                                        "functions in reward_weights)."})
    prompt_column: str = field(default="prompt", metadata={"help": "llm_rl: the prompt column (text or messages)."})
    max_prompt_length: int = field(default=512, metadata={"help": "llm_rl: longest prompt in tokens."})
    truncate_prompts: bool = field(default=False, metadata={"help": "llm_rl: cut longer prompts from the left."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "llm_rl: allow writing into a folder that already holds another run."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the Hub."})
    # ---- GRPOConfig
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (the group)."})
    max_completion_length: int = field(default=512, metadata={"help": "Longest completion in tokens."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Completions per process per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    steps_per_generation: Optional[int] = field(
        default=None, metadata={"help": "Micro-batches per generation; null: gradient_accumulation_steps."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each generation (mu)."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (k3 in the loss); 0: no reference model."})
    use_bias_correction_kl: bool = field(
        default=True, metadata={"help": "beta > 0: the KL term of each token times pi / pi_old."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip: ratio >= 1 - epsilon."})
    epsilon_high: Optional[float] = field(default=None, metadata={"help": "Upper clip; null: epsilon."})
    loss_type: str = field(default="dapo", metadata={"help": f"One of {', '.join(sorted(LOSS_TYPES))}."})
    scale_rewards: str = field(default="group", metadata={"help": "group, batch or none (true: group, false: none)."})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Completions without EOS get no loss (they stay in their group)."})
    reward_weights: Optional[list[float]] = field(default=None, metadata={"help": "One weight per reward."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts."})
    use_vllm: bool = field(default=False, metadata={"help": "Sample with a colocated vLLM engine."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vLLM's share of the GPU."})
    vllm_max_model_length: Optional[int] = field(default=None, metadata={"help": "vLLM's context length."})
    vllm_importance_sampling_correction: bool = field(default=True, metadata={"help": "Correct vLLM's sampling."})
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata={"help": "How the ratio is bounded."})
    vllm_importance_sampling_clip_max: Optional[float] = field(default=3.0, metadata={"help": "Ratio cap."})
    vllm_importance_sampling_clip_min: Optional[float] = field(default=None, metadata={"help": "Ratio floor."})
    # ---- TrainingArguments, at GRPOConfig's defaults
    lr_scheduler_type: str = field(default="linear", metadata={"help": "constant, linear or cosine."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup, in optimizer steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global grad norm."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the prompts (when max_steps <= 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps in all (-1: num_train_epochs)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "Keep the newest N checkpoints."})
    output_dir: str = field(default="trainer_output", metadata={"help": "Where the model and metrics go."})
    seed: int = field(default=42, metadata={"help": "Seed."})
    report_to: str = field(default="none", metadata={"help": "Tracker: none, wandb, tensorboard, ..."})
    run_name: Optional[str] = field(default=None, metadata={"help": "Tracker run name."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    log_completions: bool = field(default=False, metadata={"help": "Write sample completions every logging step."})
    disable_tqdm: Optional[bool] = field(default=None, metadata={"help": "No progress bar."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the output folder to the Hub."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repo id."})
    hub_private_repo: Optional[bool] = field(default=None, metadata={"help": "Create the Hub repo as private."})
    restricted: dict = field(default_factory=dict, repr=False, metadata={"internal": True})

    @classmethod
    def from_yaml(cls, path: Optional[str | Path], overrides: Optional[list[str]] = None) -> GRPOArguments:
        return fill_from_yaml(cls(), path, overrides, GRPO_FIELD_TYPES)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> GRPOArguments:
        arguments = cls()
        arguments.set_values(values, source)
        arguments.validate()
        return arguments

    def set_values(self, values: dict, source: str = "config") -> None:
        """Set fields from a flat dict; every unknown or mistyped key in one ConfigError (KeyProblems)."""
        def set_one(key: str, value: Any) -> None:
            if key in RESTRICTED:
                self.restricted[key] = value
            elif key in GRPO_FIELD_TYPES:
                setattr(self, key, coerce(value, GRPO_FIELD_TYPES[key], key, source))
            else:
                raise UnknownKey(unknown_key_message(key, source, [*GRPO_FIELD_TYPES, *RESTRICTED],
                                                     help_command="llm-rl grpo --help", aliases=GRPO_ALIASES))

        set_each(values, source, set_one)

    # ---- checks, then the translation ------------------------------------------------
    @property
    def generation_steps(self) -> int:
        return self.steps_per_generation or self.gradient_accumulation_steps

    @property
    def steps_per_update(self) -> int:
        """Optimizer steps of one update (one generation and its num_iterations passes)."""
        return self.generation_steps // self.gradient_accumulation_steps * self.num_iterations

    @property
    def reward_scaling(self) -> str:
        return {"true": "group", "false": "none"}.get(self.scale_rewards.lower(), self.scale_rewards)

    def validate(self) -> None:
        """Every restricted field at a value llm_rl cannot do in one error, then the rules, then llm_rl's own."""
        problems = [ConfigError(f"{key}: {self.restricted[key]!r} is not supported by llm-rl grpo ({reason}); "
                                f"remove it or set {' or '.join('null' if v is None else repr(v) for v in accepted)}")
                    for key, (accepted, reason) in RESTRICTED.items()
                    if key in self.restricted and self.restricted[key] not in accepted]
        if problems:
            raise KeyProblems(problems, "the config")
        check(GRPO_RULES, self)
        self.to_config().validate()

    def to_config(self) -> Config:
        """llm_rl's Config of this run: critic-free grpo advantages, and TRL's sizes, clip, KL and loss."""
        return Config.from_dict({**self._model_and_data(), **self._sizes(), **self._objective(), **self._run()},
                                source="llm-rl grpo")

    def _model_and_data(self) -> dict:
        return {
            "model_name_or_path": self.model_name_or_path, "trust_remote_code": self.trust_remote_code,
            "gradient_checkpointing": self.gradient_checkpointing, "dataset_name": self.dataset_name,
            "dataset_config": self.dataset_config, "dataset_split": self.dataset_train_split,
            "prompt_column": self.prompt_column, "max_prompt_length": self.max_prompt_length,
            "truncate_prompts": self.truncate_prompts, "shuffle": self.shuffle_dataset,
            "reward_funcs": self.reward_funcs, "reward_model_name_or_path": self.reward_model_name_or_path,
            "reward_weights": self.reward_weights, "max_new_tokens": self.max_completion_length,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "rollout_engine": "vllm" if self.use_vllm else "hf",
            "vllm_gpu_memory_utilization": self.vllm_gpu_memory_utilization,
            "vllm_max_model_len": self.vllm_max_model_length,
            **{k: getattr(self, k) for k in ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                                             "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min")},
        }

    def _sizes(self) -> dict:
        return {
            "num_generations": self.num_generations,
            "batch_size": self.per_device_train_batch_size * self.generation_steps // self.num_generations,
            "num_mini_batches": self.generation_steps // self.gradient_accumulation_steps,
            "gradient_accumulation_steps": self.gradient_accumulation_steps, "ppo_epochs": self.num_iterations,
            "max_updates": self.max_steps // self.steps_per_update if self.max_steps > 0 else None,
            "num_train_epochs": self.num_train_epochs,
        }

    def _objective(self) -> dict:
        kl = ({"kl_placement": "loss", "kl_estimator": "k3", "kl_ratio_weighted": self.use_bias_correction_kl}
              if self.beta > 0 else {})
        return {
            "advantage_estimator": "grpo", "advantage_scaling": self.reward_scaling, "kl_coef": self.beta, **kl,
            "clip_range": self.epsilon, "clip_range_high": self.epsilon_high,
            "loss_agg": aggregation_of_loss_type(self.loss_type),
            "mask_truncated_completions": self.mask_truncated_completions,
            "learning_rate": self.learning_rate, "lr_scheduler_type": self.lr_scheduler_type,
            "warmup_steps": self.warmup_steps, "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
        }

    def _run(self) -> dict:
        def updates(steps: int) -> int:  # optimizer steps -> updates, rounded up
            return -(-steps // self.steps_per_update)

        return {
            "output_dir": self.output_dir, "overwrite_output_dir": self.overwrite_output_dir, "seed": self.seed,
            "logging_steps": updates(self.logging_steps), "save_steps": updates(self.save_steps),
            "save_total_limit": self.save_total_limit, "report_to": self.report_to, "run_name": self.run_name,
            "resume_from_checkpoint": self.resume_from_checkpoint,
            "log_completions_steps": updates(self.logging_steps) if self.log_completions else 0,
            "progress_bar": not self.disable_tqdm, "push_to_hub": self.push_to_hub,
            "hub_model_id": self.hub_model_id, "hub_private_repo": bool(self.hub_private_repo),
        }


def completions_per_process(a: GRPOArguments) -> int:
    return a.per_device_train_batch_size * a.generation_steps


GRPO_RULES: list[Rule] = [
    Rule("num_generations", lambda a: a.num_generations >= 2,
         "num_generations must be >= 2: GRPO compares the completions of a prompt"),
    Rule("per_device_train_batch_size", lambda a: a.per_device_train_batch_size >= 1,
         "per_device_train_batch_size must be >= 1"),
    Rule("gradient_accumulation_steps", lambda a: a.gradient_accumulation_steps >= 1,
         "gradient_accumulation_steps must be >= 1"),
    Rule("steps_per_generation", lambda a: a.generation_steps >= 1 and a.generation_steps
         % a.gradient_accumulation_steps == 0,
         lambda a: f"steps_per_generation ({a.steps_per_generation}) must be a multiple of gradient_accumulation_steps "
                   f"({a.gradient_accumulation_steps}): llm-rl grpo takes whole optimizer steps from each generation"),
    Rule("whole_groups", lambda a: completions_per_process(a) % a.num_generations == 0,
         lambda a: f"per_device_train_batch_size * steps_per_generation ({completions_per_process(a)}) completions per "
                   f"process must be a multiple of num_generations ({a.num_generations}): llm-rl grpo keeps all the "
                   "completions of a prompt on one process"),
    Rule("num_iterations", lambda a: a.num_iterations >= 1, "num_iterations must be >= 1"),
    Rule("max_steps", lambda a: a.max_steps <= 0 or a.max_steps % a.steps_per_update == 0,
         lambda a: f"max_steps ({a.max_steps}) must be a multiple of the {a.steps_per_update} optimizer steps of each "
                   "generation (steps_per_generation / gradient_accumulation_steps * num_iterations)"),
    Rule("beta", lambda a: a.beta >= 0, "beta must be >= 0"),
    Rule("epsilon", lambda a: a.epsilon > 0, "epsilon must be > 0"),
    Rule("epsilon_high", lambda a: a.epsilon_high is None or a.epsilon_high > 0, "epsilon_high must be > 0 or null"),
    Rule("loss_type", lambda a: a.loss_type in LOSS_TYPES,
         lambda a: f"loss_type {a.loss_type!r} is not supported by llm-rl grpo; use one of "
                   f"{', '.join(sorted(LOSS_TYPES))}"),
    Rule("loss_type_grpo_masked", lambda a: not (a.loss_type == "grpo" and a.mask_truncated_completions),
         "loss_type grpo with mask_truncated_completions: TRL counts each masked completion as a 0 in its mean over "
         "completions, llm_rl's seq_mean_token_mean leaves it out; use loss_type dapo, bnpo or dr_grpo"),
    Rule("loss_type_dapo_steps", lambda a: a.loss_type != "dapo" or a.generation_steps == a.gradient_accumulation_steps,
         "loss_type dapo with steps_per_generation above gradient_accumulation_steps: TRL divides every optimizer "
         "step by the generation's mean token count per step, llm_rl by the step's own count; leave "
         "steps_per_generation unset or use loss_type bnpo or dr_grpo"),
    Rule("scale_rewards", lambda a: a.reward_scaling in ("group", "batch", "none"),
         lambda a: f"scale_rewards is group, batch or none (true: group, false: none); got {a.scale_rewards!r}"),
    Rule("max_completion_length", lambda a: a.max_completion_length >= 1, "max_completion_length must be >= 1"),
    Rule("temperature", lambda a: a.temperature > 0, "temperature must be > 0"),
    Rule("learning_rate", lambda a: a.learning_rate > 0, "learning_rate must be > 0"),
    Rule("logging_steps", lambda a: a.logging_steps >= 1, "logging_steps must be >= 1"),
    Rule("save_steps", lambda a: a.save_steps >= 0, "save_steps must be >= 0"),
]

GRPO_FIELD_TYPES: dict[str, Any] = {
    f.name: typing.get_type_hints(GRPOArguments)[f.name]
    for f in dataclasses.fields(GRPOArguments) if not f.metadata.get("internal")
}


def format_help() -> str:
    """The keys of `llm-rl grpo --help`: GRPOConfig's and the script's, then those accepted only at some values."""
    fields = [line for line in option_lines(GRPOArguments) if "--restricted " not in line]
    limited = [f"  --{key:<28} only {' or '.join('null' if v is None else repr(v) for v in accepted)}: {reason}"
               for key, (accepted, reason) in RESTRICTED.items()]
    return "\n".join(["", *fields, "", "accepted only at these values:", *limited])
