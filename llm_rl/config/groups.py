"""Option groups that the PPO config and the reward-model config share, each field declared once.

The PPO sections (llm_rl.config.sections) and `RewardTrainingConfig` (llm_rl.config.reward_training)
inherit these dataclasses. A group's defaults and help texts are the PPO run's; a config that
means something else by a key keeps its type and name and changes only its default or its help
with `retune`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Optional

from llm_rl.config.choices import Schedule, TorchDtype
from llm_rl.config.paths import REPORT_TO_HELP

KEEP: Any = object()  # a `Tune` default that keeps the group's


@dataclass(frozen=True)
class Tune:
    """What a config changes in a field it inherits from a group: its default, its help, or both."""

    default: Any = KEEP
    help: Optional[str] = None


def retune(**tunes: Tune):
    """Class decorator, placed under @dataclass: the inherited fields named in `tunes` take the new
    default and/or help; their type and their place in the field order stay the group's."""

    def apply(cls: type) -> type:
        inherited: dict[str, tuple[dataclasses.Field, Any]] = {}
        for base in reversed(cls.__mro__[1:]):
            if dataclasses.is_dataclass(base):
                hints = typing.get_type_hints(base)
                inherited.update({f.name: (f, hints[f.name]) for f in dataclasses.fields(base)})
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for name, tune in tunes.items():
            old, annotations[name] = inherited[name]
            if tune.default is KEEP:
                default, factory = old.default, old.default_factory
            else:
                default, factory = tune.default, MISSING
            help_text = old.metadata.get("help", "") if tune.help is None else tune.help
            setattr(cls, name, field(default=default, default_factory=factory,
                                     metadata={**old.metadata, "help": help_text}))
        cls.__annotations__ = annotations
        return cls

    return apply


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
class ModelSource:
    """The model a run starts from and how it is loaded."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Policy: a Hub id or a local folder, loaded with from_pretrained."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the Hub. Off unless you trust the repository."}
    )
    torch_dtype: TorchDtype = field(
        default="float32",
        metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto. Mixed precision comes from accelerate."},
    )


@dataclass
class LoraOptions:
    """LoRA adapters instead of training every weight (peft); read by llm_rl.models.loading.add_lora."""

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
class DatasetSource:
    """Where the training data come from, and the held-out split."""

    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Prompts: a Hub dataset id, a local folder, or a .json/.jsonl/.csv/.parquet file."},
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    dataset_split: str = field(default="train", metadata={"help": "Split to take prompts from."})
    eval_split: Optional[str] = field(
        default=None, metadata={"help": "Split of the held-out prompts (e.g. test); null: 'train' of eval_dataset_name."}
    )


@dataclass
class OptimizerOptions:
    """What one optimizer step sees, and the AdamW optimizer and learning-rate schedule."""

    batch_size: int = field(
        default=16, metadata={"help": "Prompts rolled out per update, per process (x num_generations rows)."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per mini-batch (trades memory for nothing else)."}
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})
    lr_scheduler_type: Schedule = field(
        default="constant", metadata={"help": "constant, linear or cosine, after warmup_steps (with any of them)."}
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "Linear warmup from 0, in optimizer steps; applies to every lr_scheduler_type."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Clip the global grad norm (None = off)."})


@dataclass
class RunOptions:
    """Where a run writes, its seed and length, how often it logs and evaluates, and its trackers."""

    output_dir: str = field(default="outputs/ppo", metadata={"help": "Where the policy, config and metrics go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a folder that already holds another run."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for every random choice."})
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "Passes over the prompts (used when max_updates is not set)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Print a summary line every N updates (and the last)."})
    eval_steps: int = field(
        default=0,
        metadata={"help": "Evaluate on the held-out prompts (and the callbacks' on_evaluate) every N updates and at the "
                          "end (0 = at the end only)."},
    )
    report_to: str = field(default="none", metadata={"help": REPORT_TO_HELP})
    run_name: Optional[str] = field(default=None, metadata={"help": "Tracker run name."})
    progress_bar: bool = field(default=True, metadata={"help": "tqdm bar on the main process."})


@dataclass
class HubOptions:
    """Uploading the output folder to the Hugging Face Hub at the end of a run."""

    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the final output folder (policy, tokenizer, card) to the Hub."}
    )
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repo id, e.g. 'user/model-ppo'."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
