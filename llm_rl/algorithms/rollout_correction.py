"""Correcting for a rollout engine that samples from a slightly different distribution than the trainer computes.

An engine with its own kernels (vLLM) samples token a_t with probability pi_engine(a_t | x_t), while PPO's
old policy is the trainer's pi_old. Weighing each token's policy loss by the importance ratio

    rho_t = pi_old(a_t | x_t) / pi_engine(a_t | x_t) = exp(log pi_old - log pi_engine)

makes the expectation the trainer's again. Unbounded ratios make a noisy gradient, so a mode bounds them
(llm_rl.config.variants.IMPORTANCE_SAMPLING_MODES): per token or one ratio per response (the exp of the
summed log-ratios of its tokens), clamped to [clip_min, clip_max] ("truncate", TIS) or set to 0 outside
it ("mask"). The weights are rollout constants: the loss multiplies its per-token terms by them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from llm_rl.config.variants import IMPORTANCE_SAMPLING_MODES

Tensor = torch.Tensor


def importance_weights(
    old_logprobs: Tensor,
    engine_logprobs: Tensor,
    mask: Tensor,
    mode: str,
    clip_max: Optional[float] = 3.0,
    clip_min: Optional[float] = None,
) -> Tensor:
    """(batch, resp_len) weights of the policy loss, 0 off `mask`.

    old_logprobs, engine_logprobs: (batch, resp_len) log pi_old and log pi_engine of the sampled tokens;
    an engine log-prob that is NaN (not reported) counts as agreeing (log-ratio 0)."""
    spec = IMPORTANCE_SAMPLING_MODES[mode]
    valid = mask.bool()
    log_ratio = torch.nan_to_num(old_logprobs.float() - engine_logprobs.float(), nan=0.0).masked_fill(~valid, 0.0)
    if spec.per_sequence:
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
    ratio = log_ratio.exp()
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if spec.truncate:
        ratio = ratio.clamp(min=low, max=high)
    else:
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    return ratio.masked_fill(~valid, 0.0)
