"""Configuration: one dataclass per concern, loaded from YAML plus `--key value` overrides.

A config file may be flat (`learning_rate: 1e-5`) or grouped by section
(`ppo: {learning_rate: 1e-5}`); every field name is unique across sections, so a
flat key always finds its home. Unknown keys fail with the closest valid names.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llm_rl.config.aliases import unknown_key_message
from llm_rl.config.choices import (
    AdvantageEstimator,
    Decoding,
    Discount,
    KLEstimator,
    KLPlacement,
    LossAggregation,
    Schedule,
    TorchDtype,
)
from llm_rl.config.errors import ConfigError
from llm_rl.config.loading import coerce, fill_from_yaml, option_lines, write_yaml
from llm_rl.config.paths import REPORT_TO_HELP, check_report_to, missing_local_path

# shared with the reward-model config (llm_rl.training.reward_trainer), which loads models the same way
TRUST_REMOTE_CODE_HELP = "Run model code from the Hub. Off unless you trust the repository."
TORCH_DTYPE_HELP = "Weights dtype: float32, bfloat16, float16 or auto. Mixed precision comes from accelerate."






@dataclass
class ModelConfig:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Policy: a Hub id or a local folder, loaded with from_pretrained."}
    )
    ref_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Frozen reference model; defaults to a copy of the initial policy."}
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer; defaults to model_name_or_path."}
    )
    value_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Folder holding value_head.safetensors to start the value head from (e.g. a previous run)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})
    torch_dtype: TorchDtype = field(default="float32", metadata={"help": TORCH_DTYPE_HELP})
    value_head_init_std: float = field(
        default=0.0, metadata={"help": "Std of the value head's initial weights (0 = zeros: V starts at 0)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward: less memory, ~30% more compute."}
    )
    use_peft: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters (+ the value head) only; the reference is the adapter-disabled model."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout (keep 0 for PPO: the rollout and training forwards must agree)."}
    )
    lora_target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Module names to adapt, or ['all-linear']; default: peft's choice per model."}
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "Save the policy with the adapter merged (a plain model) instead of the adapter."}
    )


@dataclass
class DataConfig:
    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Prompts: a Hub dataset id, a local folder, or a .json/.jsonl/.csv/.parquet file."},
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    dataset_split: str = field(default="train", metadata={"help": "Split to take prompts from."})
    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column with the prompt: a string, or chat messages rendered with the chat template."},
    )
    max_prompt_length: int = field(default=512, metadata={"help": "Longest prompt in tokens."})
    truncate_prompts: bool = field(
        default=False,
        metadata={"help": "Cut over-long prompts from the left instead of failing on them."},
    )
    shuffle: bool = field(default=True, metadata={"help": "Reshuffle prompts every pass (seeded)."})
    eval_dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out prompts, in the forms dataset_name takes; default: dataset_name when eval_split "
                          "is set."},
    )
    eval_split: Optional[str] = field(
        default=None, metadata={"help": "Split of the held-out prompts (e.g. test); null: 'train' of eval_dataset_name."}
    )
    eval_max_prompts: Optional[int] = field(
        default=None, metadata={"help": "Evaluate on the first N held-out prompts only (null = all)."}
    )


@dataclass
class SamplingConfig:
    """How responses are sampled. Only these keys shape the sampling distribution: a checkpoint's
    saved generation_config (repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_length,
    suppress_tokens, its top_k/top_p/temperature, ...) is ignored, because PPO scores every sampled
    token under softmax(logits / temperature) and any other processor would make the two differ."""

    max_new_tokens: int = field(default=64, metadata={"help": "Longest response in tokens."})
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature; log-probs are taken at the same temperature. Only the sampling keys "
                          "here shape sampling: the checkpoint's generation_config (repetition_penalty, "
                          "no_repeat_ngram_size, bad_words_ids, min_length, suppress_tokens, top_k, ...) is ignored."},
    )
    top_k: int = field(
        default=0,
        metadata={"help": "Sample among the k likeliest tokens (0 = all). PPO scores tokens under the full softmax, "
                          "so top_k/top_p make sampling and training differ: leave them off for exact PPO."},
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0 = off); see top_k."})
    stop_token: Optional[str] = field(
        default=None, metadata={"help": "Extra token that ends a response, besides the tokenizer's EOS."}
    )
    missing_eos_penalty: Optional[float] = field(
        default=None, metadata={"help": "Subtracted from the score of responses that never emitted EOS."}
    )
    generation_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Prompts per generate call; defaults to batch_size (one call)."}
    )


@dataclass
class RewardConfig:
    reward_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Sequence classifier with one output, scoring prompt + completion."}
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Reward functions as 'module.path:function', each (prompts, completions, **columns)."},
    )
    reward_weights: Optional[list[float]] = field(
        default=None, metadata={"help": "One weight per reward (model first, then functions); default all 1."}
    )
    reward_scale: float = field(default=1.0, metadata={"help": "Multiply scores by this."})
    reward_clip: Optional[float] = field(default=None, metadata={"help": "Clip scores to [-c, c] after scaling."})
    skip_invalid_rewards: bool = field(
        default=False,
        metadata={"help": "Drop samples whose reward is NaN/inf/missing from the update (counted in metrics) "
                          "instead of stopping with an error."},
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Scale token rewards to unit variance over the batch (mean kept)."}
    )
    eval_reward_funcs: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Rewards of the held-out evaluation ('module:function'); null: the training rewards."},
    )


@dataclass
class PPOConfig:
    batch_size: int = field(
        default=16, metadata={"help": "Prompts rolled out per update, per process (x num_generations rows)."}
    )
    num_mini_batches: int = field(default=1, metadata={"help": "Optimizer steps per PPO epoch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per mini-batch (trades memory for nothing else)."}
    )
    ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout batch."})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})
    lr_scheduler_type: Schedule = field(
        default="constant", metadata={"help": "constant, linear or cosine, after warmup_steps (with any of them)."}
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "Linear warmup from 0, in optimizer steps; applies to every lr_scheduler_type."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Clip the global grad norm (None = off)."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon."})
    dual_clip: Optional[float] = field(
        default=None, metadata={"help": "Dual-clip constant c > 1 bounding the loss of negative advantages."}
    )
    clip_range_value: Optional[float] = field(default=0.2, metadata={"help": "Value clip range (None = off)."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    ent_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus."})
    gamma: float = field(default=1.0, metadata={"help": "Discount over response tokens."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages over the batch."})
    loss_agg: LossAggregation = field(
        default="token_mean", metadata={"help": "token_mean, or seq_mean_token_mean (mean per sequence first)."}
    )
    kl_coef: float = field(default=0.05, metadata={"help": "Initial beta of the KL penalty to the reference."})
    kl_estimator: Optional[KLEstimator] = field(
        default=None,
        metadata={"help": "KL estimator: k1, k2, k3 or abs; default k1 in the reward, k2 in the loss (its gradient "
                          "is the KL's). In the loss k3 follows the forward KL(ref || policy); k1 and abs are refused."},
    )
    kl_placement: KLPlacement = field(
        default="reward", metadata={"help": "'reward': -beta*KL in token rewards (classic PPO); 'loss': a loss term."}
    )
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt beta towards kl_target (Ziegler et al. 2019)."})
    kl_target: float = field(default=6.0, metadata={"help": "Target KL per sequence for the adaptive controller."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon of the adaptive controller."})
    advantage_estimator: AdvantageEstimator = field(
        default="gae",
        metadata={"help": "gae (value head), or critic-free: grpo, rloo (need num_generations >= 2), reinforce_pp, "
                          "prefix_diff (needs a reward model on the policy's tokenizer)."},
    )
    num_generations: int = field(
        default=1, metadata={"help": "Completions sampled per prompt (a group, for grpo/rloo)."}
    )

    @property
    def kl_estimator_in_use(self) -> str:
        """`kl_estimator`, or its default for the placement: k1 in the reward, k2 in the loss."""
        return self.kl_estimator or ("k2" if self.kl_placement == "loss" else "k1")


@dataclass
class CheckpointOptions:
    """The checkpoint keys of every run (`llm_rl.training.run`): PPO's `TrainConfig` and the reward-model config."""

    save_steps: int = field(
        default=100,
        metadata={"help": "Write a resumable checkpoint every N updates (reward training: optimizer steps); one is "
                          "always written at the end (0 = only at the end)."},
    )
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "'latest' (newest in output_dir, if any) or a checkpoint-N folder."}
    )


