"""Prompts: load a dataset, render and tokenize each prompt once, deal batches to processes.

Prompts are tokenized once at load time; a batch is left-padded when it is drawn.
The order of prompts is a seeded permutation per pass, so a run is reproducible
and its data position is two integers (pass, offset).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch

from llm_rl.algorithms.ops import left_pad
from llm_rl.config.errors import ConfigError, UserError
from llm_rl.config.paths import missing_local_path
from llm_rl.config.sections import Config

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(UserError):
    """A dataset problem a user has to fix; the message names the dataset and the fix."""

    label = "data error"


def load_prompt_dataset(name: str, split: str = "train", config_name: Optional[str] = None):
    """A `datasets.Dataset` from a Hub id, a local folder, or a json/jsonl/csv/parquet file."""
    import datasets

    path = Path(name)
    problem = missing_local_path(name, data=True)
    if problem:
        raise DataError(problem)
    if path.suffix.lower() in LOCAL_FORMATS:
        return load_data_file(path)
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(path))
    return datasets.load_dataset(name, config_name, split=split)


def load_data_file(path: Path):
    """A json/jsonl/csv/parquet file as a Dataset; an empty or header-only file is a DataError naming it."""
    import datasets

    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes); it needs one row per prompt")
    no_rows = DataError(f"{path} has no rows (at most a header); it needs one row per prompt")
    try:
        dataset = datasets.load_dataset(LOCAL_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as e:  # datasets reports parse errors as several exception types
        if path.suffix.lower() != ".parquet":  # datasets says "no data" for blank lines or a header alone
            lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if len(lines) <= (1 if path.suffix.lower() == ".csv" else 0):
                raise no_rows from e
        reason = " ".join(str(e).split())[:300]
        raise DataError(f"{path} cannot be read as {path.suffix} ({type(e).__name__}: {reason})") from e
    if len(dataset) == 0:
        raise no_rows
    return dataset


CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: list, column: str, row: int) -> None:
    """Chat messages as chat templates read them: each a dict with 'role' (one of CHAT_ROLES) and 'content'.
    A misspelt role or key would otherwise render as an empty prompt and train on nothing."""
    where = f"row {row}: column '{column}'"
    if not messages:
        raise DataError(f"{where} is an empty list of chat messages; give at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where} message {i} is a {type(message).__name__}; each message is a dict with "
                            "'role' and 'content'")
        keys = sorted(k for k, v in message.items() if v is not None)  # datasets fills other rows' keys with None
        if "role" not in keys or "content" not in keys:
            raise DataError(f"{where} message {i} has keys {keys}; each message needs 'role' and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{where} message {i} has role {message['role']!r}; the roles are {', '.join(CHAT_ROLES)}")


def render_prompt(value, tokenizer, column: str, row: int) -> str:
    """A prompt string, or chat messages rendered with the tokenizer's chat template."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        check_messages(value, column, row)
        if tokenizer.chat_template is None:
            raise DataError(
                f"row {row}: column '{column}' holds chat messages but the tokenizer has no chat_template; "
                "set one on the tokenizer or give plain-text prompts"
            )
        return tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
    raise DataError(f"row {row}: column '{column}' must be a string or a list of chat messages, got {type(value)}")


