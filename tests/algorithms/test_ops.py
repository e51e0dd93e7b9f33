import math

import pytest
import torch
from conftest import close

from llm_rl.algorithms.ops import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

LN4 = 1.3862943611198906  # log(4)
LN3 = math.log(3.0)


# ----------------------------------------------------------------- masked_sum / masked_mean

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [0, 0, 0]])  # row 1 has no valid position


def test_masked_sum():
    close(masked_sum(X, M), 3.0)  # 1 + 2
    close(masked_sum(X, M, dim=1), [3.0, 0.0])
    close(masked_sum(X, M, dim=0), [1.0, 2.0, 0.0])


def test_masked_mean_all_and_per_row():
    close(masked_mean(X, M), 1.5)  # (1 + 2) / 2
    # Row 1 has no valid position: 0, not NaN.
    close(masked_mean(X, M, dim=1), [1.5, 0.0])


def test_masked_mean_all_masked_is_zero():
    out = masked_mean(X, torch.zeros_like(X))
    assert not torch.isnan(out)
    close(out, 0.0)


def test_bool_and_float_masks_agree():
    for fn in (masked_sum, masked_mean):
        torch.testing.assert_close(fn(X, M.bool()), fn(X, M.float()))
        torch.testing.assert_close(fn(X, M.bool(), dim=1), fn(X, M.float(), dim=1))
    torch.testing.assert_close(masked_var(X, M.bool()), masked_var(X, M.float()))


# ----------------------------------------------------------------- masked_var / masked_whiten

# Valid values 1, 2, 3, 4 (100 is padding): mean 2.5,
# squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5.
XV = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
MV = torch.tensor([True, True, True, True, False])


def test_masked_var_unbiased_and_biased():
    close(masked_var(XV, MV, unbiased=True), 5.0 / 3.0)
    close(masked_var(XV, MV, unbiased=False), 5.0 / 4.0)


def test_masked_var_degenerate_counts():
    one = torch.tensor([True, False, False, False, False])
    close(masked_var(XV, one, unbiased=True), 0.0)   # n == 1
    close(masked_var(XV, one, unbiased=False), 0.0)
    none = torch.zeros(5, dtype=torch.bool)
    for unbiased in (True, False):                   # n == 0
        out = masked_var(XV, none, unbiased=unbiased)
        assert torch.isfinite(out)
        close(out, 0.0)


def test_masked_whiten_shift_mean():
    # std = sqrt(5/3) = 1.2909944; (x - 2.5) / std
    out = masked_whiten(XV, MV, shift_mean=True, eps=0.0)
    close(out, [-1.161895, -0.387298, 0.387298, 1.161895, 0.0])


def test_masked_whiten_keep_mean():
    # Same scaling, mean 2.5 added back; padding still 0.
    out = masked_whiten(XV, MV, shift_mean=False, eps=0.0)
    close(out, [1.338105, 2.112702, 2.887298, 3.661895, 0.0])


def test_masked_whiten_all_masked_no_nan():
    out = masked_whiten(XV, torch.zeros(5))
    assert torch.isfinite(out).all()
    close(out, [0.0] * 5)


# ----------------------------------------------------------------- logprobs_from_logits

# Position 0: uniform over 4 -> log(1/4) for any token.
# Position 1: logits [0, ln 3, -inf, -inf] -> probs [1/4, 3/4, 0, 0].
HAND_LOGITS = torch.tensor(
    [[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, float("-inf"), float("-inf")]],
     [[0.0, 0.0, 0.0, 0.0], [0.0, LN3, float("-inf"), float("-inf")]]]
)
HAND_TOKENS = torch.tensor([[2, 1], [0, 0]])


def test_logprobs_hand_values():
    out = logprobs_from_logits(HAND_LOGITS, HAND_TOKENS)
    close(out, [[-LN4, math.log(0.75)], [-LN4, math.log(0.25)]])  # -0.287682, -1.386294


def test_logprobs_temperature_hand_values():
    # logits [0, 2 ln 3] / T=2 -> [0, ln 3] -> probs [1/4, 3/4].
    logits = torch.tensor([[[0.0, 2 * LN3]]])
    out = logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0)
    close(out, [[math.log(0.75)]])


def test_logprobs_matches_log_softmax_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    for temp in (1.0, 0.7, 1.5):
        ref = torch.log_softmax(logits / temp, dim=-1).gather(-1, tokens[..., None])[..., 0]
        torch.testing.assert_close(logprobs_from_logits(logits, tokens, temperature=temp), ref)