@dataclass
class TrainConfig(CheckpointOptions):
    output_dir: str = field(default="outputs/ppo", metadata={"help": "Where the policy, config and metrics go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a folder that already holds another run."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for every random choice."})
    max_updates: Optional[int] = field(default=None, metadata={"help": "Stop after this many PPO updates."})
    max_seconds: Optional[float] = field(
        default=None,
        metadata={"help": "Also stop once training has run this long (wall clock; the LR schedule still spans "
                          "max_updates)."},
    )
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "Passes over the prompts (used when max_updates is not set)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Print a summary line every N updates (and the last)."})
    eval_steps: int = field(
        default=0,
        metadata={"help": "Evaluate on the held-out prompts (and the callbacks' on_evaluate) every N updates and at the "
                          "end (0 = at the end only)."},
    )
    eval_decoding: list[Decoding] = field(
        default_factory=lambda: ["greedy"],
        metadata={"help": "How held-out responses are decoded: greedy, sampled (at the training temperature), or both."},
    )
    log_completions_steps: int = field(
        default=0,
        metadata={"help": "Every N updates write sample completions (prompt, completion, each reward, advantage) to "
                          "completions.jsonl and the trackers (0 = off)."},
    )
    log_completions_count: int = field(default=8, metadata={"help": "Rows per completions table."})
    report_to: str = field(default="none", metadata={"help": REPORT_TO_HELP})
    run_name: Optional[str] = field(default=None, metadata={"help": "Tracker run name."})
    progress_bar: bool = field(default=True, metadata={"help": "tqdm bar on the main process."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the final output folder (policy, tokenizer, card) to the Hub."}
    )
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repo id, e.g. 'user/model-ppo'."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})


@dataclass
class EnvironmentConfig:
    environment: Optional[str] = field(
        default=None,
        metadata={"help": "Multi-turn episodes: an environment class as 'module.path:Class' or 'file.py:Class' with "
                          "reset(row) -> observation and step(response) -> (observation or None, reward, done); one "
                          "instance per episode, built from each dataset row. Its rewards replace reward_funcs."},
    )
    max_turns: int = field(default=4, metadata={"help": "Most bot turns per episode."})
    max_episode_tokens: int = field(
        default=1024, metadata={"help": "No new turn once an episode holds this many tokens after its first observation."}
    )
    discount: Discount = field(
        default="turn",
        metadata={"help": "'turn': gamma once per turn boundary, 1 within a turn; 'token': gamma per bot token."},
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "sampling": SamplingConfig,
    "reward": RewardConfig,
    "ppo": PPOConfig,
    "train": TrainConfig,
    "environment": EnvironmentConfig,
}


@dataclass
class Config:
    """Everything a PPO run needs; `config.ppo.learning_rate` etc."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> Config:
        config = cls()
        config.update(values, source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Optional[list[str]] = None) -> Config:
        return fill_from_yaml(cls(), path, overrides, FIELD_TYPES)

    def update(self, values: dict, source: str = "config") -> None:
        """Set fields from a flat or section-grouped dict; unknown keys raise ConfigError."""
        for key, value in (values or {}).items():
            if key in SECTIONS and isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    self._set(sub_key, sub_value, source, section=key)
            else:
                self._set(key, value, source)

    def _set(self, key: str, value: Any, source: str, section: Optional[str] = None) -> None:
        owner = FIELD_OWNER.get(key)
        if owner is None or (section is not None and owner != section):
            candidates = [k for k, s in FIELD_OWNER.items() if section is None or s == section]
            raise ConfigError(unknown_key_message(key, source, candidates, section))
        field_type = FIELD_TYPES[key]
        setattr(getattr(self, owner), key, coerce(value, field_type, key, source))

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def save_yaml(self, path: str | Path) -> None:
        write_yaml(self.to_dict(), path)

    @property
    def eval_dataset(self) -> Optional[tuple[str, str]]:
        """(name, split) of the held-out prompts, or None when no evaluation set is configured."""
        d = self.data
        if d.eval_dataset_name is None and d.eval_split is None:
            return None
        return d.eval_dataset_name or d.dataset_name, d.eval_split or "train"

    def check_paths(self) -> None:
        """Fail at once on a model or dataset path that looks local but does not exist (instead of
        a minute of Hub retries ending in "couldn't connect"). Not part of `validate`: a config may
        name a folder that a later step creates (the demo's warm start)."""
        m, d, r = self.model, self.data, self.reward
        named = {
            "model_name_or_path": m.model_name_or_path, "ref_model_name_or_path": m.ref_model_name_or_path,
            "tokenizer_name_or_path": m.tokenizer_name_or_path, "value_model_name_or_path": m.value_model_name_or_path,
            "reward_model_name_or_path": r.reward_model_name_or_path,
            "dataset_name": d.dataset_name, "eval_dataset_name": d.eval_dataset_name,
        }
        for key, value in named.items():
            problem = missing_local_path(value, data=key.endswith("dataset_name"))
            if problem:
                raise ConfigError(f"{key}: {problem}")

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> None:
        """Check values that the types alone do not constrain; raise ConfigError saying what to fix."""
        ppo, sampling, reward, data, train = self.ppo, self.sampling, self.reward, self.data, self.train
        checks = [
            (ppo.batch_size >= 1, "batch_size must be >= 1"),
            (ppo.num_mini_batches >= 1, "num_mini_batches must be >= 1"),
            (ppo.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (ppo.num_generations >= 1, "num_generations must be >= 1"),
            (
                ppo.batch_size * ppo.num_generations % (ppo.num_mini_batches * ppo.gradient_accumulation_steps) == 0,
                f"batch_size * num_generations ({ppo.batch_size} * {ppo.num_generations}) must be divisible by "
                f"num_mini_batches * gradient_accumulation_steps ({ppo.num_mini_batches} * {ppo.gradient_accumulation_steps})",
            ),
            (ppo.advantage_estimator not in ("grpo", "rloo") or ppo.num_generations >= 2,
             f"advantage_estimator {ppo.advantage_estimator} compares completions of the same prompt: "
             "set num_generations >= 2"),
            (ppo.advantage_estimator != "prefix_diff" or reward.reward_model_name_or_path is not None,
             "advantage_estimator prefix_diff scores every prefix with a reward model: set reward_model_name_or_path"),
            (ppo.ppo_epochs >= 1, "ppo_epochs must be >= 1"),
            (ppo.learning_rate > 0, "learning_rate must be > 0"),
            (ppo.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (ppo.clip_range > 0, "clip_range must be > 0"),
            (ppo.dual_clip is None or ppo.dual_clip > 1, "dual_clip must be > 1 (or null to disable)"),
            (ppo.clip_range_value is None or ppo.clip_range_value > 0, "clip_range_value must be > 0 or null"),
            (0 <= ppo.gamma <= 1, "gamma must be in [0, 1]"),
            (0 <= ppo.lam <= 1, "lam must be in [0, 1]"),
            (ppo.kl_coef >= 0, "kl_coef must be >= 0"),
            (ppo.kl_placement != "loss" or ppo.kl_estimator_in_use in ("k2", "k3"),
             f"kl_placement: loss with kl_estimator {ppo.kl_estimator}: its expected gradient is "
             + ("0, so nothing pulls the policy back to the reference" if ppo.kl_estimator == "k1" else "no KL's")
             + "; use kl_estimator: k2 (the default in the loss, whose gradient is the gradient of KL(policy || ref)) "
             "or k3 (the gradient of the forward KL(ref || policy), as in GRPO)"),
            (ppo.advantage_estimator != "prefix_diff" or not reward.whiten_rewards,
             "advantage_estimator prefix_diff subtracts the reward model's prefix scores from the rewards, which "
             "whiten_rewards would rescale and the prefix scores not: set whiten_rewards: false (whiten_advantages "
             "normalises the advantages)"),
            (sampling.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (sampling.temperature > 0, "temperature must be > 0 (log-probs are taken at the sampling temperature)"),
            (sampling.top_k >= 0, "top_k must be >= 0"),
            (0 < sampling.top_p <= 1, "top_p must be in (0, 1]"),
            (sampling.generation_batch_size is None or sampling.generation_batch_size >= 1, "generation_batch_size must be >= 1"),
            (data.max_prompt_length >= 1, "max_prompt_length must be >= 1"),
            (train.max_updates is None or train.max_updates >= 1, "max_updates must be >= 1"),
            (train.num_train_epochs > 0, "num_train_epochs must be > 0"),
            (train.max_seconds is None or train.max_seconds > 0, "max_seconds must be > 0"),
            (train.logging_steps >= 1, "logging_steps must be >= 1"),
            (train.save_steps >= 0, "save_steps must be >= 0"),
            (not train.push_to_hub or bool(train.hub_model_id), "push_to_hub needs hub_model_id (e.g. 'user/model-ppo')"),
            (train.save_total_limit is None or train.save_total_limit >= 1, "save_total_limit must be >= 1 or null"),
            (train.eval_steps >= 0, "eval_steps must be >= 0"),
            (bool(train.eval_decoding), "eval_decoding: a list of greedy and/or sampled"),
            (data.eval_max_prompts is None or data.eval_max_prompts >= 1, "eval_max_prompts must be >= 1 or null"),
            (train.log_completions_steps >= 0, "log_completions_steps must be >= 0"),
            (train.log_completions_count >= 1, "log_completions_count must be >= 1"),
            (self.model.lora_r >= 1, "lora_r must be >= 1"),
            (self.environment.max_turns >= 1, "max_turns must be >= 1"),
            (self.environment.max_episode_tokens >= 1, "max_episode_tokens must be >= 1"),
            (self.environment.environment is None or ppo.advantage_estimator in ("gae", "grpo", "rloo", "reinforce_pp"),
             "advantage_estimator prefix_diff scores one response with a reward model; it has no multi-turn form: "
             "use gae, grpo, rloo or reinforce_pp with an environment"),
            (self.environment.environment is None or self.eval_dataset is None,
             "held-out evaluation from eval_dataset_name / eval_split scores single responses; with an environment, "
             "evaluate episodes in a callback's on_evaluate (llm_rl/demos/dialogue.py has one)"),
            (self.environment.environment is None or (reward.reward_model_name_or_path is None and not reward.reward_funcs),
             "an environment gives the rewards of multi-turn episodes: remove reward_funcs / "
             "reward_model_name_or_path, or score inside the environment's step()"),
            (0 <= self.model.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_report_to(train.report_to)
        n_rewards = int(reward.reward_model_name_or_path is not None) + len(reward.reward_funcs)
        if reward.reward_weights is not None and len(reward.reward_weights) != n_rewards:
            raise ConfigError(
                f"reward_weights has {len(reward.reward_weights)} entries but there are {n_rewards} rewards "
                "(the reward model first, then reward_funcs in order)"
            )
        for spec in reward.reward_funcs + (reward.eval_reward_funcs or []):
            if not isinstance(spec, str) or ":" not in spec:
                raise ConfigError(f"reward_funcs entry {spec!r} must look like 'package.module:function'")








FIELD_OWNER: dict[str, str] = {}
FIELD_TYPES: dict[str, Any] = {}
FIELD_HELP: dict[str, str] = {}
for _section, _cls in SECTIONS.items():
    _hints = typing.get_type_hints(_cls)
    for _f in dataclasses.fields(_cls):
        assert _f.name not in FIELD_OWNER, f"field {_f.name} defined twice"
        FIELD_OWNER[_f.name] = _section
        FIELD_TYPES[_f.name] = _hints[_f.name]
        FIELD_HELP[_f.name] = _f.metadata.get("help", "")


























def format_help() -> str:
    lines = []
    for section, cls in SECTIONS.items():
        lines += [f"\n{section}:", *option_lines(cls)]
    return "\n".join(lines)
