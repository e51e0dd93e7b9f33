"""Score prompt + completion rows with a reward model or a reward function, streaming.

    llm-rl reward score --model PATH_OR_ID --input FILE.jsonl --output OUT.jsonl [--summary SUMMARY.json]
    llm-rl reward score --reward package.module:function --input FILE.jsonl --output OUT.jsonl
    llm-rl reward score --model PATH_OR_ID --dataset NAME [--dataset_split test] --output OUT.jsonl

Every output line is the input row plus `score`, in input order. The input is read one
line at a time and scored `batch_size` rows at a time, so memory does not grow with the
file: only the rows of one batch and a bounded sample of scores (for the quantiles) are
held. A malformed line (not JSON, not an object, a missing or non-string prompt or
completion) stops the run with FILE:LINE, or with `--skip_bad_lines` is left out of the
output and counted; a skipped line never shifts another row's score.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch and the reward model are imported once the arguments parse: `--help` answers at once
    from llm_rl.rewards.functions import RewardFn

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MAX_SKIP_MESSAGES = 10


class ScoreInputError(ValueError):
    """A row that cannot be scored; the message says where (file:line) and what is wrong."""


@dataclass
class Record:
    """One input row and where it came from ("data.jsonl:12" or "dataset 'x' row 11")."""

    location: str
    row: dict


# ====================================================================== reading
def row_problem(row, prompt_column: str, completion_column: str) -> Optional[str]:
    """Why a parsed row cannot be scored, or None when it can."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for column in (prompt_column, completion_column):
        if column not in row:
            return f"no '{column}' field (fields: {sorted(row)})"
        if not isinstance(row[column], str):
            return f"'{column}' must be a string, got {type(row[column]).__name__}"
    return None


def read_jsonl(
    path: str | Path,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    skip_bad_lines: bool = False,
    on_skip: Optional[Callable[[str, str], None]] = None,
    on_bytes: Optional[Callable[[int], None]] = None,
) -> Iterator[Record]:
    """Records of a JSONL file, one line at a time (blank lines are ignored).

    A bad line raises ScoreInputError naming path:line, or with `skip_bad_lines` is
    passed to `on_skip(location, reason)` and left out. `on_bytes(n)` follows progress.
    """
    with open(path, "rb") as f:  # bytes: exact progress, and a bad encoding is one bad line
        for number, raw in enumerate(f, start=1):
            if on_bytes is not None:
                on_bytes(len(raw))
            location = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                row = json.loads(text)
                problem = row_problem(row, prompt_column, completion_column)
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            if problem is None:
                yield Record(location, row)
            elif skip_bad_lines:
                if on_skip is not None:
                    on_skip(location, problem)
            else:
                raise ScoreInputError(f"{location}: {problem}; fix the line or pass --skip_bad_lines")


def read_dataset(
    name: str,
    split: str = "train",
    config_name: Optional[str] = None,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    skip_bad_lines: bool = False,
    on_skip: Optional[Callable[[str, str], None]] = None,
) -> Iterator[Record]:
    """Records of a `datasets` dataset (Hub id, local folder or data file), streamed when it can be."""
    import datasets

    from llm_rl.data.prompts import LOCAL_FORMATS

    path = Path(name)
    if path.suffix.lower() in LOCAL_FORMATS:
        dataset = datasets.load_dataset(LOCAL_FORMATS[path.suffix.lower()], data_files=str(path), split="train",
                                        streaming=True)
    elif path.is_dir() and (path / "dataset_info.json").is_file():
        dataset = datasets.load_from_disk(str(path))  # memory-mapped Arrow: rows are read on demand
    else:
        dataset = datasets.load_dataset(name, config_name, split=split, streaming=True)
    for index, row in enumerate(dataset):
        location = f"dataset {name!r} row {index}"
        problem = row_problem(row, prompt_column, completion_column)
        if problem is None:
            yield Record(location, dict(row))
        elif skip_bad_lines:
            if on_skip is not None:
                on_skip(location, problem)
        else:
            raise ScoreInputError(f"{location}: {problem}; fix the row or pass --skip_bad_lines")


def batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    """Lists of up to `size` records, pulled from the iterator only as each batch is needed."""
    iterator = iter(records)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# ====================================================================== scoring
def score_records(
    records: Iterable[Record],
    reward: RewardFn,
    batch_size: int = 32,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    score_column: str = "score",
) -> Iterator[dict]:
    """Each input row plus its score, in input order, scoring `batch_size` rows per reward call.

    The reward gets (prompts, completions, **columns) like in PPO; `columns` are the other
    fields that every row of the batch has (e.g. a reference answer).
    """
    from llm_rl.rewards.functions import RewardError, compute_rewards

    for batch in batched(records, batch_size):
        rows = [record.row for record in batch]
        shared = set(rows[0]).intersection(*rows[1:]) - {prompt_column, completion_column, score_column}
        columns = {key: [row[key] for row in rows] for key in sorted(shared)}
        try:
            scores = compute_rewards(
                [reward], None, [row[prompt_column] for row in rows], [row[completion_column] for row in rows],
                columns,
            ).sequence
        except RewardError as e:
            where = batch[0].location if len(batch) == 1 else f"{batch[0].location} to {batch[-1].location}"
            raise RewardError(f"scoring {where}: {e}") from e
        for row, score in zip(rows, scores.tolist(), strict=True):
            yield {**row, score_column: score}


