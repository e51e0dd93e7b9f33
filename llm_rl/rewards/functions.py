"""Reward functions: how they are called, and what they may return.

A reward is called as TRL's GRPOTrainer calls one, by keyword:

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns) -> list[float | None]

`columns` are the dataset's other columns of those prompts (a reference answer, say); completion_ids,
trainer_state and prompt_messages go only to a reward that names them or takes **kwargs. With chat data,
`prompts` are the prompts' message lists and each completion is `[{"role": "assistant", "content": text}]`;
with plain text both are strings. A None says "this reward does not apply to this completion".
A reward whose parameters are not named prompts / completions (llm_rl's first convention,
`fn(p, c, **columns)`) is called positionally. A reward model is wrapped into such a callable.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from llm_rl.algorithms.scores import Scores
from llm_rl.config.errors import UserError
from llm_rl.config.specs import import_from_spec

RewardFn = Callable[..., Sequence[float]]


class RewardError(UserError):
    """A reward returned something unusable; the message names the reward."""

    label = "reward error"


@dataclass(frozen=True)
class TrainerState:
    """What a reward sees as `trainer_state` (TRL passes transformers' TrainerState): the fields rewards read
    to schedule themselves, e.g. a format bonus that fades out."""

    global_step: int  # updates done before this rollout
    max_steps: int  # updates the run will do


def load_reward_function(spec: str) -> RewardFn:
    """'package.module:function' or 'path/to/file.py:function' -> the callable."""
    fn = import_from_spec(spec, "reward function", RewardError)
    fn.__reward_name__ = spec.rpartition(":")[2]  # metrics say reward/exact_match, not reward/path/to/file.py:exact_match
    return fn


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__reward_name__", getattr(fn, "__name__", type(fn).__name__))


def check_rewards(rewards: Sequence[RewardFn], columns: Sequence[str]) -> None:
    """Catch at load, before the first generation, what would otherwise fail after it: two rewards
    with one name (their metrics would collide), and a reward that cannot be called with this dataset's
    other columns."""
    names = [reward_name(fn) for fn in rewards]
    for name in names:
        if names.count(name) > 1:
            raise RewardError(f"two rewards are named {name!r} and would share the metric reward/{name}; "
                              "rename one of the functions")
    for fn in rewards:
        check_signature(fn, list(columns))


OPTIONAL_INPUTS = ("completion_ids", "trainer_state", "prompt_messages")  # given only to rewards that take them


def check_signature(fn: RewardFn, columns: list[str]) -> None:
    """Bind `fn`'s signature the way `call_reward` will call it; RewardError listing both if it fails."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no introspectable signature (some builtins): found when called
        return
    keywords = {**dict.fromkeys(columns, []), **{k: [] for k in OPTIONAL_INPUTS if k not in columns and accepts(fn, k)}}
    try:
        if called_positionally(fn):
            signature.bind([], [], **keywords)
        else:
            signature.bind(prompts=[], completions=[], **keywords)
    except TypeError as e:
        name = reward_name(fn)
        raise RewardError(
            f"reward {name!r} is called as {name}(prompts=..., completions=..., **columns) with the dataset's other "
            f"columns {columns}, but {e} (its parameters: {', '.join(signature.parameters)}); name the columns it "
            "needs and add **kwargs for the rest"
        ) from e


def called_positionally(fn: RewardFn) -> bool:
    """True for a reward written as fn(p, c, **columns): its first two parameters are positional and neither is
    named prompts or completions (or they are positional-only). Everything else is called by keyword."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    named = {p.name: p for p in params}
    if any(named[n].kind is inspect.Parameter.POSITIONAL_ONLY for n in ("prompts", "completions") if n in named):
        return True
    if "prompts" in named or "completions" in named:
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional for p in params) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def reward_inputs(prompts: list[str], completions: list[str], prompt_messages: Optional[list]) -> tuple[list, list]:
    """(prompts, completions) as TRL gives them: with chat data the prompts' messages and each completion as one
    assistant message; plain text as it is. A chat prompt cut to max_prompt_length stays its rendered text."""
    if not prompt_messages or all(m is None for m in prompt_messages):
        return prompts, completions
    return ([text if messages is None else messages for text, messages in zip(prompts, prompt_messages)],
            [[{"role": "assistant", "content": c}] for c in completions])


def call_reward(fn: RewardFn, prompts, completions, columns: dict, optional: dict):
    """One reward's raw output. A reward that reads rendered text (a reward model: `reads_text`) gets the text
    prompts and completions whatever the data; anything else gets `reward_inputs`' shapes."""
    if getattr(fn, "reads_text", False):
        shaped_prompts, shaped_completions = prompts, completions
    else:
        shaped_prompts, shaped_completions = reward_inputs(prompts, completions, optional.get("prompt_messages"))
    extra = {k: v for k, v in optional.items() if v is not None and k not in columns and accepts(fn, k)}
    try:
        if called_positionally(fn):
            return fn(shaped_prompts, shaped_completions, **columns, **extra)
        return fn(prompts=shaped_prompts, completions=shaped_completions, **columns, **extra)
    except Exception as e:
        raise RewardError(f"reward {reward_name(fn)!r} raised {type(e).__name__}: {e}") from e


def compute_rewards(
    rewards: Sequence[RewardFn],
    weights: Optional[Sequence[float]],
    prompts: list[str],
    completions: list[str],
    columns: dict,
    completion_ids: Optional[list[list[int]]] = None,
    skip_invalid: bool = False,
    prompt_messages: Optional[list] = None,
    trainer_state: Optional[TrainerState] = None,
) -> Scores:
    """Call every reward and combine their outputs with `weights`.

    A reward returns one float per completion (None where it does not apply: that completion's other rewards
    still count; one that no reward applies to is invalid), or (token-level) one list of floats per completion,
    as long as that completion's tokens (`completion_ids`, the stop token included), aligned to response
    positions. A reward that raises, returns the wrong count, length or type, or a non-finite value, stops the
    run with a RewardError naming it; with `skip_invalid` the affected rows are marked invalid instead (all rows
    when the whole output is unusable) and contribute 0.
    """
    weights = weights if weights is not None else [1.0] * len(rewards)
    optional = {"completion_ids": completion_ids, "trainer_state": trainer_state, "prompt_messages": prompt_messages}
    n = len(completions)
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else None
    resp_len = max(lengths, default=0) if lengths else 0
    scores = torch.zeros(n, dtype=torch.float32)
    token_scores = None
    valid, applies = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    means, rows = {}, {}
    for fn, weight in zip(rewards, weights):
        name = reward_name(fn)
        try:
            values, missing = validate_rewards(call_reward(fn, prompts, completions, columns, optional), n, name,
                                               lengths, allow_nonfinite=skip_invalid)
        except RewardError as e:
            if not skip_invalid:
                raise
            warnings.warn(f"{e}; skipping all {n} samples of this batch", RuntimeWarning, stacklevel=2)
            values, missing = torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool)
        if values.dim() == 1:
            finite = torch.isfinite(values)
            scores += weight * torch.where(finite, values, torch.zeros_like(values))
            per_row = values
        else:  # (batch, resp_len), NaN-padded past each completion's end
            values = torch.nn.functional.pad(values, (0, resp_len - values.shape[1]), value=float("nan"))
            in_range = torch.arange(resp_len)[None, :] < torch.tensor(lengths)[:, None]
            finite = (torch.isfinite(values) | ~in_range).all(dim=1) & ~missing
            clean = torch.where(in_range & torch.isfinite(values), values, torch.zeros_like(values))
            token_scores = weight * clean if token_scores is None else token_scores + weight * clean
            per_row = torch.where(finite, clean.sum(dim=1), torch.full((n,), float("nan")))
        valid &= finite | missing
        applies |= ~missing
        means[name] = float(per_row[finite].mean()) if finite.any() else 0.0
        rows[name] = per_row
    valid &= applies | (len(rewards) == 0)
    if rewards and not applies.all():
        warnings.warn(f"{int((~applies).sum())} of {n} completions got None from every reward: they are invalid "
                      "(score 0, no loss); make at least one reward return a number for each", RuntimeWarning,
                      stacklevel=2)
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


