"""A reward model: a sequence classifier with one output, read at the last real token of prompt + completion.

`RewardModel` wraps it as a reward function (its own tokenizer, the same text rule as reward-model
training, `reward_model_text`); `prefix_scores` reads its head at every response position (prefix_diff).
A checkpoint without trained head weights is refused (`untrained_head_error`): it would score noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from llm_rl.models.value_head import DTYPES, fuse_tanh_gelu
from llm_rl.rewards.functions import RewardError


def uses_last_token_head(model) -> bool:
    """Decoder classifiers (GPT-2, Llama, Qwen, ...) score the last token with a linear `score` head."""
    return (
        type(model).__name__.endswith("ForSequenceClassification")
        and isinstance(getattr(model, "score", None), torch.nn.Module)
        and not getattr(model.config, "is_encoder_decoder", False)
    )


def head_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (batch, len, hidden) of a decoder classifier, positions counted over real tokens."""
    from llm_rl.models.value_head import position_ids_from_mask

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
    from llm_rl.models.value_head import unwrap_transformers_model

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

    reads_text = True  # compute_rewards gives it the rendered prompt texts and completion strings (and prompt_messages)

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
