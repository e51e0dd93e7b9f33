"""Rewards: a reward model, reward functions, and the per-token rewards PPO optimises.

A reward is any callable `(prompts, completions, **columns) -> list[float]`, one
float per completion; `columns` are the other dataset columns of those prompts
(for example a reference answer). A reward model is wrapped into such a callable.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import torch

from llm_rl.modeling import DTYPES

RewardFn = Callable[..., Sequence[float]]


class RewardError(ValueError):
    """A reward returned something unusable; the message names the reward."""


def load_reward_function(spec: str) -> RewardFn:
    """'package.module:function' or 'path/to/file.py:function' -> the callable."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise RewardError(f"reward function {spec!r} must look like 'package.module:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise RewardError(f"reward function {spec!r}: file {path} not found")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"reward function {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RewardError(f"reward function {spec!r}: cannot import {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {module_name} has no callable {attr!r}")
    fn.__reward_name__ = spec
    return fn


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__reward_name__", getattr(fn, "__name__", type(fn).__name__))


class RewardModel:
    """A sequence classifier with one output that scores prompt + completion texts.

    It re-tokenizes the text with its own tokenizer (it may differ from the policy's)
    and reads the score at the last non-pad token.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, max_length: Optional[int] = None):
        if model.config.num_labels != 1:
            raise RewardError(f"reward model must have num_labels=1, got {model.config.num_labels}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.__reward_name__ = getattr(model.config, "_name_or_path", "reward_model")

    @classmethod
    def from_pretrained(cls, name_or_path: str, trust_remote_code: bool = False, torch_dtype: str = "float32", **kw):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, dtype=DTYPES[torch_dtype], trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, **kw)

    def to(self, device) -> RewardModel:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
        # right padding so the last non-pad token is the text's end; cut prompts, never completions
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            rows = slice(start, start + self.batch_size)
            texts = [p + c for p, c in zip(prompts[rows], completions[rows])]
            batch = self.tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(device)
            logits = self.model(**batch).logits  # (batch, 1), read at the last non-pad token
            scores.extend(logits[:, 0].float().tolist())
        return scores


def compute_scores(
    rewards: Sequence[RewardFn],
    weights: Optional[Sequence[float]],
    prompts: list[str],
    completions: list[str],
    columns: dict,
    skip_invalid: bool = False,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Weighted sum of every reward's scores.

    Returns (scores (batch,) float32, each reward's mean over valid rows, valid (batch,) bool).
    A reward that raises, returns the wrong count or a non-number, or a non-finite score, stops
    the run with a RewardError naming it; with `skip_invalid` the affected rows are marked
    invalid instead (all rows when the whole output is unusable) and score 0.
    """
    weights = weights if weights is not None else [1.0] * len(rewards)
    n = len(completions)
    total = torch.zeros(n, dtype=torch.float32)
    valid = torch.ones(n, dtype=torch.bool)
    per_reward = {}
    for fn, weight in zip(rewards, weights):
        name = reward_name(fn)
        try:
            try:
                out = fn(prompts, completions, **columns)
            except Exception as e:
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
            values = validate_scores(out, n, name, allow_nonfinite=skip_invalid)
        except RewardError as e:
            if not skip_invalid:
                raise
            warnings.warn(f"{e}; skipping all {n} samples of this batch", RuntimeWarning, stacklevel=2)
            values = torch.full((n,), float("nan"))
        finite = torch.isfinite(values)
        valid &= finite
        total += weight * torch.where(finite, values, torch.zeros_like(values))
        per_reward[name] = float(values[finite].mean()) if finite.any() else 0.0
    return total, per_reward, valid


def validate_scores(out, expected: int, name: str, allow_nonfinite: bool = False) -> torch.Tensor:
    """One finite float per completion, or RewardError naming the reward and the problem.

    `allow_nonfinite` lets NaN/inf through (the caller drops those rows)."""
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().tolist()
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name!r} must return one float per completion, got {type(out).__name__}") from e
    if len(values) != expected:
        raise RewardError(f"reward {name!r} returned {len(values)} scores for {expected} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad and not allow_nonfinite:
        raise RewardError(f"reward {name!r} returned non-finite scores (NaN/inf) at rows {bad[:10]}")
    return torch.tensor(values, dtype=torch.float32)


def shape_scores(
    scores: torch.Tensor,
    ended: torch.Tensor,
    scale: float = 1.0,
    clip: Optional[float] = None,
    missing_eos_penalty: Optional[float] = None,
) -> torch.Tensor:
    """Scale, clip, then penalise responses that never stopped: (batch,) -> (batch,)."""
    scores = scores * scale
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ended.bool()).float()
    return scores


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token rewards r_t = -beta * KL_t, plus the sequence score on the last response token.

    scores (batch,), kl (batch, resp_len), response_mask (batch, resp_len) -> (batch, resp_len).
    The last response token is the stop token when the response ended, never a pad
    position; a row with no response tokens gets no reward at all.
    """
    rewards = torch.where(response_mask.bool(), -beta * kl, torch.zeros_like(kl))
    lengths = response_mask.long().sum(dim=1)  # (batch,)
    has_tokens = lengths > 0
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows[has_tokens], last[has_tokens]] += scores.to(rewards.dtype)[has_tokens]
    return rewards
