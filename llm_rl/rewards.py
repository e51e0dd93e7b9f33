"""Rewards: a reward model, reward functions, and the per-token rewards PPO optimises.

A reward is any callable `(prompts, completions, **columns) -> list[float]`, one
float per completion; `columns` are the other dataset columns of those prompts
(for example a reference answer). A reward model is wrapped into such a callable.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from llm_rl.config import UserError
from llm_rl.modeling import DTYPES, fuse_tanh_gelu

RewardFn = Callable[..., Sequence[float]]


class RewardError(UserError):
    """A reward returned something unusable; the message names the reward."""

    label = "reward error"


def import_from_spec(spec: str, what: str, error: type[Exception] = RewardError):
    """'package.module:name' or 'path/to/file.py:name' -> the object; `what` names it in errors
    ("reward function", "environment")."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise error(f"{what} {spec!r} must look like 'package.module:name' (module:function, module:Class) or "
                    "'path/to/file.py:name'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise error(f"{what} {spec!r}: file {path} not found")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise error(f"{what} {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise error(f"{what} {spec!r}: cannot import {module_name!r}: {e}") from e
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise error(f"{what} {spec!r}: {module_name} has no callable {attr!r}")
    return obj


def load_reward_function(spec: str) -> RewardFn:
    """'package.module:function' or 'path/to/file.py:function' -> the callable."""
    fn = import_from_spec(spec, "reward function")
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


def uses_last_token_head(model) -> bool:
    """Decoder classifiers (GPT-2, Llama, Qwen, ...) score the last token with a linear `score` head."""
    return (
        type(model).__name__.endswith("ForSequenceClassification")
        and isinstance(getattr(model, "score", None), torch.nn.Module)
        and not getattr(model.config, "is_encoder_decoder", False)
    )


def head_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (batch, len, hidden) of a decoder classifier, positions counted over real tokens."""
    from llm_rl.modeling import position_ids_from_mask

    backbone = getattr(model, model.base_model_prefix)
    return backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One score per text: (batch, len) ids and 0/1 mask -> (batch,) float scores.

    For decoder classifiers the score is read at each row's last real token, found from
    the attention mask (never from pad ids, so a pad equal to EOS is harmless): left and
    right padding give the same scores. Other models (encoders: a [CLS] pooler) run their
    own forward; pad them on the right.
    """
    from llm_rl.modeling import unwrap_transformers_model

    inner = unwrap_transformers_model(model)
    if not uses_last_token_head(inner):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    hidden = head_states(inner, input_ids, attention_mask)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.long()).argmax(dim=1)  # (batch,) rightmost real token
    return inner.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])[:, 0]


def head_name(model) -> str:
    """The classification head's attribute: `score` on decoder classifiers, `classifier` on encoders."""
    return "score" if uses_last_token_head(model) else "classifier"


def adapter_weight_names(folder: str) -> list[str]:
    from safetensors import safe_open

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise RewardError(f"{folder} holds adapter_config.json but no adapter_model.safetensors")
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def untrained_head_error(name_or_path: str, missing: list[str]) -> RewardError:
    """A checkpoint without trained reward weights would score with a random head: noise."""
    shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
    return RewardError(
        f"{name_or_path} is not a trained reward model: it has no weights for {shown}, so they would be random "
        "and every score noise. A causal LM or base model has no score head; train one with "
        "`llm-rl reward train --model_name_or_path <model> --dataset_name <pairs>` and point "
        "reward_model_name_or_path at its output_dir."
    )


