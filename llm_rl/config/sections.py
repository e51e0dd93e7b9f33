"""The PPO config: one dataclass per concern (a section), loaded from YAML plus `--key value` overrides.

A config file may be flat (`learning_rate: 1e-5`) or grouped by section
(`ppo: {learning_rate: 1e-5}`); every field name is unique across sections, so a
flat key always finds its home. Unknown keys fail with the closest valid names.
The option groups shared with the reward-model config come from llm_rl.config.groups,
the checks of `Config.validate` from llm_rl.config.rules.
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
    AdvantageScaling,
    Decoding,
    Discount,
    ImportanceSamplingModeName,
    KLEstimator,
    KLPlacement,
    LossAggregation,
    RolloutEngine,
)
from llm_rl.config.errors import ConfigError
from llm_rl.config.groups import (
    CheckpointOptions,
    DatasetSource,
    HubOptions,
    LoraOptions,
    ModelSource,
    OptimizerOptions,
    RunOptions,
)
from llm_rl.config.loading import UnknownKey, coerce, fill_from_yaml, option_lines, set_each, write_yaml
from llm_rl.config.paths import check_report_to, missing_local_path
from llm_rl.config.rules import PPO_REWARD_RULES, PPO_RULES, check
from llm_rl.config.variants import (
    ADVANTAGE_SCALINGS,
    DEFAULT_ADVANTAGE_ESTIMATOR,
    DEFAULT_ADVANTAGE_SCALING,
    DEFAULT_IMPORTANCE_SAMPLING_MODE,
    DEFAULT_LOSS_AGGREGATION,
    DEFAULT_ROLLOUT_ENGINE,
    advantage_estimator_help,
    default_kl_estimator,
    group_estimators,
    kl_estimator_help,
    loss_aggregation_help,
    rollout_engine_help,
)


@dataclass
class ModelConfig(LoraOptions, ModelSource):
    """The policy (`model_name_or_path`, how it loads, its LoRA options), its reference, tokenizer and value head."""

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
    value_head_init_std: float = field(
        default=0.0, metadata={"help": "Std of the value head's initial weights (0 = zeros: V starts at 0)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward: less memory, ~30% more compute."}
    )
    chunked_logprobs: bool = field(
        default=True, metadata={"help": "Log-probs and entropy in chunks: never batch x len x vocab logits at once."}
    )


@dataclass
class DataConfig(DatasetSource):
    """The prompts (`dataset_name`, `dataset_split`), how they are cut and shuffled, and the held-out prompts."""

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
    rollout_engine: RolloutEngine = field(default=DEFAULT_ROLLOUT_ENGINE, metadata={"help": rollout_engine_help()})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vllm on a GPU: share of its memory the engine may take (weights + KV cache)."}
    )
    vllm_max_model_len: Optional[int] = field(
        default=None,
        metadata={"help": "vllm: the engine's context length; null: max_prompt_length + max_new_tokens (multi-turn: "
                          "max_prompt_length + max_episode_tokens)."},
    )
    vllm_kv_cache_gb: int = field(
        default=2, metadata={"help": "vllm on a CPU: GiB of KV cache, a whole number (VLLM_CPU_KVCACHE_SPACE)."}
    )
    vllm_weight_sync_bucket_mb: int = field(
        default=256, metadata={"help": "vllm: weights are pushed to the engine after every optimizer step in "
                                       "buckets of at most this many MiB."}
    )
    vllm_importance_sampling_correction: bool = field(
        default=True,
        metadata={"help": "vllm: weigh the policy loss by the importance ratio exp(log pi_old - log pi_vllm) of "
                          "the trainer's and the engine's log-probs, bounded as vllm_importance_sampling_mode says."},
    )
    vllm_importance_sampling_mode: ImportanceSamplingModeName = field(
        default=DEFAULT_IMPORTANCE_SAMPLING_MODE,
        metadata={"help": "token_truncate (per-token ratio clamped to [clip_min, clip_max]: TIS), token_mask (per-token, "
                          "0 outside), sequence_truncate or sequence_mask (one ratio per response: exp of its summed "
                          "log-ratios)."},
    )
    vllm_importance_sampling_clip_max: Optional[float] = field(
        default=3.0, metadata={"help": "Upper bound of the importance ratio (null: none)."}
    )
    vllm_importance_sampling_clip_min: Optional[float] = field(
        default=None, metadata={"help": "Lower bound of the importance ratio (null: none)."}
    )


@dataclass
class RewardConfig:
    """How completions are scored: a reward model and/or reward functions, weighted, scaled and clipped."""

    reward_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Sequence classifier with one output, scoring prompt + completion."}
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Reward functions as 'module.path:function', called as TRL calls them: "
                          "f(prompts=, completions=, **columns) (+ completion_ids, trainer_state if taken)."},
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
class PPOConfig(OptimizerOptions):
    """The update: batch sizes, optimizer, clipped losses, discount, KL penalty and advantage estimator."""

    num_mini_batches: int = field(default=1, metadata={"help": "Optimizer steps per PPO epoch."})
    ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout batch."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon."})
    clip_range_high: Optional[float] = field(
        default=None,
        metadata={"help": "Upper ratio clip: the ratio is clipped to [1 - clip_range, 1 + clip_range_high] "
                          "(DAPO's clip-higher, TRL's epsilon_high); null: clip_range."},
    )
    dual_clip: Optional[float] = field(
        default=None, metadata={"help": "Dual-clip constant c > 1 bounding the loss of negative advantages."}
    )
    clip_range_value: Optional[float] = field(default=0.2, metadata={"help": "Value clip range (None = off)."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    ent_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus."})
    gamma: float = field(default=1.0, metadata={"help": "Discount over response tokens."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages over the batch."})
    loss_agg: LossAggregation = field(default=DEFAULT_LOSS_AGGREGATION, metadata={"help": loss_aggregation_help()})
    kl_coef: float = field(default=0.05, metadata={"help": "Initial beta of the KL penalty to the reference."})
    kl_estimator: Optional[KLEstimator] = field(default=None, metadata={"help": kl_estimator_help()})
    kl_placement: KLPlacement = field(
        default="reward", metadata={"help": "'reward': -beta*KL in token rewards (classic PPO); 'loss': a loss term."}
    )
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt beta towards kl_target (Ziegler et al. 2019)."})
    kl_target: float = field(default=6.0, metadata={"help": "Target KL per sequence for the adaptive controller."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon of the adaptive controller."})
    kl_ratio_weighted: bool = field(
        default=False,
        metadata={"help": "kl_placement: loss: multiply each token's KL term by pi / pi_old (with its gradient): the "
                          "reverse KL's unbiased gradient (TRL's use_bias_correction_kl)."},
    )
    advantage_estimator: AdvantageEstimator = field(
        default=DEFAULT_ADVANTAGE_ESTIMATOR, metadata={"help": advantage_estimator_help()}
    )
    num_generations: int = field(
        default=1, metadata={"help": f"Completions sampled per prompt (a group, for {'/'.join(group_estimators())})."}
    )
    advantage_scaling: AdvantageScaling = field(
        default=DEFAULT_ADVANTAGE_SCALING,
        metadata={"help": "grpo: " + "; ".join(f"{k}: {v}" for k, v in ADVANTAGE_SCALINGS.items())
                  + " (TRL's scale_rewards)."},
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "Completions that never emitted EOS (cut at max_new_tokens) get no loss, no KL and no "
                          "count in the loss's divisor; they still take part in their group's mean and std."},
    )

    @property
    def kl_in_loss(self) -> bool:
        """kl_placement: loss (a loss term, as GRPO's beta); otherwise -beta * KL goes into the token rewards."""
        return self.kl_placement == "loss"

    @property
    def kl_estimator_in_use(self) -> str:
        """`kl_estimator`, or its default for the placement (llm_rl.config.variants.KL_ESTIMATORS)."""
        return self.kl_estimator or default_kl_estimator(self.kl_placement)


@dataclass
class TrainConfig(HubOptions, RunOptions, CheckpointOptions):
    """The run: output folder, length, checkpoints, logging, held-out evaluation, trackers, Hub upload."""

    max_updates: Optional[int] = field(default=None, metadata={"help": "Stop after this many PPO updates."})
    max_seconds: Optional[float] = field(
        default=None,
        metadata={"help": "Also stop once training has run this long (wall clock; the LR schedule still spans "
                          "max_updates)."},
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


@dataclass
class EnvironmentConfig:
    """Multi-turn episodes: the environment class and the limits of an episode."""

    environment: Optional[str] = field(
        default=None,
        metadata={"help": "Multi-turn episodes: an environment class as 'module.path:Class' or 'file.py:Class' with "
                          "reset(row) -> observation and step(response) -> (observation or None, reward, done); one "
                          "instance per episode, built from each dataset row. Its rewards replace reward_funcs."},
    )
    environment_factory: Optional[str] = field(
        default=None,
        metadata={"help": "Tool-calling episodes the TRL way: a class as 'module.path:Class' or 'file.py:Class' whose "
                          "public methods are the tools (type hints and a Google-style docstring each), with "
                          "reset(**row) -> str or None and optionally get_reward() -> float; one instance per episode. "
                          "The reward is get_reward() plus reward_funcs (which get environments=). Not with "
                          "environment."},
    )
    max_turns: int = field(
        default=4,
        metadata={"help": "Most bot turns per episode; with environment_factory, TRL's max_tool_calling_iterations "
                          "+ 1 (the answer after the last tool result is a turn too)."},
    )
    max_episode_tokens: int = field(
        default=1024, metadata={"help": "No new turn once an episode holds this many tokens after its first observation."}
    )
    discount: Discount = field(
        default="turn",
        metadata={"help": "'turn': gamma once per turn boundary, 1 within a turn; 'token': gamma per bot token."},
    )

    @property
    def plays_episodes(self) -> bool:
        """An environment (either kind) plays multi-turn episodes and the data are its rows."""
        return self.environment is not None or self.environment_factory is not None

    @property
    def turn_discount(self) -> bool:
        """gamma once per turn boundary (discount: turn), not once per bot token."""
        return self.discount == "turn"


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
        config.set_values(values, source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Optional[list[str]] = None) -> Config:
        return fill_from_yaml(cls(), path, overrides, FIELD_TYPES)

    def set_values(self, values: dict, source: str = "config") -> None:
        """Set fields from a flat or section-grouped dict; the unknown, misplaced or mistyped keys
        raise one ConfigError (llm_rl.config.loading.KeyProblems) listing them all."""
        def set_one(key: str, value: Any) -> None:
            if key in SECTIONS and isinstance(value, dict):
                set_each(value, source, lambda sub_key, sub_value: self._set(sub_key, sub_value, source, key))
            else:
                self._set(key, value, source)

        set_each(values, source, set_one)

    def _set(self, key: str, value: Any, source: str, section: Optional[str] = None) -> None:
        owner = FIELD_OWNER.get(key)
        if owner is not None and section is not None and owner != section:
            raise UnknownKey(f"{source}: '{key}' belongs in section '{owner}', not '{section}' (or write it "
                             "flat, at the top level)")
        if owner is None:
            candidates = [k for k, s in FIELD_OWNER.items() if section is None or s == section]
            raise UnknownKey(unknown_key_message(key, source, candidates, section, sections=FIELD_OWNER))
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
        """Check values that the types alone do not constrain (llm_rl.config.rules); raise ConfigError
        saying what to fix."""
        check(PPO_RULES, self)
        check_report_to(self.train.report_to)
        check(PPO_REWARD_RULES, self)


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
    """The keys of `llm-rl ppo --help`, section by section."""
    lines = []
    for section, cls in SECTIONS.items():
        lines += [f"\n{section}:", *option_lines(cls)]
    return "\n".join(lines)