class PromptData:
    """Tokenized prompts plus the other columns (passed to reward functions)."""

    def __init__(
        self,
        dataset,
        tokenizer,
        prompt_column: str = "prompt",
        max_prompt_length: int = 512,
        truncate: bool = False,
    ):
        columns = list(dataset.column_names)
        if prompt_column not in columns:
            raise DataError(
                f"dataset has no column '{prompt_column}' (columns: {columns}); "
                "set prompt_column to the column that holds the prompts"
            )
        self.texts: list[str] = []  # what the policy sees (decoded after truncation)
        self.messages: list[Optional[list]] = []  # chat prompts' messages, for reward models with a chat template
        self.ids: list[list[int]] = []
        for row, value in enumerate(dataset[prompt_column]):
            text = render_prompt(value, tokenizer, prompt_column, row)
            if not text.strip():
                raise DataError(f"row {row}: the prompt is empty; remove the row or fill it in")
            # chat templates already carry the special tokens they need
            ids = tokenizer(text, add_special_tokens=isinstance(value, str)).input_ids
            if len(ids) > max_prompt_length:
                if not truncate:
                    raise DataError(
                        f"row {row}: the prompt has {len(ids)} tokens, over max_prompt_length={max_prompt_length}; "
                        "raise max_prompt_length, shorten the prompt, or set truncate_prompts: true"
                    )
                ids = ids[-max_prompt_length:]  # keep the end: it is what the response continues
                # rewards judge the prompt the policy answered, not the one it never saw
                text, value = tokenizer.decode(ids, skip_special_tokens=False), None
            self.texts.append(text)
            self.messages.append(value if isinstance(value, list) else None)
            self.ids.append(ids)
        if not self.ids:
            raise DataError("the prompt dataset is empty")
        self.columns = {c: list(dataset[c]) for c in columns if c != prompt_column}
        self.pad_token_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int], device=None) -> dict:
        """Left-padded prompt ids and mask (batch, prompt_len), texts and the other columns."""
        prompt_ids, prompt_mask = left_pad([self.ids[i] for i in indices], self.pad_token_id)
        return {
            "prompt_ids": prompt_ids.to(device),
            "prompt_mask": prompt_mask.to(device),
            "prompts": [self.texts[i] for i in indices],
            "prompt_messages": [self.messages[i] for i in indices],
            "columns": {c: [values[i] for i in indices] for c, values in self.columns.items()},
        }


class EpisodeRows:
    """The rows of a multi-turn dataset: each is given whole (a dict of its columns) to an environment's
    reset(), which builds the first observation from it."""

    def __init__(self, dataset):
        self.rows = dataset.to_list()
        if not self.rows:
            raise DataError("the episode dataset is empty")
        self.columns = {c: [row[c] for row in self.rows] for c in dataset.column_names}

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: list[int], device=None) -> dict:
        return {"rows": [self.rows[i] for i in indices]}


class PromptSampler:
    """Deals `batch_size` prompt indices per process per update, pass after pass.

    Each pass is a permutation seeded by (seed, pass); the global batch of
    `batch_size * num_processes` prompts is split by rank, so ranks never share a
    prompt within an update. The position (pass, offset) is all that resume needs.
    """

    def __init__(self, num_prompts: int, batch_size: int, num_processes: int, rank: int, seed: int, shuffle: bool):
        self.global_batch = batch_size * num_processes
        if num_prompts < self.global_batch:
            raise DataError(
                f"{num_prompts} prompts are fewer than one update needs ({batch_size} per process x "
                f"{num_processes} processes); lower batch_size or add prompts"
            )
        self.num_prompts, self.batch_size, self.rank = num_prompts, batch_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.offset = 0, 0

    @property
    def updates_per_epoch(self) -> int:
        return self.num_prompts // self.global_batch  # the incomplete tail of a pass is dropped

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_prompts))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_prompts, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            order = self._order()
            while self.offset + self.global_batch <= self.num_prompts:
                start = self.offset + self.rank * self.batch_size
                self.offset += self.global_batch
                yield order[start : start + self.batch_size]
            self.epoch, self.offset = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def load_prompts(config: Config, tokenizer) -> PromptData | EpisodeRows:
    """The training prompts; with an environment, the dataset rows its episodes start from."""
    d = config.data
    if d.dataset_name is None:
        raise ConfigError("dataset_name is not set: give a Hub dataset id or a local .json/.jsonl/.csv/.parquet file")
    dataset = load_prompt_dataset(d.dataset_name, d.dataset_split, d.dataset_config)
    if config.environment.plays_episodes:
        return EpisodeRows(dataset)
    return PromptData(dataset, tokenizer, d.prompt_column, d.max_prompt_length, d.truncate_prompts)


def load_eval_prompts(config: Config, tokenizer) -> Optional[PromptData]:
    """The held-out prompts (`eval_dataset_name` / `eval_split`), or None when none are configured."""
    if config.eval_dataset is None:
        return None
    name, split = config.eval_dataset
    d = config.data
    dataset = load_prompt_dataset(name, split, d.dataset_config if name == d.dataset_name else None)
    if d.eval_max_prompts is not None and len(dataset) > d.eval_max_prompts:
        dataset = dataset.select(range(d.eval_max_prompts))
    return PromptData(dataset, tokenizer, d.prompt_column, d.max_prompt_length, d.truncate_prompts)
