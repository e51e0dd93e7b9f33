"""The training forward: one pass of the policy over prompt + response gives the sampled tokens' log-probs
(at the sampling temperature), the values, and the entropy. The training forward and the no-grad ones
(old policy, reference: `llm_rl.sampling.rollout`) take this one path, chunked where the model allows it
(`CausalLMWithValueHead.forward`, the config's `chunked_logprobs`)."""

from __future__ import annotations

import torch

from llm_rl.models.value_head import CausalLMWithValueHead


def forward_logprobs(
    model: CausalLMWithValueHead,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    group_size: int = 1,
    entropy: bool = True,
    entropy_grad: bool = True,
):
    """One forward over prompt + response: log-probs of the response tokens, the values and the entropy.
    `response_mask` is the attention mask of the response region (every real token after the prompt).
    `group_size` > 1: rows come in consecutive groups of one prompt; it runs once per group
    (`CausalLMWithValueHead.forward`). `entropy=False`: no entropy (None); `entropy_grad=False`: the
    entropy is a value without a gradient (the entropy bonus is off).

    Returns (logprobs (batch, resp_len), values (batch, resp_len) or None, entropy (batch, resp_len) or None).
    `model` may be the accelerate-prepared policy (DDP, ...): the maths run inside its forward.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return model(input_ids, attention_mask, response_start=prompt_ids.shape[1], group_size=group_size,
                 tokens=response_ids, temperature=temperature, entropy=entropy, entropy_grad=entropy_grad)