def as_number(value, name: str, row: int) -> float:
    """A reward's value for one completion as a float (None -> NaN, marked missing by the caller); a string or
    any other non-number is refused, so '1.0' is never taken for 1.0."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    raise RewardError(f"reward {name!r} returned row {row} = {value!r} of type {type(value).__name__}; return one "
                      "float (or None) per completion")


def validate_rewards(
    out, expected: int, name: str, lengths: Optional[list[int]] = None, allow_nonfinite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a reward's output: (batch,) floats, or per-token lists -> (batch, longest) NaN-padded; and the
    (batch,) mask of its None entries (the reward does not apply there; their values are NaN).

    Raises RewardError naming the reward and the problem; `allow_nonfinite` lets NaN/inf
    through (the caller drops those rows)."""
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward {name!r} must return a list with one float per completion (or one list per completion "
            f"for token-level rewards), got {type(out).__name__}")
    if len(out) != expected:
        raise RewardError(f"reward {name!r} returned {len(out)} scores for {expected} completions")
    missing = torch.tensor([v is None for v in out], dtype=torch.bool)
    token_level = [isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() == 1) for v in out]
    if any(token_level):
        if not all(t or v is None for t, v in zip(token_level, out)):
            raise RewardError(f"reward {name!r} mixes per-sequence floats and per-token lists")
        if lengths is None:
            raise RewardError(f"reward {name!r} returned per-token rewards where only sequence scores are supported")
        rows = [[] if v is None else [as_number(x, name, i) for x in (v.tolist() if isinstance(v, torch.Tensor) else v)]
                for i, v in enumerate(out)]
        for i, (row, length) in enumerate(zip(rows, lengths)):
            if len(row) != length and not missing[i]:
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
        values = torch.tensor([math.nan if v is None else as_number(v, name, i) for i, v in enumerate(out)],
                              dtype=torch.float32)
        bad = [i for i, v in enumerate(values.tolist()) if not math.isfinite(v) and not missing[i]]
    if bad and not allow_nonfinite:
        raise RewardError(f"reward {name!r} returned non-finite values (NaN/inf) at rows {bad[:10]}")
    return values, missing
