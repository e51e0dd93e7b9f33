"""Reward models from preference pairs: a Bradley-Terry loss, a config, data, a training loop.

    pairs (prompt, chosen, rejected) -> one forward over chosen and rejected texts together
      -> scores r_c, r_r read at each text's last real token
      -> loss = -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2
      -> accelerate: backward, clip, step; held-out pairwise accuracy every eval_steps
      -> a plain `AutoModelForSequenceClassification` (num_labels=1) in output_dir

The model is any causal LM or encoder loaded with `AutoModelForSequenceClassification`
and one output. `llm-rl reward train --config FILE.yaml` and `reward_models/train.py` run
`train_reward_model`; the saved folder is what `reward_model_name_or_path` takes in a
PPO config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llm_rl import run_dir
from llm_rl.config import (
    ALIASES,
    REPORT_TO_HELP,
    TORCH_DTYPE_HELP,
    TRUST_REMOTE_CODE_HELP,
    ConfigError,
    check_report_to,
    coerce,
    fill_from_yaml,
    loading,
    missing_local_path,
    split_config_arg,
    unknown_key_message,
)
from llm_rl.metrics import reduce_scalars
from llm_rl.modeling import DTYPES
from llm_rl.rewards import reward_model_text, sequence_scores

PAD_TOKEN = "<|pad|>"
CONFIG_FILE = "reward_config.yaml"


# ====================================================================== the loss
def pairwise_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: Optional[torch.Tensor | float] = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a reward model on preference pairs, and its accuracy.

    chosen_scores, rejected_scores: (batch,) scores r_c, r_r; margin: (batch,) or a float m
    that r_c must exceed r_r by (Touvron et al. 2023, Llama 2, eq. 2), default 0.

        loss = mean(-log sigmoid(r_c - r_r - m)) + center_coef * mean((r_c + r_r)^2)

    The second term pulls each pair's scores to sum to zero, so rewards stay centred
    (Eisenstein et al. 2023, "Helping or Herding?", sec. 3). `logsigmoid` keeps the
    first term finite for any score gap. Stats (detached): `accuracy`, the fraction of
    pairs with r_c > r_r (a tie counts as wrong), and `margin`, the mean of r_c - r_r.
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(
            f"chosen and rejected scores must both be (batch,), got {tuple(chosen_scores.shape)} "
            f"and {tuple(rejected_scores.shape)}"
        )
    gap = chosen_scores - rejected_scores
    shifted = gap if margin is None else gap - torch.as_tensor(margin, dtype=gap.dtype, device=gap.device)
    loss = -F.logsigmoid(shifted).mean()
    if center_coef:
        loss = loss + center_coef * (chosen_scores + rejected_scores).pow(2).mean()
    stats = {"accuracy": (gap > 0).float().mean().detach(), "margin": gap.mean().detach()}
    return loss, stats


# ====================================================================== config
@dataclass
class RewardTrainingConfig:
    """Every option of a reward-model run; `llm-rl reward train --help` lists them."""

    # ---- model
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Base model: a Hub id or local folder of a causal LM or encoder (a score head is added)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})
    torch_dtype: str = field(default="float32", metadata={"help": TORCH_DTYPE_HELP})
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
    logging_steps: int = field(default=10, metadata={"help": "Write training metrics every N optimizer steps."})
    seed: int = field(default=42, metadata={"help": "Seed for the score head, shuffling and the eval_fraction split."})
    output_dir: str = field(default="outputs/reward_model", metadata={"help": "Where the model, tokenizer, config and metrics go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a folder that already holds another run."}
    )
    report_to: str = field(default="none", metadata={"help": REPORT_TO_HELP})
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
        return fill_from_yaml(cls(), path, overrides)

    def update(self, values: dict, source: str = "config") -> None:
        hints = typing.get_type_hints(type(self))
        for key, value in (values or {}).items():
            if key not in hints:
                raise ConfigError(
                    unknown_key_message(key, source, candidates=list(hints), help_command="llm-rl reward train --help",
                                        aliases=REWARD_ALIASES)
                )
            setattr(self, key, coerce(value, hints[key], key, source))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

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
            (0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
            (
                self.eval_split is None or self.eval_fraction == 0,
                "set eval_split or eval_fraction, not both",
            ),
            (self.center_coef >= 0, "center_coef must be >= 0"),
            (self.max_length >= 2, "max_length must be >= 2"),
            (self.torch_dtype in DTYPES, f"torch_dtype: one of {', '.join(DTYPES)}"),
            (self.lora_r >= 1, "lora_r must be >= 1"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (not self.merge_adapter or self.use_peft, "merge_adapter needs use_peft: true"),
            (not self.push_to_hub or bool(self.hub_model_id), "push_to_hub needs hub_model_id (e.g. 'user/addition-rm')"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_report_to(self.report_to)


SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
# TRL RewardConfig / OpenRLHF names: the PPO table, with this config's meaning of batch_size
REWARD_ALIASES = {
    **ALIASES,
    "per_device_train_batch_size": ("batch_size", "batch_size counts pairs per process per forward"),
    "micro_train_batch_size": ("batch_size", "batch_size counts pairs per process per forward"),
    "center_rewards_coefficient": ("center_coef", ""),
    "max_len": ("max_length", ""),
}


def format_help() -> str:
    lines = []
    for f in dataclasses.fields(RewardTrainingConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name:<28} {f.metadata['help']} [default: {default}]")
    return "\n".join(lines)


# ====================================================================== model
def ensure_distinct_pad(tokenizer) -> bool:
    """Give the tokenizer a pad token that is not EOS; True when a new token was added.

    Scores are read at the last real token. A pad equal to EOS would make any code that
    finds that token by pad id (transformers' own pooling) skip a text's final EOS.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def load_reward_model(config: RewardTrainingConfig):
    """(AutoModelForSequenceClassification with one output, tokenizer with a distinct pad, resized?)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        config.model_name_or_path,
        num_labels=1,
        dtype=DTYPES[config.torch_dtype],
        trust_remote_code=config.trust_remote_code,
    )
    resized = ensure_distinct_pad(tokenizer)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
        resized = True
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, resized


def apply_lora(model, config: RewardTrainingConfig):
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    lora = LoraConfig(
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2 stores weights transposed
        task_type="SEQ_CLS",  # peft then also trains and saves the score head (modules_to_save)
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
    )
    return get_peft_model(model, lora)


class RewardScorer(nn.Module):
    """`forward(input_ids, attention_mask) -> (batch,)` scores of a sequence classifier.

    A module of its own so DDP/FSDP/DeepSpeed wrap the whole scoring pass, last-token
    pooling included; `.model` is the transformers (or peft) model that gets saved.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sequence_scores(self.model, input_ids, attention_mask)


# ====================================================================== data
def load_preference_splits(config: RewardTrainingConfig):
    """(train, eval or None) `datasets.Dataset`s of preference pairs."""
    train_source = load_source(config.dataset_name, config.dataset_split, config.dataset_config)
    eval_data = None
    if config.eval_split is not None:
        eval_data = load_source(config.dataset_name, config.eval_split, config.dataset_config, eval_file=True)
    elif config.eval_fraction > 0:
        parts = train_source.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        train_source, eval_data = parts["train"], parts["test"]
    return train_source, eval_data


def load_source(name: str, split: str, dataset_config: Optional[str], eval_file: bool = False):
    from llm_rl.data import LOCAL_FORMATS, DataError, load_prompt_dataset
    from llm_rl.rewards import RewardError, load_reward_function

    if eval_file and Path(split).suffix.lower() in LOCAL_FORMATS:
        return load_prompt_dataset(split)
    if ":" in name and not Path(name).exists():
        try:
            splits = load_reward_function(name)()  # same 'module:function' resolution as reward functions
        except RewardError as e:
            raise DataError(f"dataset_name {name!r} looks like 'module:function' but: {e}") from e
        if split not in splits:
            raise DataError(f"dataset {name!r} has no split {split!r} (splits: {list(splits)})")
        return splits[split]
    return load_prompt_dataset(name, split, dataset_config)


@dataclass
class TokenizedPair:
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0


def tokenize_pairs(dataset, tokenizer, config: RewardTrainingConfig, name: str = "dataset") -> list[TokenizedPair]:
    """Render each row's chosen and rejected texts and tokenize them, keeping the end when too long."""
    from llm_rl.data import DataError

    columns = list(dataset.column_names)
    prompt_column = config.prompt_column
    if prompt_column is not None and prompt_column not in columns:
        if prompt_column != "prompt":
            raise DataError(
                f"{name} has no column '{prompt_column}' (columns: {columns}); set prompt_column to the prompt's "
                "column, or to null when chosen and rejected are full texts"
            )
        prompt_column = None  # the default: no prompt column means full texts
    needed = [config.chosen_column, config.rejected_column] + ([config.margin_column] if config.margin_column else [])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"{name} has no column {', '.join(repr(c) for c in missing)} (columns: {columns}); set chosen_column, "
            "rejected_column (and margin_column) to the columns holding the preferred and the other completion"
        )
    tokenizer.truncation_side = "left"
    pairs, truncated = [], 0
    for row, values in enumerate(dataset):
        prompt = values[prompt_column] if prompt_column else None
        ids = []
        for column in (config.chosen_column, config.rejected_column):
            text, special_tokens = render_text(prompt, values[column], tokenizer, column, row, name)
            encoded = tokenizer(text, add_special_tokens=special_tokens).input_ids
            if len(encoded) > config.max_length:
                truncated += 1
                encoded = encoded[-config.max_length :]
            if not encoded:
                raise DataError(f"{name} row {row}: '{column}' is empty after tokenization; remove the row")
            ids.append(encoded)
        margin = float(values[config.margin_column]) if config.margin_column else 0.0
        pairs.append(TokenizedPair(ids[0], ids[1], margin))
    if not pairs:
        raise DataError(f"{name} holds no preference pairs")
    if truncated:
        warnings.warn(f"{name}: {truncated} texts were longer than max_length={config.max_length} and lost their start",
                      stacklevel=2)
    return pairs


