"""Metrics: scalars reduced over processes (every rank calls, every rank gets the same numbers),
and the `metrics.jsonl` a run writes, one JSON object per update."""

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
