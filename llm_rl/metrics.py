"""Scalars reduced over processes: every rank calls, every rank gets the same numbers."""

from __future__ import annotations

import torch


def reduce_scalars(accelerator, values: dict[str, torch.Tensor], reduction: str = "sum") -> dict[str, float]:
    """Sum (or mean) over processes of per-process scalars, in one collective for all of them.

    Every process must pass the same keys: a missing key on one rank would pair up different numbers.
    """
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k]).float().reshape(()) for k in keys]).to(accelerator.device)
    return dict(zip(keys, accelerator.reduce(stacked, reduction).tolist()))