def render_text(prompt, completion, tokenizer, column: str, row: int, name: str) -> tuple[str, bool]:
    """Check a pair's values, then (text, add_special_tokens) by the rule PPO scores with (`reward_model_text`)."""
    from llm_rl.data import DataError

    def is_messages(value) -> bool:
        return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)

    if isinstance(completion, str) and (prompt is None or isinstance(prompt, str)):
        return reward_model_text(tokenizer, prompt, completion)
    if is_messages(completion) and (prompt is None or is_messages(prompt)):
        if tokenizer.chat_template is None:
            raise DataError(
                f"{name} row {row}: '{column}' holds chat messages but the tokenizer has no chat_template; "
                "set one on the tokenizer or give plain-text pairs"
            )
        return reward_model_text(tokenizer, prompt, completion)
    raise DataError(
        f"{name} row {row}: '{column}' (and the prompt) must be strings, or lists of chat messages "
        f"({{'role': ..., 'content': ...}}); got {type(prompt).__name__} and {type(completion).__name__}"
    )


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, padding_side: str = "right") -> dict:
    """Chosen texts then rejected texts in one batch: input_ids, attention_mask (2 * pairs, len), margin (pairs,)."""
    texts = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    longest = max(map(len, texts))
    input_ids = torch.full((len(texts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(texts), longest), dtype=torch.long)
    for row, ids in enumerate(texts):
        cols = slice(0, len(ids)) if padding_side == "right" else slice(longest - len(ids), longest)
        input_ids[row, cols] = torch.tensor(ids)
        attention_mask[row, cols] = 1
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin}


