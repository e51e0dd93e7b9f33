"""TODO docstring"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llm_rl.config.aliases import ALIASES, unknown_key_message
from llm_rl.config.choices import TorchDtype
from llm_rl.config.errors import ConfigError
from llm_rl.config.loading import coerce, fill_from_yaml, option_lines, write_yaml
from llm_rl.config.paths import REPORT_TO_HELP, check_report_to
from llm_rl.config.sections import TORCH_DTYPE_HELP, TRUST_REMOTE_CODE_HELP, CheckpointOptions

CONFIG_FILE = "reward_config.yaml"


# ====================================================================== config
@dataclass
class RewardTrainingConfig(CheckpointOptions):
    """Every option of a reward-model run; `llm-rl reward train --help` lists them."""

    # ---- model
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Base model: a Hub id or local folder of a causal LM or encoder (a score head is added)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})
    torch_dtype: TorchDtype = field(default="float32", metadata={"help": TORCH_DTYPE_HELP})
    # ---- data
    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Preference pairs: a Hub dataset id, a local folder, a .json/.jsonl/.csv/.parquet file, "
            "or 'module:function' returning a dict of splits (e.g. llm_rl.tasks.addition_preferences:load_splits)."
        },
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out split of the same dataset, or a .json/.jsonl/.csv/.parquet file of pairs."},
    )
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
    # ---- loss and optimisation
    center_coef: float = field(
        default=0.0, metadata={"help": "Weight of mean((r_c + r_r)^2), keeping rewards centred on zero (e.g. 0.01)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Pairs per process per forward (each pair is two texts)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Forwards per optimizer step."})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Clip the global grad norm (null = off)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "constant, linear or cosine (after warmup)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup, in optimizer steps."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs."})
    max_steps: Optional[int] = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (overrides num_train_epochs)."}
    )
    # ---- evaluation, logging, output
    eval_steps: int = field(
        default=100, metadata={"help": "Evaluate on the held-out pairs every N optimizer steps and at the end (0 = end only)."}
    )
    eval_batch_size: Optional[int] = field(default=None, metadata={"help": "Pairs per forward in evaluation (default batch_size)."})
    logging_steps: int = field(
        default=10, metadata={"help": "Write training metrics every N optimizer steps (and at every checkpoint)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for the score head, shuffling and the eval_fraction split."})
    output_dir: str = field(default="outputs/reward_model", metadata={"help": "Where the model, tokenizer, config and metrics go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a folder that already holds another run."}
    )
    report_to: str = field(default="none", metadata={"help": REPORT_TO_HELP})
    run_name: Optional[str] = field(default=None, metadata={"help": "Tracker run name (default: llm_rl_reward)."})
    progress_bar: bool = field(default=True, metadata={"help": "tqdm bar on the main process."})
    # ---- LoRA
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (and the score head) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Module names to adapt, e.g. q_proj,v_proj (default: peft's choice for the model)."}
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "Save the merged full model instead of the adapter (then plain transformers loads it)."},
    )
    # ---- Hub
    push_to_hub: bool = field(default=False, metadata={"help": "Upload output_dir to the Hub at the end."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repo id, e.g. 'user/addition-rm'."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: Optional[str | Path], overrides: Optional[list[str]] = None) -> RewardTrainingConfig:
        """A YAML file (flat keys) then `--key value` overrides, validated."""
        return fill_from_yaml(cls(), path, overrides, typing.get_type_hints(cls))

    def update(self, values: dict, source: str = "config") -> None:
        hints = typing.get_type_hints(type(self))
        for key, value in (values or {}).items():
            if key not in hints:
                raise ConfigError(
                    unknown_key_message(key, source, list(hints), help_command="llm-rl reward train --help",
                                        aliases=REWARD_ALIASES)
                )
            setattr(self, key, coerce(value, hints[key], key, source))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        write_yaml(self.to_dict(), path)

    def validate(self) -> None:
        """Check values the types alone do not constrain; raise ConfigError saying what to fix."""
        checks = [
            (self.model_name_or_path is not None, "model_name_or_path is not set: a Hub id or local folder"),
            (self.dataset_name is not None, "dataset_name is not set: a Hub id, a local file or 'module:function'"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or null"),
            (self.lr_scheduler_type in SCHEDULERS, f"lr_scheduler_type: one of {', '.join(SCHEDULERS)}"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.num_train_epochs > 0, "num_train_epochs must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1 (or null)"),
            (self.eval_steps >= 0, "eval_steps must be >= 0"),
            (self.logging_steps >= 1, "logging_steps must be >= 1"),
            (self.save_steps >= 0, "save_steps must be >= 0"),
            (self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1 or null"),
            (0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
            (
                self.eval_split is None or self.eval_fraction == 0,
                "set eval_split or eval_fraction, not both",
            ),
            (self.center_coef >= 0, "center_coef must be >= 0"),
            (self.max_length >= 2, "max_length must be >= 2"),
            (self.lora_r >= 1, "lora_r must be >= 1"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (not self.merge_adapter or self.use_peft, "merge_adapter needs use_peft: true"),
            (not self.push_to_hub or bool(self.hub_model_id), "push_to_hub needs hub_model_id (e.g. 'user/addition-rm')"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_report_to(self.report_to)


SCHEDULERS = ("constant", "linear", "cosine")


# TRL RewardConfig / OpenRLHF names: the PPO table, with this config's meaning of batch_size
REWARD_ALIASES = {
    **ALIASES,
    "per_device_train_batch_size": ("batch_size", "batch_size counts pairs per process per forward"),
    "micro_train_batch_size": ("batch_size", "batch_size counts pairs per process per forward"),
    "center_rewards_coefficient": ("center_coef", ""),
    "max_len": ("max_length", ""),
}


def format_help() -> str:
    return "\n".join(option_lines(RewardTrainingConfig))
