"""The engine-vs-trainer importance weights (llm_rl.algorithms.rollout_correction), by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llm_rl.algorithms.losses import policy_loss
from llm_rl.algorithms.rollout_correction import importance_weights

# two responses: row 0 has 3 actions, row 1 has 2 and a padded column
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
ENGINE = torch.tensor([[-1.5, -1.0, -0.5], [-3.0, -1.0, 7.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# log-ratios old - engine: row 0 [0.5, -1, 0] (sum -0.5), row 1 [2, 0, pad] (sum 2)


def test_token_truncate_clamps_each_ratio():
    w = importance_weights(OLD, ENGINE, MASK, "token_truncate", clip_max=3.0)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [3.0, 1.0, 0.0]])  # e^2 = 7.39 -> 3
    torch.testing.assert_close(w, expected)


def test_token_truncate_lower_bound():
    w = importance_weights(OLD, ENGINE, MASK, "token_truncate", clip_max=None, clip_min=0.5)
    expected = torch.tensor([[math.exp(0.5), 0.5, 1.0], [math.exp(2.0), 1.0, 0.0]])
    torch.testing.assert_close(w, expected)


def test_token_mask_zeroes_ratios_outside_the_bounds():
    w = importance_weights(OLD, ENGINE, MASK, "token_mask", clip_max=3.0, clip_min=0.5)
    expected = torch.tensor([[math.exp(0.5), 0.0, 1.0], [0.0, 1.0, 0.0]])  # e^-1 = 0.37 < 0.5, e^2 > 3
    torch.testing.assert_close(w, expected)


def test_sequence_modes_take_one_ratio_per_response():
    mask = importance_weights(OLD, ENGINE, MASK, "sequence_mask", clip_max=3.0)
    torch.testing.assert_close(mask, torch.tensor([[math.exp(-0.5)] * 3, [0.0, 0.0, 0.0]]))  # e^2 > 3: masked
    truncate = importance_weights(OLD, ENGINE, MASK, "sequence_truncate", clip_max=3.0)
    torch.testing.assert_close(truncate, torch.tensor([[math.exp(-0.5)] * 3, [3.0, 3.0, 0.0]]))


def test_padding_and_nan_engine_logprobs_count_as_agreement():
    engine = ENGINE.clone()
    engine[0, 0] = float("nan")  # not reported: ratio 1
    w = importance_weights(OLD, engine, MASK, "sequence_truncate", clip_max=None)
    torch.testing.assert_close(w[0], torch.full((3,), math.exp(-1.0)))  # 0 + (-1) + 0
    assert w[1, 2] == 0.0  # padding, whatever the engine said there (7.0)


def test_weights_scale_each_tokens_policy_loss():
    """With every old/new ratio 1 the clipped loss is -A per token; the weights multiply it before the mean."""
    logprobs = OLD.clone().requires_grad_(True)
    advantages = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 4.0, 9.0]])
    weights = torch.tensor([[0.5, 1.0, 2.0], [3.0, 0.0, 5.0]])
    loss, _ = policy_loss(logprobs, OLD, advantages, MASK, token_weights=weights)
    # (-(0.5*1 + 1*2 + 2*3) - (3*-1 + 0*4)) / 5 tokens
    assert loss.item() == pytest.approx((-(0.5 + 2 + 6) + 3) / 5)
    loss.backward()
    # d/dlogprob of -A * w * ratio at ratio 1 is -A * w / 5
    torch.testing.assert_close(logprobs.grad, -(advantages * weights * MASK) / 5)
