import pytest
import torch
from conftest import close

from llm_rl.algorithms.advantages import (
    compute_gae,
    discounted_returns,
    grpo_advantages,
    prefix_diff_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

# ----------------------------------------------------------------- discounted returns

# gamma = 0.9, worked backwards:
# row 0: 1.8; 1.5 + 0.9*1.8 = 3.12; 1.7 + 0.9*3.12 = 4.508;
#        1.2 + 0.9*4.508 = 5.2572; 1.3 + 0.9*5.2572 = 6.03148
# row 1: 1.6; 1.7 + 1.44 = 3.14; 1.8 + 2.826 = 4.626;
#        1.5 + 4.1634 = 5.6634; 1.7 + 5.09706 = 6.79706
REWARDS = torch.tensor(
    [[1.3, 1.2, 1.7, 1.5, 1.8], [1.7, 1.5, 1.8, 1.7, 1.6]], dtype=torch.float64
)
EXPECTED_RETURNS = [
    [6.03148, 5.2572, 4.508, 3.12, 1.8],
    [6.79706, 5.6634, 4.626, 3.14, 1.6],
]
FULL = torch.ones(2, 5)


def test_discounted_returns_worked_example():
    out = discounted_returns(REWARDS, FULL, gamma=0.9)
    close(out[:, 0], [6.03148, 6.79706], atol=1e-12)
    close(out, EXPECTED_RETURNS, atol=1e-12)


def test_discounted_returns_trailing_padding():
    # gamma 0.5, valid [1, 2, 3], pad reward 99 ignored:
    # G2 = 3, G1 = 2 + 1.5 = 3.5, G0 = 1 + 1.75 = 2.75, G3 = 0
    rewards = torch.tensor([[1.0, 2.0, 3.0, 99.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])  # row 1 fully masked
    out = discounted_returns(rewards, mask, gamma=0.5)
    close(out, [[2.75, 3.5, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, discounted_returns(rewards, mask.bool(), gamma=0.5))


# ----------------------------------------------------------------- GAE

def test_gae_lam1_zero_values_equals_discounted_returns():
    adv, ret = compute_gae(REWARDS, torch.zeros_like(REWARDS), FULL, gamma=0.9, lam=1.0)
    close(ret[:, 0], [6.03148, 6.79706], atol=1e-12)
    close(ret, EXPECTED_RETURNS, atol=1e-12)
    close(adv, EXPECTED_RETURNS, atol=1e-12)


def test_gae_hand_worked_three_tokens():
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72), r = [0, 0, 1], V = [0.5, 0.4, 0.8]
    # delta2 = 1 + 0 - 0.8            = 0.2      (value after the last token is 0)
    # delta1 = 0 + 0.9*0.8 - 0.4      = 0.32
    # delta0 = 0 + 0.9*0.4 - 0.5      = -0.14
    # A2 = 0.2; A1 = 0.32 + 0.72*0.2 = 0.464; A0 = -0.14 + 0.72*0.464 = 0.19408
    # returns = A + V = [0.69408, 0.864, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.8]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    close(adv, [[0.19408, 0.464, 0.2]])
    close(ret, [[0.69408, 0.864, 1.0]])


def test_gae_masked_garbage_does_not_leak():
    # Row 0: mask [1, 1, 0, 0], values/rewards at padding are garbage.
    # delta1 = 1 + 0.9*(100*0) - 0.4 = 0.6 -> A1 = 0.6
    # delta0 = 0 + 0.9*0.4 - 0.5 = -0.14 -> A0 = -0.14 + 0.72*0.6 = 0.292
    # returns = [0.792, 1.0, 0, 0]
    # Row 1: the three-token sequence above, followed by one pad.
    # Row 2: fully masked -> all zeros.
    rewards = torch.tensor([[0.0, 1.0, 5.0, 5.0], [0.0, 0.0, 1.0, 7.0], [1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 100.0, 100.0], [0.5, 0.4, 0.8, -50.0], [3.0, 3.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.292, 0.6, 0.0, 0.0], [0.19408, 0.464, 0.2, 0.0], [0.0] * 4])
    close(ret, [[0.792, 1.0, 0.0, 0.0], [0.69408, 0.864, 1.0, 0.0], [0.0] * 4])
    adv_f, ret_f = compute_gae(rewards, values, mask.float(), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv_f, adv)
    torch.testing.assert_close(ret_f, ret)


# ----------------------------------------------------------------- GRPO / RLOO

def test_grpo_hand_values():
    # group 0: [1, 2, 3], mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]
    # group 1: all equal -> 0 (not NaN)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    out = grpo_advantages(scores, group_size=3)
    assert torch.isfinite(out).all()
    close(out, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], atol=1e-5)


def test_grpo_pair():
    # [0, 1]: mean 0.5, std sqrt(0.25 + 0.25) = 0.707107 -> -/+ 0.707107
    close(grpo_advantages(torch.tensor([0.0, 1.0]), 2), [-0.707107, 0.707107], atol=1e-5)


def test_grpo_group_size_one_and_validation():
    close(grpo_advantages(torch.tensor([3.0, -1.0]), 1), [0.0, 0.0])
    with pytest.raises(ValueError):
        grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_rloo_hand_values():
    # group 0 [1, 2, 3]: 1 - 2.5 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5
    # group 1 [0, 0, 6]: 0 - 3 = -3, 0 - 3 = -3, 6 - 0 = 6
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    close(rloo_advantages(scores, 3), [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])


def test_rloo_group_size_one_all_equal_and_validation():
    close(rloo_advantages(torch.tensor([3.0, -1.0]), 1), [0.0, 0.0])
    close(rloo_advantages(torch.tensor([2.0, 2.0, 2.0, 2.0]), 2), [0.0] * 4)
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


# ----------------------------------------------------------------- REINFORCE++

def test_reinforce_pp_hand_values():
    # gamma 1: returns [[1, 1, 1], [2, 2, 0(pad)]]; valid returns 1, 1, 1, 2, 2
    # mean 1.4; squared devs 3*0.16 + 2*0.36 = 1.2; unbiased var 1.2/4 = 0.3
    # std 0.5477226 -> -0.4/std = -0.730297, 0.6/std = 1.095445
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 42.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    a, b = -0.730297, 1.095445
    close(out, [[a, a, a], [b, b, 0.0]])


def test_reinforce_pp_all_masked_no_nan():
    out = reinforce_pp_advantages(torch.ones(2, 3), torch.zeros(2, 3))
    close(out, [[0.0] * 3] * 2)


# ----------------------------------------------------------------- prefix differences

def test_prefix_diff_hand_values():
    # row 0: Q = [0.2, 0.5, 0.4], Q_-1 = 0.1 -> [0.1, 0.3, -0.1]
    # row 1: Q = [1.0, 3.0, pad], Q_-1 = 0.5 -> [0.5, 2.0, 0]
    prefix = torch.tensor([[0.2, 0.5, 0.4], [1.0, 3.0, 9.9]])
    prompt = torch.tensor([0.1, 0.5])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = prefix_diff_advantages(prefix, prompt, mask)
    close(out, [[0.1, 0.3, -0.1], [0.5, 2.0, 0.0]])


# ----------------------------------------------------------------- dropped rows in groups
# group 0: scores 1, (dropped), 3, 2 -> valid mean 2, unbiased std 1; group 1: one valid row only -> 0
GROUP_SCORES = torch.tensor([1.0, 0.0, 3.0, 2.0, 5.0, 0.0, 0.0, 0.0])
GROUP_VALID = torch.tensor([True, False, True, True, True, False, False, False])


def test_grpo_leaves_invalid_rows_out():
    close(grpo_advantages(GROUP_SCORES, 4, eps=0.0, valid=GROUP_VALID), [-1.0, 0.0, 1.0, 0.0, 0, 0, 0, 0])
    # without the mask the dropped 0 lowers the mean to 1.5: the old behaviour
    assert grpo_advantages(GROUP_SCORES, 4)[0] > -1.0


def test_rloo_leaves_invalid_rows_out():
    # baselines: 1 -> mean(3, 2) = 2.5, 3 -> mean(1, 2) = 1.5, 2 -> mean(1, 3) = 2
    close(rloo_advantages(GROUP_SCORES, 4, valid=GROUP_VALID), [-1.5, 0.0, 1.5, 0.0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="valid"):
        rloo_advantages(GROUP_SCORES, 4, valid=GROUP_VALID[:4])


def test_prefix_diff_with_rewards_is_td0_with_the_prefix_scores_as_critic():
    # Q_-1 = 0.25, Q = (0.5, 0.75, pad); rewards -0.1 (KL) then 2.0 (KL + the sequence score)
    prefix, prompt = torch.tensor([[0.5, 0.75, 9.0]]), torch.tensor([0.25])
    mask = torch.tensor([[1, 1, 0]])
    rewards = torch.tensor([[-0.1, 2.0, 0.0]])
    # A_0 = -0.1 + 0.5 - 0.25 = 0.15; A_1 = 2.0 - 0.5 = 1.5 (no Q after the last token)
    close(prefix_diff_advantages(prefix, prompt, mask, rewards), [[0.15, 1.5, 0.0]])
    # the score Q_last on the last token as the only reward: the plain increments
    only_score = torch.tensor([[0.0, 0.75, 0.0]])
    close(prefix_diff_advantages(prefix, prompt, mask, only_score), prefix_diff_advantages(prefix, prompt, mask))


# ----------------------------------------------------------------- grpo's std: group, batch or none (TRL's scale_rewards)
def test_grpo_scaling_group_batch_or_none_by_hand():
    """Scores [0, 1 | 2, 3]: every row is 0.5 from its group's mean. group: / std(0, 1) = 0.707107 -> 0.707107;
    batch: / std(0, 1, 2, 3) = sqrt(5/3) = 1.290994 -> 0.387298; none: 0.5. Summed over two processes holding the
    same scores the batch is (0, 1, 2, 3) twice: std sqrt(10/7) = 1.195229 -> 0.418330."""
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0])
    sign = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    close(grpo_advantages(scores, 2, eps=0.0, scaling="group"), sign * 0.707107, atol=1e-5)
    close(grpo_advantages(scores, 2, eps=0.0, scaling="batch"), sign * 0.387298, atol=1e-5)
    close(grpo_advantages(scores, 2, eps=0.0, scaling="none"), sign * 0.5)
    close(grpo_advantages(scores, 2, eps=0.0, scaling="batch", reduce=lambda t: 2 * t), sign * 0.418330, atol=1e-5)
    close(grpo_advantages(torch.tensor([1.0, 1.0, 2.0, 4.0]), 2, scaling="none"), [0.0, 0.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="group, batch or none"):
        grpo_advantages(scores, 2, scaling="std")