# ====================================================================== summary
@dataclass
class ScoreSummary:
    """Count, mean, std, min, max (exact, streaming) and quantiles of every score added.

    Quantiles are exact up to `sample_size` scores, then taken from a uniform reservoir
    sample of that size (Vitter's algorithm R), so memory stays bounded on any input.
    """

    sample_size: int = 1_000_000
    seed: int = 0
    count: int = 0
    skipped: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the running mean (Welford)
    low: float = math.inf
    high: float = -math.inf
    sample: list[float] = field(default_factory=list)

    def __post_init__(self):
        self._rng = random.Random(self.seed)

    def add(self, score: float) -> None:
        self.count += 1
        delta = score - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (score - self.mean)
        self.low, self.high = min(self.low, score), max(self.high, score)
        if len(self.sample) < self.sample_size:
            self.sample.append(score)
        else:
            slot = self._rng.randrange(self.count)
            if slot < self.sample_size:
                self.sample[slot] = score

    def as_dict(self) -> dict:
        out = {"count": self.count, "skipped": self.skipped}
        if self.count == 0:
            return out
        ordered = sorted(self.sample)
        out.update(mean=self.mean, std=math.sqrt(self.m2 / self.count), min=self.low)
        out.update({f"p{round(q * 100)}": quantile(ordered, q) for q in QUANTILES})
        out.update(max=self.high, quantiles_exact=self.count <= self.sample_size)
        return out


def quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the two nearest ranks (numpy's default)."""
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def format_summary(summary: dict) -> str:
    lines = [f"scored {summary['count']} rows, skipped {summary['skipped']}"]
    if summary["count"]:
        keys = ["mean", "std", "min", *(f"p{round(q * 100)}" for q in QUANTILES), "max"]
        lines.append("  ".join(f"{k} {summary[k]:.4g}" for k in keys))
        if not summary["quantiles_exact"]:
            lines.append("(quantiles from a uniform sample of the scores)")
    return "\n".join(lines)


# ====================================================================== the command
def write_scores(rows: Iterable[dict], output: str | Path, summary: ScoreSummary, score_column: str = "score") -> None:
    """Write rows as JSONL to `output` (through a temporary file, renamed once complete)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for row in rows:
                summary.add(row[score_column])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-rl reward score",
        description="Add a `score` to every prompt + completion row, with a reward model or a reward function.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="reward model: a Hub id or a local folder (sequence classifier, one output)")
    source.add_argument("--reward", help="reward function 'package.module:function' or 'file.py:function'")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--input", help="JSONL file of rows with prompt and completion fields")
    data.add_argument("--dataset", help="a datasets dataset: Hub id, saved folder or data file")
    parser.add_argument("--dataset_split", default="train", help="split of --dataset (default: train)")
    parser.add_argument("--dataset_config", default=None, help="configuration name of --dataset on the Hub")
    parser.add_argument("--output", required=True, help="JSONL file to write: each row plus its score")
    parser.add_argument("--summary", default=None, help="also write the summary statistics to this JSON file")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per reward call (default: 32)")
    parser.add_argument("--max_length", type=int, default=None, help="cut longer texts from the left (model only)")
    parser.add_argument("--prompt_column", default="prompt")
    parser.add_argument("--completion_column", default="completion")
    parser.add_argument("--score_column", default="score", help="name of the added field (default: score)")
    parser.add_argument("--skip_bad_lines", action="store_true", help="skip and count malformed rows instead of failing")
    parser.add_argument("--device", default=None, help="device for --model (default: cuda if available, else cpu)")
    parser.add_argument("--torch_dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--trust_remote_code", action="store_true", help="run model code from the Hub")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Score everything `args` names; returns the summary dict."""
    import torch
    from tqdm.auto import tqdm

    from llm_rl.rewards.functions import load_reward_function
    from llm_rl.rewards.model import RewardModel

    if args.batch_size < 1:
        raise ScoreInputError("--batch_size must be >= 1")
    if args.input is not None and not Path(args.input).is_file():
        raise ScoreInputError(f"input file not found: {args.input}")
    if args.model is not None:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        reward = RewardModel.from_pretrained(args.model, trust_remote_code=args.trust_remote_code,
                                             torch_dtype=args.torch_dtype, max_length=args.max_length).to(device)
    else:
        reward = load_reward_function(args.reward)

    summary = ScoreSummary()

    def on_skip(location: str, reason: str) -> None:
        summary.skipped += 1
        if summary.skipped <= MAX_SKIP_MESSAGES:
            bar.write(f"skipping {location}: {reason}", file=sys.stderr)
        if summary.skipped == MAX_SKIP_MESSAGES:
            bar.write("(further skipped lines are counted, not shown)", file=sys.stderr)

    columns = {"prompt_column": args.prompt_column, "completion_column": args.completion_column}
    if args.input is not None:
        bar = tqdm(total=os.path.getsize(args.input), unit="B", unit_scale=True, desc="score",
                   disable=args.no_progress, dynamic_ncols=True)
        records = read_jsonl(args.input, skip_bad_lines=args.skip_bad_lines, on_skip=on_skip, on_bytes=bar.update,
                             **columns)
    else:
        bar = tqdm(unit=" rows", desc="score", disable=args.no_progress, dynamic_ncols=True)
        records = read_dataset(args.dataset, args.dataset_split, args.dataset_config,
                               skip_bad_lines=args.skip_bad_lines, on_skip=on_skip, **columns)

        def counted(records):
            for record in records:
                bar.update(1)
                yield record

        records = counted(records)
    rows = score_records(records, reward, args.batch_size, score_column=args.score_column, **columns)
    write_scores(rows, args.output, summary, args.score_column)
    bar.close()
    result = summary.as_dict()
    print(format_summary(result))
    print(f"wrote {args.output}")
    if args.summary is not None:
        Path(args.summary).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from llm_rl.rewards.functions import RewardError

    try:
        run(args)
    except (ScoreInputError, RewardError) as e:
        print(f"llm-rl reward score: error: {e}", file=sys.stderr)
        return 2
    return 0
