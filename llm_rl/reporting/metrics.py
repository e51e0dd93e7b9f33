"""Metrics: scalars reduced over processes (every rank calls, every rank gets the same numbers),
the `metrics.jsonl` a run writes (one JSON object per update), and tables of sample completions
(`completions.jsonl` and the trackers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_metrics(path: str | Path) -> list[dict]:
    """Every row of a metrics.jsonl file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def reduce_scalars(accelerator, values: dict[str, torch.Tensor], reduction: str = "sum") -> dict[str, float]:
    """Sum (or mean) over processes of per-process scalars, in one collective for all of them.

    Every process must pass the same keys: a missing key on one rank would pair up different numbers.
    """
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k]).float().reshape(()) for k in keys]).to(accelerator.device)
    return dict(zip(keys, accelerator.reduce(stacked, reduction).tolist()))


def write_completions(path: str | Path, update: int, rows: list[dict]) -> None:
    """Append one JSON line per sample completion, each tagged with its update."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({"update": update, **row}) + "\n")


def log_table(accelerator, name: str, rows: list[dict], step: int) -> None:
    """Rows (dicts with the same keys) as a table in every tracker that can show one:
    a wandb Table, tensorboard text (a markdown table). Other trackers get nothing."""
    if not rows:
        return
    columns = list(rows[0])
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_table(name, columns=columns, data=[[row[c] for c in columns] for row in rows], step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_text(name, markdown_table(columns, rows), global_step=step)


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "⏎")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
