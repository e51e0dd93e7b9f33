"""Reward models from preference pairs: a config, data, and `RewardTrainer` (a `llm_rl.training.run.TrainingRun`).

    pairs (prompt, chosen, rejected) -> one forward over chosen and rejected texts together
      -> scores r_c, r_r read at each text's last real token
      -> `llm_rl.algorithms.losses.pairwise_loss`: -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2
      -> accelerate: backward, clip, step; held-out pairwise accuracy every eval_steps
      -> a plain `AutoModelForSequenceClassification` (num_labels=1) in output_dir

The model is any causal LM or encoder loaded with `AutoModelForSequenceClassification`
and one output. `llm-rl reward train --config FILE.yaml` and `reward_models/train.py` run
`train_reward_model`; the saved folder is what `reward_model_name_or_path` takes in a
PPO config. Checkpoints, resume, logging, the output folder and the Hub upload are the
run skeleton's (`llm_rl.training.run`), the same as PPO's.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from torch import nn

from llm_rl.algorithms.losses import (
    pairwise_loss,  # public here too: `from llm_rl.training.reward_trainer import pairwise_loss`
)
from llm_rl.config.errors import ConfigError, loading
from llm_rl.config.paths import missing_local_path
from llm_rl.config.reward_training import CONFIG_FILE, RewardTrainingConfig
from llm_rl.models.loading import add_lora, ensure_distinct_pad, resize_for_tokenizer
from llm_rl.models.value_head import DTYPES
from llm_rl.rewards.model import reward_model_text, sequence_scores
from llm_rl.training import output_dir as run_dir
from llm_rl.training.run import TrainingRun, launch_check

__all__ = ["RewardTrainer", "RewardTrainingConfig", "pairwise_loss", "train_reward_model"]


# ====================================================================== model
def load_reward_model(config: RewardTrainingConfig):
    """(AutoModelForSequenceClassification with one output, tokenizer with a distinct pad, resized?):
    the pad policy and embedding growth of PPO's policies (`llm_rl.training.pipeline`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        config.model_name_or_path,
        num_labels=1,
        dtype=DTYPES[config.torch_dtype],
        trust_remote_code=config.trust_remote_code,
    )
    ensure_distinct_pad(tokenizer)
    resized = resize_for_tokenizer(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, resized


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
    from llm_rl.data.prompts import LOCAL_FORMATS, DataError, load_prompt_dataset
    from llm_rl.rewards.functions import RewardError, load_reward_function

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
    from llm_rl.data.prompts import DataError

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
    from llm_rl.data.prompts import DataError

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
class SeededShuffle(torch.utils.data.Sampler):
    """A permutation of the pairs that depends only on (seed, epoch): a resumed run sees the order an
    uninterrupted run saw. No `set_epoch` method, so accelerate's loaders leave `epoch` to us."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


class RewardTrainer(TrainingRun):
    """Train a reward model on preference pairs: the constructor loads and prepares everything,
    `train()` runs the optimizer steps and saves the model (the run skeleton does the rest)."""

    name = "reward"
    default_run_name = "llm_rl_reward"
    config_file = CONFIG_FILE
    hub_commit_message = "llm_rl reward model"

    def __init__(self, config: RewardTrainingConfig, accelerator: Optional[Accelerator] = None):
        from accelerate.utils import set_seed

        config.validate()
        run_dir.check_reuse(Path(config.output_dir), config.overwrite_output_dir, config.resume_from_checkpoint)
        for key in ("model_name_or_path", "dataset_name", "eval_split"):
            problem = missing_local_path(getattr(config, key), data=key != "model_name_or_path")
            if problem:
                raise ConfigError(f"{key}: {problem}")
        launch_check(config)  # FSDP/DeepSpeed without GPUs, Hub access: before the model loads
        super().__init__(config, config, config.gradient_accumulation_steps, accelerator)
        acc = self.accelerator
        set_seed(config.seed)  # the score head starts identical on every process
        with loading("model_name_or_path", config.model_name_or_path):
            model, self.tokenizer, self.resized = load_reward_model(config)
        if config.use_peft:
            model = add_lora(model, config, task_type="SEQ_CLS")
        train_data, eval_data = load_preference_splits(config)
        train_pairs = tokenize_pairs(train_data, self.tokenizer, config, "training data")
        eval_pairs = tokenize_pairs(eval_data, self.tokenizer, config, "eval data") if eval_data is not None else None

        collate = functools.partial(collate_pairs, pad_token_id=self.tokenizer.pad_token_id)
        self.order = SeededShuffle(len(train_pairs), config.seed)
        # a generator of its own: starting an epoch (or a resumed one) draws nothing from the global RNG
        train_loader = torch.utils.data.DataLoader(
            train_pairs, batch_size=config.batch_size, sampler=self.order, collate_fn=collate,
            generator=torch.Generator(),
        )
        # sizes: derived once, here; each process gets ceil(batches / processes) batches (accelerate's
        # even_batches), and accumulation ends with the data, so an epoch is steps_per_epoch steps
        batches_per_process = math.ceil(len(train_loader) / acc.num_processes)
        self.steps_per_epoch = math.ceil(batches_per_process / config.gradient_accumulation_steps)
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_train_epochs * self.steps_per_epoch))
        self.train_loader, = self.prepare_training(
            RewardScorer(model), config, self.total_steps, train_loader, trainable_only=config.use_peft
        )
        self.eval_loader = None
        if eval_pairs is not None:
            self.eval_loader = acc.prepare(torch.utils.data.DataLoader(
                eval_pairs, batch_size=config.eval_batch_size or config.batch_size, collate_fn=collate
            ))
        self.latest: dict = {}  # each metric's last value, returned by train()
        if acc.is_main_process:
            print(f"[reward] {len(train_pairs)} training pairs, {len(eval_pairs or [])} held-out pairs, "
                  f"{self.total_steps} optimizer steps on {acc.num_processes} process(es)")

    def train(self) -> dict:
        """Run the optimizer steps (from a checkpoint's when resuming), evaluate, save; returns the
        latest value of each metric."""
        config, acc = self.config, self.accelerator
        self.start(self.total_steps)
        sums, micro_batches = {}, 0
        self.model.train()
        while self.step < self.total_steps:
            epoch, steps_done = divmod(self.step, self.steps_per_epoch)
            self.order.epoch = epoch
            skip = steps_done * config.gradient_accumulation_steps  # batches a resumed run already trained on
            for batch in acc.skip_first_batches(self.train_loader, skip) if skip else self.train_loader:
                stats = self.train_micro_batch(batch)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                micro_batches += 1
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.step += 1
                self.bar.update(1)
                checkpoint_due = self.due(config.save_steps, at_end=True)
                row = {}
                # a checkpoint closes the logging window too, so a resumed run logs the rows an uninterrupted one does
                if self.due(config.logging_steps) or checkpoint_due:
                    row.update(self.global_mean({f"train/{k}": v / micro_batches for k, v in sums.items()}))
                    row["lr"] = self.scheduler.get_last_lr()[0]
                    sums, micro_batches = {}, 0
                if self.eval_loader is not None and self.due(config.eval_steps, at_end=True):
                    row.update(self.evaluate())
                if row:
                    row = {"step": self.step, **row}
                    self.latest.update(row)
                    self.log(row, metrics_line(row))
                if checkpoint_due:
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
        self.finish()
        return self.latest

    def train_micro_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss, backward and (at the last micro-batch of an accumulation) the clipped optimizer step."""
        config, acc = self.config, self.accelerator
        with acc.accumulate(self.model):
            chosen, rejected = self.model(batch["input_ids"], batch["attention_mask"]).float().chunk(2)
            margin = batch["margin"] if config.margin_column else None
            loss, stats = pairwise_loss(chosen, rejected, margin, config.center_coef)
            acc.backward(loss)
            if acc.sync_gradients and config.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            self.optimizer.step()  # a no-op until the last micro-batch of the accumulation
            self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), **stats}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Pairwise accuracy, mean margin and loss over every held-out pair, all processes together."""
        config, acc = self.config, self.accelerator
        self.model.eval()
        chosen_all, rejected_all, margin_all = [], [], []
        for batch in self.eval_loader:
            chosen, rejected = self.model(batch["input_ids"], batch["attention_mask"]).float().chunk(2)
            # gather_for_metrics drops the pairs repeated to even out the last batch across processes
            chosen, rejected, margin = acc.gather_for_metrics((chosen, rejected, batch["margin"]))
            chosen_all.append(chosen)
            rejected_all.append(rejected)
            margin_all.append(margin)
        self.model.train()
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

    # ---- what the run skeleton saves
    def write_model(self, directory: Path, state_dict: dict) -> None:
        """The sequence classifier (safetensors): full weights, a LoRA adapter (with the embeddings when
        an added pad token grew them), or with merge_adapter the merged full model."""
        model = self.accelerator.unwrap_model(self.model).model
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        if self.config.use_peft and self.config.merge_adapter:
            model.merge_and_unload().save_pretrained(directory)
        elif self.config.use_peft:
            model.save_pretrained(directory, state_dict=state_dict, save_embedding_layers=self.resized)
        else:
            model.save_pretrained(directory, state_dict=state_dict)

    def model_card(self, metrics: dict):
        from llm_rl.reporting.hub import reward_model_card

        return reward_model_card(self.config, metrics, self.config.hub_model_id or self.config.output_dir)

    def write_reports(self, metrics: dict) -> None:
        super().write_reports(metrics)
        (self.output_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")


def metrics_line(metrics: dict) -> str:
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def train_reward_model(config: RewardTrainingConfig) -> dict:
    """Train, evaluate and save a reward model; returns the final metrics (eval/accuracy, ...)."""
    return RewardTrainer(config).train()

