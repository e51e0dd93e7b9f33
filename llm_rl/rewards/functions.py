"""Rewards: a reward model, reward functions, and the per-token rewards PPO optimises.

A reward is any callable `(prompts, completions, **columns) -> list[float]`, one
float per completion; `columns` are the other dataset columns of those prompts
(for example a reference answer). A reward model is wrapped into such a callable.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from llm_rl.algorithms.scores import Scores
from llm_rl.config.errors import UserError
from llm_rl.config.specs import import_from_spec

RewardFn = Callable[..., Sequence[float]]


class RewardError(UserError):
    """A reward returned something unusable; the message names the reward."""

    label = "reward error"


def load_reward_function(spec: str) -> RewardFn:
    """'package.module:function' or 'path/to/file.py:function' -> the callable."""
    fn = import_from_spec(spec, "reward function", RewardError)
    fn.__reward_name__ = spec.rpartition(":")[2]  # metrics say reward/exact_match, not reward/path/to/file.py:exact_match
    return fn


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__reward_name__", getattr(fn, "__name__", type(fn).__name__))


def check_rewards(rewards: Sequence[RewardFn], columns: Sequence[str]) -> None:
    """Catch at load, before the first generation, what would otherwise fail after it: two rewards
    with one name (their metrics would collide), and a reward that cannot be called as
    `fn(prompts, completions, **columns)` with this dataset's other columns."""
    names = [reward_name(fn) for fn in rewards]
    for name in names:
        if names.count(name) > 1:
            raise RewardError(f"two rewards are named {name!r} and would share the metric reward/{name}; "
                              "rename one of the functions")
    for fn in rewards:
        check_signature(fn, list(columns))


def check_signature(fn: RewardFn, columns: list[str]) -> None:
    """Bind `fn`'s signature to (prompts, completions, **columns); RewardError listing both if it fails."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no introspectable signature (some builtins): found when called
        return
    keywords = dict.fromkeys(columns, [])
    for optional in ("completion_ids", "prompt_messages"):  # what compute_rewards adds for rewards that take it
        if optional not in keywords and accepts(fn, optional):
            keywords[optional] = []
    try:
        signature.bind([], [], **keywords)
    except TypeError as e:
        name = reward_name(fn)
        raise RewardError(
            f"reward {name!r} is called as {name}(prompts, completions, **columns) with the dataset's other columns "
            f"{columns}, but {e} (its parameters: {', '.join(signature.parameters)}); name the columns it needs "
            "and add **kwargs for the rest"
        ) from e


def compute_rewards(
    rewards: Sequence[RewardFn],
    weights: Optional[Sequence[float]],
    prompts: list[str],
    completions: list[str],
    columns: dict,
    completion_ids: Optional[list[list[int]]] = None,
    skip_invalid: bool = False,
    prompt_messages: Optional[list] = None,
) -> Scores:
    """Call every reward and combine their outputs with `weights`.

    A reward returns one float per completion, or (token-level) one list of floats per
    completion, as long as that completion's tokens (`completion_ids`, the stop token
    included), aligned to response positions. A reward that raises, returns the wrong
    count, length or type, or a non-finite value, stops the run with a RewardError naming
    it; with `skip_invalid` the affected rows are marked invalid instead (all rows when the
    whole output is unusable) and contribute 0.
    """
    weights = weights if weights is not None else [1.0] * len(rewards)
    optional = {"completion_ids": completion_ids, "prompt_messages": prompt_messages}  # for rewards that take them
    n = len(completions)
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else None
    resp_len = max(lengths, default=0) if lengths else 0
    scores = torch.zeros(n, dtype=torch.float32)
    token_scores = None
    valid = torch.ones(n, dtype=torch.bool)
    means, rows = {}, {}
    for fn, weight in zip(rewards, weights):
        name = reward_name(fn)
        extra = {k: v for k, v in optional.items() if v is not None and accepts(fn, k)}
        try:
            try:
                out = fn(prompts, completions, **columns, **extra)
            except Exception as e:
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
            values = validate_rewards(out, n, name, lengths, allow_nonfinite=skip_invalid)
        except RewardError as e:
            if not skip_invalid:
                raise
            warnings.warn(f"{e}; skipping all {n} samples of this batch", RuntimeWarning, stacklevel=2)
            values = torch.full((n,), float("nan"))
        if values.dim() == 1:
            finite = torch.isfinite(values)
            scores += weight * torch.where(finite, values, torch.zeros_like(values))
            per_row = values
        else:  # (batch, resp_len), NaN-padded past each completion's end
            values = torch.nn.functional.pad(values, (0, resp_len - values.shape[1]), value=float("nan"))
            in_range = torch.arange(resp_len)[None, :] < torch.tensor(lengths)[:, None]
            finite = (torch.isfinite(values) | ~in_range).all(dim=1)
            clean = torch.where(in_range & torch.isfinite(values), values, torch.zeros_like(values))
            token_scores = weight * clean if token_scores is None else token_scores + weight * clean
            per_row = torch.where(finite, clean.sum(dim=1), torch.full((n,), float("nan")))
        valid &= finite
        means[name] = float(per_row[finite].mean()) if finite.any() else 0.0
        rows[name] = per_row
    if token_scores is not None:
        token_scores = token_scores * valid[:, None]
    return Scores(sequence=scores * valid, tokens=token_scores, valid=valid, per_reward=rows, means=means)


def accepts(fn, keyword: str) -> bool:
    """Whether `fn` takes `keyword` (by name or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == keyword for p in params)


def validate_rewards(
    out, expected: int, name: str, lengths: Optional[list[int]] = None, allow_nonfinite: bool = False
) -> torch.Tensor:
    """Check a reward's output: (batch,) floats, or per-token lists -> (batch, longest) NaN-padded.

    Raises RewardError naming the reward and the problem; `allow_nonfinite` lets NaN/inf
    through (the caller drops those rows)."""
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward {name!r} must return a list with one float per completion (or one list per completion "
            f"for token-level rewards), got {type(out).__name__}")
    if len(out) != expected:
        raise RewardError(f"reward {name!r} returned {len(out)} scores for {expected} completions")
    token_level = [isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() == 1) for v in out]
    if any(token_level):
        if not all(token_level):
            raise RewardError(f"reward {name!r} mixes per-sequence floats and per-token lists")
        if lengths is None:
            raise RewardError(f"reward {name!r} returned per-token rewards where only sequence scores are supported")
        rows = [[float(x) for x in (v.tolist() if isinstance(v, torch.Tensor) else v)] for v in out]
        for i, (row, length) in enumerate(zip(rows, lengths)):
            if len(row) != length:
                raise RewardError(
                    f"reward {name!r}: row {i} has {len(row)} token rewards for a response of {length} tokens "
                    "(one per token of completion_ids, the stop token included)"
                )
        longest = max(lengths, default=0)
        values = torch.full((expected, longest), float("nan"))
        for i, row in enumerate(rows):
            values[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        bad = [i for i, row in enumerate(rows) if not all(math.isfinite(x) for x in row)]
    else:
        try:
            values = torch.tensor([float(v) for v in out], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {name!r} must return one float per completion: {e}") from e
        bad = [i for i, v in enumerate(values.tolist()) if not math.isfinite(v)]
    if bad and not allow_nonfinite:
        raise RewardError(f"reward {name!r} returned non-finite values (NaN/inf) at rows {bad[:10]}")
    return values