# ====================================================================== training
def train_reward_model(config: RewardTrainingConfig) -> dict:
    """Train, evaluate and save a reward model; returns the final metrics (eval/accuracy, ...)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    config.validate()
    for key in ("model_name_or_path", "dataset_name", "eval_split"):
        problem = missing_local_path(getattr(config, key), data=key != "model_name_or_path")
        if problem:
            raise ConfigError(f"{key}: {problem}")
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=config.output_dir,
    )
    output_dir = Path(config.output_dir)
    run_dir.prepare(accelerator, output_dir, config.overwrite_output_dir, resuming=False, resumable=False,
                    extra=("llm_rl_reward",))
    set_seed(config.seed)  # the score head starts identical on every process

    with loading("model_name_or_path", config.model_name_or_path):
        model, tokenizer, resized = load_reward_model(config)
    if config.use_peft:
        model = apply_lora(model, config)
    train_data, eval_data = load_preference_splits(config)
    train_pairs = tokenize_pairs(train_data, tokenizer, config, "training data")
    eval_pairs = tokenize_pairs(eval_data, tokenizer, config, "eval data") if eval_data is not None else None

    def collate(pairs):
        return collate_pairs(pairs, tokenizer.pad_token_id)

    train_loader = torch.utils.data.DataLoader(
        train_pairs, batch_size=config.batch_size, shuffle=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),
    )
    scorer = RewardScorer(model)
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scorer, optimizer, train_loader = accelerator.prepare(scorer, optimizer, train_loader)
    eval_loader = None
    if eval_pairs is not None:
        eval_loader = accelerator.prepare(torch.utils.data.DataLoader(
            eval_pairs, batch_size=config.eval_batch_size or config.batch_size, collate_fn=collate
        ))

    # sizes: derived once, here. The scheduler steps once per optimizer step (not prepared,
    # so accelerate does not multiply its steps by the number of processes).
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or max(1, math.ceil(config.num_train_epochs * steps_per_epoch))
    scheduler = get_scheduler(SCHEDULERS[config.lr_scheduler_type], optimizer, config.warmup_steps, total_steps)

    if accelerator.is_main_process:
        print(f"[reward] {len(train_pairs)} training pairs, {len(eval_pairs or [])} held-out pairs, "
              f"{total_steps} optimizer steps on {accelerator.num_processes} process(es)")
    if config.report_to != "none":
        accelerator.init_trackers("llm_rl_reward", config=config.to_dict())
    metrics_file = output_dir / "metrics.jsonl"
    bar = tqdm(total=total_steps, desc="reward", disable=not (accelerator.is_main_process and config.progress_bar))
    step, sums, n_micro, last_metrics = 0, {}, 0, {}
    scorer.train()
    while step < total_steps:
        for batch in train_loader:
            with accelerator.accumulate(scorer):
                scores = scorer(batch["input_ids"], batch["attention_mask"]).float()
                chosen, rejected = scores.chunk(2)
                margin = batch["margin"] if config.margin_column else None
                loss, stats = pairwise_loss(chosen, rejected, margin, config.center_coef)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(scorer.parameters(), config.max_grad_norm)
                optimizer.step()  # a no-op until the last micro-batch of the accumulation
                optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss.detach(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + value
            n_micro += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            bar.update(1)
            metrics = {}
            if step % config.logging_steps == 0 or step == total_steps:
                means = global_mean(accelerator, {f"train/{k}": v / n_micro for k, v in sums.items()})
                metrics.update(means, lr=scheduler.get_last_lr()[0])
                sums, n_micro = {}, 0
            if eval_loader is not None and (step == total_steps or (config.eval_steps and step % config.eval_steps == 0)):
                metrics.update(evaluate_pairs(scorer, eval_loader, accelerator, config))
                scorer.train()
            if metrics:
                metrics = {"step": step, **metrics}
                last_metrics.update(metrics)
                log_metrics(accelerator, metrics, metrics_file, bar, config.report_to != "none")
            if step >= total_steps:
                break
    bar.close()
    save_reward_model(accelerator, scorer, tokenizer, config, resized, last_metrics)
    if config.push_to_hub and accelerator.is_main_process:
        from llm_rl.hub import push_folder

        url = push_folder(output_dir, config.hub_model_id, config.hub_private_repo, "llm_rl reward model")
        print(f"[reward] pushed {output_dir} to {url}")
    accelerator.wait_for_everyone()
    if config.report_to != "none":
        accelerator.end_training()
    return last_metrics


@torch.no_grad()
def evaluate_pairs(scorer, loader, accelerator, config: RewardTrainingConfig) -> dict[str, float]:
    """Pairwise accuracy, mean margin and loss over every held-out pair, all processes together."""
    scorer.eval()
    chosen_all, rejected_all, margin_all = [], [], []
    for batch in loader:
        scores = scorer(batch["input_ids"], batch["attention_mask"]).float()
        chosen, rejected = scores.chunk(2)
        # gather_for_metrics drops the pairs repeated to even out the last batch across processes
        chosen, rejected, margin = accelerator.gather_for_metrics((chosen, rejected, batch["margin"]))
        chosen_all.append(chosen)
        rejected_all.append(rejected)
        margin_all.append(margin)
    chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
    margin = torch.cat(margin_all) if config.margin_column else None
    loss, stats = pairwise_loss(chosen, rejected, margin, config.center_coef)
    return {
        "eval/accuracy": float(stats["accuracy"]),
        "eval/margin": float(stats["margin"]),
        "eval/loss": float(loss),
        "eval/score_mean": float(torch.cat([chosen, rejected]).mean()),
        "eval/pairs": len(chosen),
    }


def global_mean(accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    return reduce_scalars(accelerator, values, "mean")


def log_metrics(accelerator, metrics: dict, metrics_file: Path, bar, trackers: bool) -> None:
    if trackers:
        accelerator.log(metrics, step=metrics["step"])
    if accelerator.is_main_process:
        with open(metrics_file, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


def save_reward_model(accelerator, scorer, tokenizer, config: RewardTrainingConfig, resized: bool, metrics: dict) -> None:
    """Model (safetensors; LoRA adapter or merged model with use_peft), tokenizer, config and a model card.

    Every process joins `get_state_dict` (it gathers FSDP / ZeRO-3 shards); the main process writes.
    """
    output_dir = Path(config.output_dir)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(scorer)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(scorer).model
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        if config.use_peft and config.merge_adapter:
            model.merge_and_unload().save_pretrained(output_dir)
        elif config.use_peft:
            # an added pad token grew the embeddings: the adapter must carry them
            model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=resized)
        else:
            model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
        config.save_yaml(output_dir / CONFIG_FILE)
        (output_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
        model_card(config, metrics).save(output_dir / "README.md")
    accelerator.wait_for_everyone()


def model_card(config: RewardTrainingConfig, metrics: dict):
    """The card of the output folder (and the Hub page): base model, data, how to load, held-out metrics;
    Hub metadata through `llm_rl.hub.build_card` (base_model and datasets only when they are Hub ids)."""
    from llm_rl.hub import build_card, hub_id, metric_table

    adapter = config.use_peft and not config.merge_adapter
    repo = config.hub_model_id or config.output_dir
    load = (
        "from peft import AutoPeftModelForSequenceClassification\n"
        f"model = AutoPeftModelForSequenceClassification.from_pretrained({repo!r})"
        if adapter
        else "from transformers import AutoModelForSequenceClassification\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({repo!r})"
    )
    dataset = hub_id(config.dataset_name, data=True)
    front = {
        "library_name": "peft" if adapter else "transformers",
        "base_model": hub_id(config.model_name_or_path),
        "datasets": [dataset] if dataset else None,
        "tags": ["llm_rl", "reward-model"],
        "pipeline_tag": "text-classification",
    }
    eval_keys = [k for k in metrics if k.startswith("eval/")]
    body = (
        f"# Reward model trained with llm_rl\n\nBase model: `{config.model_name_or_path}`; pairs: "
        f"`{config.dataset_name}`; {'LoRA adapter' if adapter else 'full weights'}, one output (the reward), "
        "read at the last token of prompt + completion, trained with the Bradley-Terry pairwise loss.\n\n"
        f"```python\n{load}\n```\n\n## Held-out pairs\n\n{metric_table(metrics, eval_keys)}\n\n"
        f"Training options: `{CONFIG_FILE}`; metrics per step: `metrics.jsonl`.\n"
    )
    return build_card(front, body)


# ====================================================================== command line
def main(argv: list[str]) -> int:
    """`llm-rl reward train --config FILE.yaml [--key value ...]`."""
    if argv and argv[0] in ("-h", "--help"):
        print("usage: llm-rl reward train --config FILE.yaml [--key value ...]\n\nkeys:\n" + format_help())
        return 0
    config = RewardTrainingConfig.from_yaml(*split_config_arg(argv))
    train_reward_model(config)
    return 0