def test_logprobs_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 50, generator=g) * 4
    tokens = torch.randint(0, 50, (4, 6), generator=g)
    low = logits.to(torch.bfloat16)
    out = logprobs_from_logits(low, tokens, temperature=0.8)
    assert out.dtype == torch.float32  # computed and returned in float32
    # Same (bf16-rounded) inputs in fp32: essentially exact.
    ref_same = logprobs_from_logits(low.float(), tokens, temperature=0.8)
    torch.testing.assert_close(out, ref_same, atol=1e-5, rtol=1e-5)
    # Against the unrounded logits only bf16 input rounding remains.
    ref = logprobs_from_logits(logits, tokens, temperature=0.8)
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0)


def test_logprobs_gradient_hand_values():
    # d log p(tok) / d logits = onehot(tok) - softmax = [0 - 1/4, 1 - 3/4].
    logits = torch.tensor([[[0.0, LN3]]], requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[1]])).sum().backward()
    close(logits.grad, [[[-0.25, 0.25]]])


def test_logprobs_gradient_flows_in_bf16():
    logits = torch.zeros(2, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    logprobs_from_logits(logits, tokens).sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    # Uniform softmax: onehot - 1/4 at every position.
    expected = torch.full((2, 3, 4), -0.25)
    expected[..., 0] = 0.75
    torch.testing.assert_close(logits.grad.float(), expected)


def test_logprobs_rejects_bad_temperature():
    with pytest.raises(ValueError):
        logprobs_from_logits(HAND_LOGITS, HAND_TOKENS, temperature=0.0)


# ----------------------------------------------------------------- entropy_from_logits

def test_entropy_hand_values():
    # Uniform over 4: ln 4. [1/4, 3/4, 0, 0]: 0.25 ln 4 + 0.75 ln(4/3) = 0.562335.
    out = entropy_from_logits(HAND_LOGITS)
    assert torch.isfinite(out).all()  # -inf logits handled
    close(out, [[LN4, 0.562335], [LN4, 0.562335]])


def test_entropy_temperature_hand_value():
    logits = torch.tensor([[[0.0, 2 * LN3]]])
    close(entropy_from_logits(logits, temperature=2.0), [[0.562335]])


def test_entropy_matches_reference_and_is_stable():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 9, generator=g) * 2
    logp = torch.log_softmax(logits / 1.3, dim=-1)
    ref = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, temperature=1.3), ref)
    # One dominant logit: entropy ~ 0 and finite.
    peaked = torch.tensor([[[1000.0, 0.0, 0.0]]])
    close(entropy_from_logits(peaked), [[0.0]])


def test_entropy_gradient_finite_with_neg_inf():
    logits = HAND_LOGITS.clone().requires_grad_(True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_masked_whiten_with_statistics_summed_over_processes():
    """Two 'processes' holding halves of a batch whiten each half with the statistics of the whole."""
    from llm_rl.algorithms.ops import masked_moments

    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1],
                         [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    whole = masked_whiten(x, mask)
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    for i, (xi, mi) in enumerate(halves):
        other = masked_moments(*halves[1 - i])
        out = masked_whiten(xi, mi, reduce=lambda local, other=other: local + other)
        torch.testing.assert_close(out, whole[3 * i : 3 * i + 3], atol=1e-5, rtol=1e-5)
    # each half alone is whitened differently: the statistics really come from both
    assert not torch.allclose(masked_whiten(x[:3], mask[:3]), whole[:3], atol=1e-3)
    # and the summed path agrees with the two-pass one on a single process
    torch.testing.assert_close(masked_whiten(x, mask, reduce=lambda t: t), whole, atol=1e-6, rtol=1e-6)


def test_entropy_in_chunks_equals_one_chunk(monkeypatch):
    import llm_rl.algorithms.ops as ops

    logits = torch.randn(7, 5, 11, generator=torch.Generator().manual_seed(0))
    logits[2, 3, 4] = -float("inf")  # a banned token
    whole = ops.entropy_from_logits(logits, temperature=0.7)
    monkeypatch.setattr(ops, "ENTROPY_CHUNK_ELEMENTS", 2 * 5 * 11)  # two rows per chunk: 4 chunks
    torch.testing.assert_close(ops.entropy_from_logits(logits, temperature=0.7), whole, atol=1e-6, rtol=0)
    assert whole.shape == (7, 5) and torch.isfinite(whole).all()
