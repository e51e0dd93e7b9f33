"""What a config's types alone do not constrain, as tables of named rules: range checks and
cross-field rules.

A `Rule` is a name, a predicate over the config and the message that says what to fix; `check`
raises a ConfigError with the message of the first rule that fails, in table order. `PPO_RULES`
and `PPO_REWARD_RULES` check a PPO `Config` (llm_rl.config.sections; the tracker names are checked
between them), `REWARD_TRAINING_RULES` a `RewardTrainingConfig`. Rules about a variant (an advantage
or KL estimator) read its properties in llm_rl.config.variants and never name one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any, Union, get_args

from llm_rl.config.choices import KLPlacement
from llm_rl.config.errors import ConfigError
from llm_rl.config.variants import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALINGS,
    DEFAULT_ADVANTAGE_SCALING,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    ROLLOUT_ENGINES,
    AdvantageEstimatorVariant,
    RolloutEngineVariant,
    default_kl_estimator,
    kl_estimators_for,
    or_list,
)


@dataclass(frozen=True)
class Rule:
    """A check of a config: `holds(config)` is False when the config breaks it."""

    name: str
    holds: Callable[[Any], bool]
    message: Union[str, Callable[[Any], str]]  # a callable builds the message from the config

    def text(self, config: Any) -> str:
        return self.message(config) if callable(self.message) else self.message


def check(rules: Sequence[Rule], config: Any) -> None:
    """Raise ConfigError with the message of the first rule in `rules` that `config` breaks."""
    for rule in rules:
        if not rule.holds(config):
            raise ConfigError(rule.text(config))


# ====================================================================== helpers of the PPO rules
def known(section: str, key: str, choices: Iterable[str], optional: bool = False) -> Rule:
    """A choice option holds one of its `choices` (a variant table's keys): the loader ensures it, a config
    changed in code may not, and the rules below look its variant up."""
    choices = tuple(choices)

    def value(c):
        return getattr(getattr(c, section), key)

    return Rule(f"{key}_known", lambda c: value(c) in choices or (optional and value(c) is None),
                lambda c: f"{key} is one of {', '.join(choices)}{' or null' if optional else ''}; got {value(c)!r}")


def estimator(c) -> AdvantageEstimatorVariant:
    return ADVANTAGE_ESTIMATORS[c.ppo.advantage_estimator]


def kl_placement_message(c) -> str:
    """Why the KL estimator does not belong at the placement, and the ones that do."""
    p = c.ppo
    in_use = p.kl_estimator_in_use

    def option(name: str) -> str:
        gradient = KL_ESTIMATORS[name].loss_gradient
        if name == default_kl_estimator(p.kl_placement):
            return f"{name} (the default in the {p.kl_placement}, whose gradient is {gradient})"
        return f"{name} ({gradient})"

    return (f"kl_placement: {p.kl_placement} with kl_estimator {in_use}: its expected gradient is "
            f"{KL_ESTIMATORS[in_use].loss_gradient}; use kl_estimator: "
            + " or ".join(option(name) for name in kl_estimators_for(p.kl_placement)))


def multi_turn_message(c) -> str:
    multi_turn = [name for name, v in ADVANTAGE_ESTIMATORS.items() if v.multi_turn]
    return (f"advantage_estimator {c.ppo.advantage_estimator} {estimator(c).single_turn_reason}; it has no "
            f"multi-turn form: use {or_list(multi_turn)} with an environment")


def divisible_message(c) -> str:
    p = c.ppo
    return (f"batch_size * num_generations ({p.batch_size} * {p.num_generations}) must be divisible by "
            f"num_mini_batches * gradient_accumulation_steps ({p.num_mini_batches} * {p.gradient_accumulation_steps})")


def n_rewards(c) -> int:
    """The rewards of a PPO run: the reward model (if any), then the reward functions."""
    return int(c.reward.reward_model_name_or_path is not None) + len(c.reward.reward_funcs)


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def bad_reward_specs(c) -> list:
    r = c.reward
    return [spec for spec in r.reward_funcs + (r.eval_reward_funcs or []) if not isinstance(spec, str) or ":" not in spec]


def engine_budget(c) -> int:
    """Tokens after the prompt that one engine call may need: a response, or a whole episode."""
    return c.sampling.max_new_tokens if no_environment(c) else c.environment.max_episode_tokens


def vllm_length_message(c) -> str:
    return (f"vllm_max_model_len {c.sampling.vllm_max_model_len} is below max_prompt_length "
            f"({c.data.max_prompt_length}) + {'max_new_tokens' if no_environment(c) else 'max_episode_tokens'} "
            f"({engine_budget(c)}) = {c.data.max_prompt_length + engine_budget(c)}: raise it or lower those")


def engine(c) -> RolloutEngineVariant:
    return ROLLOUT_ENGINES[c.sampling.rollout_engine]


def engine_installed(c) -> bool:
    return not engine(c).package or find_spec(engine(c).package) is not None


def corrects_engine(c) -> bool:
    return c.sampling.rollout_engine == "vllm" and c.sampling.vllm_importance_sampling_correction


def importance_bounds_ok(c) -> bool:
    low, high = c.sampling.vllm_importance_sampling_clip_min, c.sampling.vllm_importance_sampling_clip_max
    return (low is None or low >= 0) and (high is None or high > 0) and (low is None or high is None or low < high)


def no_environment(c) -> bool:
    return not c.environment.plays_episodes


# ====================================================================== the PPO config
PPO_RULES: list[Rule] = [
    known("ppo", "advantage_estimator", ADVANTAGE_ESTIMATORS),
    known("ppo", "kl_estimator", KL_ESTIMATORS, optional=True),
    known("ppo", "kl_placement", get_args(KLPlacement)),
    known("ppo", "loss_agg", LOSS_AGGREGATIONS),
    known("ppo", "advantage_scaling", ADVANTAGE_SCALINGS),
    Rule("batch_size", lambda c: c.ppo.batch_size >= 1, "batch_size must be >= 1"),
    Rule("num_mini_batches", lambda c: c.ppo.num_mini_batches >= 1, "num_mini_batches must be >= 1"),
    Rule("gradient_accumulation_steps", lambda c: c.ppo.gradient_accumulation_steps >= 1,
         "gradient_accumulation_steps must be >= 1"),
    Rule("num_generations", lambda c: c.ppo.num_generations >= 1, "num_generations must be >= 1"),
    Rule("micro_batches_divide_rollout",
         lambda c: c.ppo.batch_size * c.ppo.num_generations
         % (c.ppo.num_mini_batches * c.ppo.gradient_accumulation_steps) == 0,
         divisible_message),
    Rule("estimator_group_size", lambda c: c.ppo.num_generations >= estimator(c).min_generations,
         lambda c: f"advantage_estimator {c.ppo.advantage_estimator} compares completions of the same prompt: "
                   f"set num_generations >= {estimator(c).min_generations}"),
    Rule("estimator_reward_model",
         lambda c: not estimator(c).needs_reward_model or c.reward.reward_model_name_or_path is not None,
         lambda c: f"advantage_estimator {c.ppo.advantage_estimator} {estimator(c).reward_model_use}: "
                   "set reward_model_name_or_path"),
    Rule("ppo_epochs", lambda c: c.ppo.ppo_epochs >= 1, "ppo_epochs must be >= 1"),
    Rule("learning_rate", lambda c: c.ppo.learning_rate > 0, "learning_rate must be > 0"),
    Rule("warmup_steps", lambda c: c.ppo.warmup_steps >= 0, "warmup_steps must be >= 0"),
    Rule("clip_range", lambda c: c.ppo.clip_range > 0, "clip_range must be > 0"),
    Rule("clip_range_high", lambda c: c.ppo.clip_range_high is None or c.ppo.clip_range_high > 0,
         "clip_range_high must be > 0 (or null: clip_range)"),
    Rule("advantage_scaling_estimator",
         lambda c: c.ppo.advantage_scaling == DEFAULT_ADVANTAGE_SCALING or estimator(c).std_scaled,
         lambda c: f"advantage_scaling: {c.ppo.advantage_scaling} applies to "
                   f"{or_list(n for n, v in ADVANTAGE_ESTIMATORS.items() if v.std_scaled)}, not advantage_estimator "
                   f"{c.ppo.advantage_estimator}; remove it"),
    Rule("kl_ratio_weighted_placement", lambda c: not c.ppo.kl_ratio_weighted or c.ppo.kl_in_loss,
         "kl_ratio_weighted weighs the KL loss term: it needs kl_placement: loss"),
    Rule("mask_truncated_single_turn", lambda c: not c.ppo.mask_truncated_completions or no_environment(c),
         "mask_truncated_completions masks single responses cut at max_new_tokens; it has no multi-turn form: "
         "remove it with an environment"),
    Rule("dual_clip", lambda c: c.ppo.dual_clip is None or c.ppo.dual_clip > 1,
         "dual_clip must be > 1 (or null to disable)"),
    Rule("clip_range_value", lambda c: c.ppo.clip_range_value is None or c.ppo.clip_range_value > 0,
         "clip_range_value must be > 0 or null"),
    Rule("gamma", lambda c: 0 <= c.ppo.gamma <= 1, "gamma must be in [0, 1]"),
    Rule("lam", lambda c: 0 <= c.ppo.lam <= 1, "lam must be in [0, 1]"),
    Rule("kl_coef", lambda c: c.ppo.kl_coef >= 0, "kl_coef must be >= 0"),
    Rule("kl_estimator_placement",
         lambda c: c.ppo.kl_placement in KL_ESTIMATORS[c.ppo.kl_estimator_in_use].placements,
         kl_placement_message),
    Rule("estimator_whiten_rewards", lambda c: estimator(c).whiten_rewards_ok or not c.reward.whiten_rewards,
         lambda c: f"advantage_estimator {c.ppo.advantage_estimator} {estimator(c).whiten_rewards_conflict}: "
                   "set whiten_rewards: false (whiten_advantages normalises the advantages)"),
    Rule("max_new_tokens", lambda c: c.sampling.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
    Rule("temperature", lambda c: c.sampling.temperature > 0,
         "temperature must be > 0 (log-probs are taken at the sampling temperature)"),
    Rule("top_k", lambda c: c.sampling.top_k >= 0, "top_k must be >= 0"),
    Rule("top_p", lambda c: 0 < c.sampling.top_p <= 1, "top_p must be in (0, 1]"),
    Rule("generation_batch_size",
         lambda c: c.sampling.generation_batch_size is None or c.sampling.generation_batch_size >= 1,
         "generation_batch_size must be >= 1"),
    Rule("vllm_gpu_memory_utilization", lambda c: 0 < c.sampling.vllm_gpu_memory_utilization <= 1,
         "vllm_gpu_memory_utilization must be in (0, 1]"),
    Rule("vllm_kv_cache_gb", lambda c: c.sampling.vllm_kv_cache_gb >= 1, "vllm_kv_cache_gb must be >= 1 (GiB)"),
    Rule("vllm_weight_sync_bucket_mb", lambda c: c.sampling.vllm_weight_sync_bucket_mb >= 1,
         "vllm_weight_sync_bucket_mb must be >= 1"),
    Rule("vllm_max_model_len", lambda c: c.sampling.vllm_max_model_len is None
         or c.sampling.vllm_max_model_len >= c.data.max_prompt_length + engine_budget(c), vllm_length_message),
    Rule("vllm_importance_sampling_bounds", importance_bounds_ok,
         "vllm_importance_sampling_clip_min must be >= 0 and below vllm_importance_sampling_clip_max"),
    known("sampling", "rollout_engine", ROLLOUT_ENGINES),
    Rule("rollout_engine_installed", engine_installed,
         lambda c: f"rollout_engine: {c.sampling.rollout_engine} needs {engine(c).package}, which is not installed. "
                   f"Install it: {engine(c).install}"),
    Rule("vllm_correction_truncated_sampling", lambda c: not corrects_engine(c)
         or (c.sampling.top_k == 0 and c.sampling.top_p == 1.0),
         lambda c: f"rollout_engine: vllm with vllm_importance_sampling_correction: the engine's log-probs would be of "
                   f"the top_k/top_p-truncated distribution (top_k {c.sampling.top_k}, top_p {c.sampling.top_p}) and "
                   "the trainer's of the full softmax, so the ratio measures the truncation, not a mismatch; set "
                   "top_k: 0 and top_p: 1.0, or vllm_importance_sampling_correction: false"),
    Rule("max_prompt_length", lambda c: c.data.max_prompt_length >= 1, "max_prompt_length must be >= 1"),
    Rule("max_updates", lambda c: c.train.max_updates is None or c.train.max_updates >= 1, "max_updates must be >= 1"),
    Rule("num_train_epochs", lambda c: c.train.num_train_epochs > 0, "num_train_epochs must be > 0"),
    Rule("max_seconds", lambda c: c.train.max_seconds is None or c.train.max_seconds > 0, "max_seconds must be > 0"),
    Rule("logging_steps", lambda c: c.train.logging_steps >= 1, "logging_steps must be >= 1"),
    Rule("save_steps", lambda c: c.train.save_steps >= 0, "save_steps must be >= 0"),
    Rule("hub_model_id", lambda c: not c.train.push_to_hub or bool(c.train.hub_model_id),
         "push_to_hub needs hub_model_id (e.g. 'user/model-ppo')"),
    Rule("save_total_limit", lambda c: c.train.save_total_limit is None or c.train.save_total_limit >= 1,
         "save_total_limit must be >= 1 or null"),
    Rule("eval_steps", lambda c: c.train.eval_steps >= 0, "eval_steps must be >= 0"),
    Rule("eval_decoding", lambda c: bool(c.train.eval_decoding), "eval_decoding: a list of greedy and/or sampled"),
    Rule("eval_max_prompts", lambda c: c.data.eval_max_prompts is None or c.data.eval_max_prompts >= 1,
         "eval_max_prompts must be >= 1 or null"),
    Rule("log_completions_steps", lambda c: c.train.log_completions_steps >= 0, "log_completions_steps must be >= 0"),
    Rule("log_completions_count", lambda c: c.train.log_completions_count >= 1, "log_completions_count must be >= 1"),
    Rule("lora_r", lambda c: c.model.lora_r >= 1, "lora_r must be >= 1"),
    Rule("max_turns", lambda c: c.environment.max_turns >= 1, "max_turns must be >= 1"),
    Rule("max_episode_tokens", lambda c: c.environment.max_episode_tokens >= 1, "max_episode_tokens must be >= 1"),
    Rule("estimator_multi_turn", lambda c: no_environment(c) or estimator(c).multi_turn, multi_turn_message),
    Rule("environment_evaluation", lambda c: no_environment(c) or c.eval_dataset is None,
         "held-out evaluation from eval_dataset_name / eval_split scores single responses; with an environment, "
         "evaluate episodes in a callback's on_evaluate (llm_rl/demos/dialogue.py has one)"),
    Rule("environment_kinds", lambda c: c.environment.environment is None or c.environment.environment_factory is None,
         lambda c: f"environment ({c.environment.environment!r}) and environment_factory "
                   f"({c.environment.environment_factory!r}) both name the episodes' environment: keep one "
                   "(environment: reset(row)/step(response); environment_factory: TRL's tool methods, reset(**row))"),
    Rule("environment_factory_rewards",
         lambda c: c.environment.environment_factory is None or c.reward.reward_model_name_or_path is None,
         "environment_factory episodes are scored by get_reward() and reward_funcs; a reward model is not read on "
         "tool-calling transcripts: remove reward_model_name_or_path"),
    Rule("environment_rewards",
         lambda c: c.environment.environment is None
         or (c.reward.reward_model_name_or_path is None and not c.reward.reward_funcs),
         "an environment gives the rewards of multi-turn episodes: remove reward_funcs / "
         "reward_model_name_or_path, or score inside the environment's step()"),
    Rule("lora_dropout", lambda c: 0 <= c.model.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
]

# after the tracker names (`check_report_to`)
PPO_REWARD_RULES: list[Rule] = [
    Rule("reward_weights_count",
         lambda c: c.reward.reward_weights is None or len(c.reward.reward_weights) == n_rewards(c),
         lambda c: f"reward_weights has {plural(len(c.reward.reward_weights), 'entry', 'entries')} but there "
                   f"{'is' if n_rewards(c) == 1 else 'are'} {plural(n_rewards(c), 'reward', 'rewards')} "
                   "(the reward model first, then reward_funcs in order): give one weight per reward"),
    Rule("reward_funcs_specs", lambda c: not bad_reward_specs(c),
         lambda c: f"reward_funcs entry {bad_reward_specs(c)[0]!r} must look like 'package.module:function'"),
]


# ====================================================================== the reward-model config
REWARD_TRAINING_RULES: list[Rule] = [
    Rule("model_name_or_path", lambda c: c.model_name_or_path is not None,
         "model_name_or_path is not set: a Hub id or local folder"),
    Rule("dataset_name", lambda c: c.dataset_name is not None,
         "dataset_name is not set: a Hub id, a local file or 'module:function'"),
    Rule("batch_size", lambda c: c.batch_size >= 1, "batch_size must be >= 1"),
    Rule("eval_batch_size", lambda c: c.eval_batch_size is None or c.eval_batch_size >= 1,
         "eval_batch_size must be >= 1"),
    Rule("gradient_accumulation_steps", lambda c: c.gradient_accumulation_steps >= 1,
         "gradient_accumulation_steps must be >= 1"),
    Rule("learning_rate", lambda c: c.learning_rate > 0, "learning_rate must be > 0"),
    Rule("weight_decay", lambda c: c.weight_decay >= 0, "weight_decay must be >= 0"),
    Rule("max_grad_norm", lambda c: c.max_grad_norm is None or c.max_grad_norm > 0, "max_grad_norm must be > 0 or null"),
    Rule("warmup_steps", lambda c: c.warmup_steps >= 0, "warmup_steps must be >= 0"),
    Rule("num_train_epochs", lambda c: c.num_train_epochs > 0, "num_train_epochs must be > 0"),
    Rule("max_steps", lambda c: c.max_steps is None or c.max_steps >= 1, "max_steps must be >= 1 (or null)"),
    Rule("eval_steps", lambda c: c.eval_steps >= 0, "eval_steps must be >= 0"),
    Rule("logging_steps", lambda c: c.logging_steps >= 1, "logging_steps must be >= 1"),
    Rule("save_steps", lambda c: c.save_steps >= 0, "save_steps must be >= 0"),
    Rule("save_total_limit", lambda c: c.save_total_limit is None or c.save_total_limit >= 1,
         "save_total_limit must be >= 1 or null"),
    Rule("eval_fraction", lambda c: 0 <= c.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
    Rule("one_held_out_source", lambda c: c.eval_split is None or c.eval_fraction == 0,
         "set eval_split or eval_fraction, not both"),
    Rule("center_coef", lambda c: c.center_coef >= 0, "center_coef must be >= 0"),
    Rule("max_length", lambda c: c.max_length >= 2, "max_length must be >= 2"),
    Rule("lora_r", lambda c: c.lora_r >= 1, "lora_r must be >= 1"),
    Rule("lora_dropout", lambda c: 0 <= c.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
    Rule("merge_adapter", lambda c: not c.merge_adapter or c.use_peft, "merge_adapter needs use_peft: true"),
    Rule("hub_model_id", lambda c: not c.push_to_hub or bool(c.hub_model_id),
         "push_to_hub needs hub_model_id (e.g. 'user/addition-rm')"),
]
