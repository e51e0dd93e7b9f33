"""The reward-model config: every option of `llm-rl reward train`, as flat keys in one dataclass.

`RewardTrainingConfig` is built from the option groups it shares with the PPO config
(llm_rl.config.groups: model source, dataset, optimizer, run, LoRA, Hub, checkpoints), each key
declared once there; `retune` gives a key this config's default or help where they differ from
PPO's. Its own keys are the preference pairs' columns and the loss. `validate` runs
llm_rl.config.rules.REWARD_TRAINING_RULES; the trainer is llm_rl.training.reward_trainer.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llm_rl.config.aliases import ALIASES, unknown_key_message
from llm_rl.config.groups import (
    CheckpointOptions,
    DatasetSource,
    HubOptions,
    LoraOptions,
    ModelSource,
    OptimizerOptions,
    RunOptions,
    Tune,
    retune,
)
from llm_rl.config.loading import UnknownKey, coerce, fill_from_yaml, option_lines, set_each, write_yaml
from llm_rl.config.paths import check_report_to
from llm_rl.config.rules import REWARD_TRAINING_RULES, check

CONFIG_FILE = "reward_config.yaml"


@dataclass
class PairData:
    """How a row of the dataset becomes a preference pair."""

    eval_fraction: float = field(
        default=0.0,
        metadata={"help": "Without eval_split: hold out this fraction of the training pairs (seeded) for evaluation."},
    )
    prompt_column: Optional[str] = field(
        default="prompt",
        metadata={
            "help": "Column prepended to chosen and rejected. With the default and no such column, chosen and "
            "rejected are full texts; null forces that."
        },
    )
    chosen_column: str = field(default="chosen", metadata={"help": "Column with the preferred completion (or text)."})
    rejected_column: str = field(default="rejected", metadata={"help": "Column with the other completion (or text)."})
    margin_column: Optional[str] = field(
        default=None, metadata={"help": "Optional float column: how much r_chosen must exceed r_rejected by."}
    )
    max_length: int = field(
        default=512, metadata={"help": "Longest text in tokens; longer ones lose their beginning (the end is scored)."}
    )


@dataclass
@retune(
    # model and data
    model_name_or_path=Tune(
        help="Base model: a Hub id or local folder of a causal LM or encoder (a score head is added)."),
    dataset_name=Tune(
        help="Preference pairs: a Hub dataset id, a local folder, a .json/.jsonl/.csv/.parquet file, "
             "or 'module:function' returning a dict of splits (e.g. llm_rl.tasks.addition_preferences:load_splits)."),
    dataset_split=Tune(help="Split to train on."),
    eval_split=Tune(help="Held-out split of the same dataset, or a .json/.jsonl/.csv/.parquet file of pairs."),
    # optimisation
    batch_size=Tune(help="Pairs per process per forward (each pair is two texts)."),
    gradient_accumulation_steps=Tune(help="Forwards per optimizer step."),
    max_grad_norm=Tune(help="Clip the global grad norm (null = off)."),
    lr_scheduler_type=Tune(default="linear", help="constant, linear or cosine (after warmup)."),
    warmup_steps=Tune(help="Linear warmup, in optimizer steps."),
    # the run
    num_train_epochs=Tune(help="Passes over the training pairs."),
    eval_steps=Tune(default=100,
                    help="Evaluate on the held-out pairs every N optimizer steps and at the end (0 = end only)."),
    logging_steps=Tune(help="Write training metrics every N optimizer steps (and at every checkpoint)."),
    seed=Tune(help="Seed for the score head, shuffling and the eval_fraction split."),
    output_dir=Tune(default="outputs/reward_model", help="Where the model, tokenizer, config and metrics go."),
    run_name=Tune(help="Tracker run name (default: llm_rl_reward)."),
    # LoRA
    use_peft=Tune(help="Train LoRA adapters (and the score head) instead of all weights."),
    lora_alpha=Tune(help="LoRA alpha (the update is scaled by alpha / r)."),
    lora_dropout=Tune(default=0.05, help="Dropout on the LoRA input."),
    lora_target_modules=Tune(
        help="Module names to adapt, e.g. q_proj,v_proj (default: peft's choice for the model)."),
    merge_adapter=Tune(
        help="Save the merged full model instead of the adapter (then plain transformers loads it)."),
    # Hub
    push_to_hub=Tune(help="Upload output_dir to the Hub at the end."),
    hub_model_id=Tune(help="Hub repo id, e.g. 'user/addition-rm'."),
    hub_private_repo=Tune(help="Create the Hub repository as private."),
)
class RewardTrainingConfig(HubOptions, LoraOptions, RunOptions, OptimizerOptions, PairData, DatasetSource,
                           ModelSource, CheckpointOptions):
    """Every option of a reward-model run; `llm-rl reward train --help` lists them."""

    center_coef: float = field(
        default=0.0, metadata={"help": "Weight of mean((r_c + r_r)^2), keeping rewards centred on zero (e.g. 0.01)."}
    )
    max_steps: Optional[int] = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (overrides num_train_epochs)."}
    )
    eval_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Pairs per forward in evaluation (default batch_size)."}
    )

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: Optional[str | Path], overrides: Optional[list[str]] = None) -> RewardTrainingConfig:
        """A YAML file (flat keys) then `--key value` overrides, validated."""
        return fill_from_yaml(cls(), path, overrides, typing.get_type_hints(cls))

    def set_values(self, values: dict, source: str = "config") -> None:
        """Set flat keys; the unknown or mistyped ones raise one ConfigError listing them all."""
        hints = typing.get_type_hints(type(self))

        def set_one(key: str, value) -> None:
            if key not in hints:
                raise UnknownKey(
                    unknown_key_message(key, source, list(hints), help_command="llm-rl reward train --help",
                                        aliases=REWARD_ALIASES)
                )
            setattr(self, key, coerce(value, hints[key], key, source))

        set_each(values, source, set_one)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        write_yaml(self.to_dict(), path)

    def validate(self) -> None:
        """Check values the types alone do not constrain (llm_rl.config.rules); raise ConfigError saying what to fix."""
        check(REWARD_TRAINING_RULES, self)
        check_report_to(self.report_to)


# TRL RewardConfig / OpenRLHF names: the PPO table, with this config's meaning of batch_size
REWARD_ALIASES = {
    **ALIASES,
    "per_device_train_batch_size": ("batch_size", "batch_size counts pairs per process per forward"),
    "micro_train_batch_size": ("batch_size", "batch_size counts pairs per process per forward"),
    "center_rewards_coefficient": ("center_coef", ""),
    "max_len": ("max_length", ""),
}


def format_help() -> str:
    """The keys of `llm-rl reward train --help`."""
    return "\n".join(option_lines(RewardTrainingConfig))