class RewardModel:
    """A sequence classifier with one output as a reward function: score(prompt + completion).

    It re-tokenizes the text with its own tokenizer (it may differ from the policy's), right-pads,
    cuts from the left to `max_length` (prompts lose tokens, completions never), and reads the
    score at the last real token (`sequence_scores`), whatever the pad token is.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, max_length: Optional[int] = None):
        if model.config.num_labels != 1:
            raise RewardError(f"a reward model needs one output (num_labels=1), this one has {model.config.num_labels}")
        if tokenizer.pad_token is None:
            # pooling reads the attention mask, so any existing token can stand in for padding
            fill = tokenizer.eos_token or tokenizer.unk_token
            if fill is None:
                raise RewardError("the tokenizer has no pad, eos or unk token to pad batches with; set pad_token")
            tokenizer.pad_token = fill
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
        fuse_tanh_gelu(model)  # the same function in one kernel (GPT-2-style models)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.__reward_name__ = Path(getattr(model.config, "_name_or_path", None) or "reward_model").name

    @classmethod
    def from_pretrained(cls, name_or_path: str, trust_remote_code: bool = False, torch_dtype: str = "float32",
                        **kwargs) -> RewardModel:
        """A saved reward model: full weights, or a LoRA adapter folder (merged on load)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        load = {"dtype": DTYPES[torch_dtype], "trust_remote_code": trust_remote_code}
        if (Path(name_or_path) / "adapter_config.json").is_file():
            from peft import AutoPeftModelForSequenceClassification

            # the base is a plain LM: give it the single output before the adapter loads
            model = AutoPeftModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, **load)
            head = head_name(model.get_base_model())
            if not any(f".{head}." in key for key in adapter_weight_names(name_or_path)):
                raise untrained_head_error(name_or_path, [f"{head}.weight"])
            model = model.merge_and_unload()
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, num_labels=1, output_loading_info=True, **load
            )
            if info["missing_keys"]:
                raise untrained_head_error(name_or_path, sorted(info["missing_keys"]))
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, **kwargs)

    def to(self, device) -> RewardModel:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], prompt_messages: Optional[Sequence] = None, **_
    ) -> list[float]:
        """Scores of prompt + completion, tokenized exactly as reward-model training tokenizes a pair
        (`reward_model_text`): chat prompts through this tokenizer's chat template when it has one."""
        device = next(self.model.parameters()).device
        encoded = []
        for prompt, completion, messages in zip(prompts, completions, prompt_messages or [None] * len(prompts)):
            if messages is not None and self.tokenizer.chat_template:
                prompt, completion = messages, [{"role": "assistant", "content": completion}]
            text, special_tokens = reward_model_text(self.tokenizer, prompt, completion)
            encoded.append(self.tokenizer(text, add_special_tokens=special_tokens).input_ids)
        if self.max_length is not None:
            encoded = [ids[-self.max_length :] for ids in encoded]  # prompts lose tokens, completions never
        scores = []
        for start in range(0, len(encoded), self.batch_size):
            rows = encoded[start : start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(device)
            scores.extend(sequence_scores(self.model, batch["input_ids"], batch["attention_mask"]).float().tolist())
        return scores


def reward_model_text(tokenizer, prompt, completion) -> tuple[str, bool]:
    """(text, add_special_tokens) for a prompt + completion as a reward model reads it; one rule for
    reward-model training and for scoring in PPO, so a reward model scores what it was trained on.

    Chat messages (prompt and completion both lists of {"role", "content"}) go through the chat
    template, which writes its own special tokens. Plain text gets the tokenizer's special tokens
    (BOS ...) once: not again when the text already starts with BOS (a prompt rendered by a chat template).
    """
    if isinstance(completion, list):
        return tokenizer.apply_chat_template((prompt or []) + completion, tokenize=False), False
    text = (prompt or "") + completion
    bos = tokenizer.bos_token
    return text, not (bos and text.startswith(bos))


@dataclass
class RewardResult:
    scores: torch.Tensor  # (batch,) weighted sum of the sequence-level rewards
    token_scores: Optional[torch.Tensor]  # (batch, resp_len) weighted sum of the token-level rewards, or None
    valid: torch.Tensor  # (batch,) bool: every reward gave a usable value for this row
    means: dict  # reward name -> mean over valid rows (per sequence; token rewards summed per sequence)
    rows: dict = field(default_factory=dict)  # reward name -> (batch,) its value per row (NaN where unusable)


@dataclass(frozen=True)
class Scores:
    """What the rewards said about a rollout, in score units, ready for the update (phase 2's output).

    "Score" is what a reward gives; "reward" (`targets.Targets.token_rewards`) is what the estimator sees."""

    sequence: torch.Tensor  # (batch,) each completion's score: weighted, scaled, clipped, missing-EOS penalised
    tokens: Optional[torch.Tensor]  # (batch, resp_len) token-level scores (reward functions', environment's turns)
    valid: torch.Tensor  # (batch,) bool: every reward gave a usable value; other rows get no loss
    per_reward: dict  # reward name -> (batch,) its value per row (NaN where unusable), for the completions log
    means: dict  # reward name -> mean over the valid rows
    prefix: Optional[tuple] = None  # prefix_diff: ((batch, resp_len) Q_t, (batch,) Q_{-1}) in score units


@torch.no_grad()
def prefix_scores(
    reward_model: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score of every prefix in one forward: a decoder classifier's head applied at each position.

    input_ids, attention_mask: (batch, prompt_len + resp_len), left-padded prompt then response,
    in the reward model's own vocabulary (it must share the policy's tokenizer).
    Returns (prompt_score (batch,) = Q_{-1}, prefix_scores (batch, resp_len) with
    Q_t = score(prompt + response[:t+1])).
    """
    model = reward_model.model
    if not uses_last_token_head(model):
        raise RewardError(
            f"prefix scores need a decoder reward model with a `score` head; {type(model).__name__} has none"
        )
    hidden = head_states(model, input_ids, attention_mask)
    scores = model.score(hidden[:, response_start - 1 :]).squeeze(-1).float()  # (batch, 1 + resp_len)
    return scores[:, 0], scores[:, 1:]


def compute_rewards(
    rewards: Sequence[RewardFn],
    weights: Optional[Sequence[float]],
    prompts: list[str],
    completions: list[str],
    columns: dict,
    completion_ids: Optional[list[list[int]]] = None,
    skip_invalid: bool = False,
    prompt_messages: Optional[list] = None,
) -> RewardResult:
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
    return RewardResult(scores * valid, token_scores, valid, means, rows)


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


def kl_rewards(kl: torch.Tensor, response_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """KL as a reward: r_t = -beta * KL_t on response tokens, 0 elsewhere. (batch, resp_len) -> same."""
    return torch.where(response_mask.bool(), -beta * kl, torch.zeros_like(kl))


def place_scores(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Each sequence score on its last response token: (batch,), (batch, resp_len) -> (batch, resp_len).

    The last response token is the stop token when the response ended, never a pad position; a row
    with no response tokens gets nothing."""
    placed = torch.zeros(response_mask.shape, dtype=scores.dtype, device=scores.device)
    lengths = response_mask.long().sum(dim=1)  # (batch,)
    has_tokens = lengths > 0
    rows = torch.arange(placed.shape[0], device=placed.device)
    placed[rows[has_tokens], lengths[has_tokens] - 1] = scores[has_tokens]
    return placed


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token rewards r_t = -beta * KL_t, plus the sequence score on the last response token.

    scores (batch,), kl (batch, resp_len), response_mask (batch, resp_len) -> (batch, resp_len).
    """
    return kl_rewards(kl, response_mask, beta) + place_scores(scores.to(kl.dtype), response_mask)
