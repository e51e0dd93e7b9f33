"""TODO docstring"""

from __future__ import annotations

import torch

from llm_rl.algorithms.ops import logprobs_from_logits
from llm_rl.models.value_head import CausalLMWithValueHead


def forward_logprobs(
    model: CausalLMWithValueHead,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    group_size: int = 1,
):
    """One forward over prompt + response: log-probs of the response tokens and the values.
    `response_mask` is the attention mask of the response region (every real token after the prompt).
    `group_size` > 1: rows come in consecutive groups of one prompt; it runs once per group
    (`CausalLMWithValueHead.forward`).

    Returns (logprobs (batch, resp_len), values (batch, resp_len) or None, logits).
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    logits, values = model(input_ids, attention_mask, response_start=prompt_ids.shape[1], group_size=group_size)
    logprobs = logprobs_from_logits(logits, response_ids, temperature)
    return logprobs, values, logits




