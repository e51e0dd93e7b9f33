import math

import pytest
import torch
from conftest import close

from llm_rl.algorithms.losses import aggregate_loss, loss_normalizer, policy_loss, value_loss

# ----------------------------------------------------------------- policy loss
#
# Four valid tokens plus one pad, clip 0.2 (ratio clipped to [0.8, 1.2]):
#   tok  ratio  A    pg1=-A*r  pg2=-A*clip(r)  max    clipped branch active?
#   0    1.5    +1   -1.5      -1.2            -1.2   yes
#   1    0.5    -1   +0.5      +0.8            +0.8   yes
#   2    1.1    -1   +1.1      +1.1            +1.1   no
#   3    0.9    +2   -1.8      -1.8            -1.8   no
# token_mean = (-1.2 + 0.8 + 1.1 - 1.8) / 4 = -0.275, clipfrac = 2/4
# approx_kl = 0.5 * mean(ln1.5^2, ln0.5^2, ln1.1^2, ln0.9^2)
#           = 0.5 * (0.164402 + 0.480453 + 0.009084 + 0.011101) / 4 = 0.083130
# ratio_mean = (1.5 + 0.5 + 1.1 + 0.9) / 4 = 1.0, ratio_max = 1.5
RATIOS = [1.5, 0.5, 1.1, 0.9]
OLD = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1000.0]])  # pad has a garbage old log-prob
NEW = OLD.clone()
NEW[0, :4] += torch.tensor([math.log(r) for r in RATIOS])
NEW[0, 4] = 0.0  # exp(0 - (-1000)) would overflow if padding were not guarded
ADV = torch.tensor([[1.0, -1.0, -1.0, 2.0, 123.0]])
MASK = torch.tensor([[1, 1, 1, 1, 0]])


def test_policy_loss_clipping_by_hand():
    loss, stats = policy_loss(NEW, OLD, ADV, MASK, clip_range=0.2)
    close(loss, -0.275)
    close(stats["clipfrac"], 0.5)
    close(stats["approx_kl"], 0.083130)
    close(stats["ratio_mean"], 1.0)
    close(stats["ratio_max"], 1.5)
    assert "dual_clipfrac" not in stats
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_policy_loss_gradient_zero_on_clipped_tokens():
    new = NEW.clone().requires_grad_(True)
    loss, _ = policy_loss(new, OLD, ADV, MASK.bool(), clip_range=0.2)
    loss.backward()
    # d/dlogp (-A * r) / N = -A * r / 4: tok2 = 1.1/4 = 0.275, tok3 = -2*0.9/4 = -0.45
    close(new.grad, [[0.0, 0.0, 0.275, -0.45, 0.0]])


def test_policy_loss_bool_and_float_mask_agree():
    a, sa = policy_loss(NEW, OLD, ADV, MASK.bool())
    b, sb = policy_loss(NEW, OLD, ADV, MASK.float())
    torch.testing.assert_close(a, b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k])


def test_policy_loss_dual_clip():
    # clip 0.2, dual clip c = 2:
    #   tok  ratio  A    pg1   pg2    max   cap c*|A|  final
    #   0    3.0    -1   3.0   1.2    3.0   2.0        2.0   (capped)
    #   1    1.5    -1   1.5   1.2    1.5   2.0        1.5
    #   2    3.0    +1   -3.0  -1.2   -1.2  (A > 0)    -1.2
    # loss = (2.0 + 1.5 - 1.2) / 3 = 0.766667; without dual clip (3 + 1.5 - 1.2) / 3 = 1.1
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[3.0, 1.5, 3.0]]))
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(new, old, adv, mask, clip_range=0.2, dual_clip=2.0)
    close(loss, 2.3 / 3)
    close(stats["dual_clipfrac"], 1 / 3)
    # pg2 > pg1 only on token 2 (-1.2 > -3.0); on tokens 0, 1 the unclipped branch is the max.
    close(stats["clipfrac"], 1 / 3)
    plain, _ = policy_loss(new, old, adv, mask, clip_range=0.2)
    close(plain, 1.1)


def test_policy_loss_validation():
    with pytest.raises(ValueError):
        policy_loss(NEW, OLD, ADV, MASK, dual_clip=1.0)
    with pytest.raises(ValueError):
        policy_loss(NEW, OLD, ADV, MASK, loss_agg="sum")


def test_policy_loss_all_masked_is_zero():
    loss, stats = policy_loss(NEW, OLD, ADV, torch.zeros_like(MASK))
    close(loss, 0.0)
    for v in stats.values():
        assert torch.isfinite(v)


# ----------------------------------------------------------------- aggregation

# row 0: 4 tokens [1, 2, 3, 4] (mean 2.5); row 1: one token 10; row 2: empty
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 7.0, 7.0, 7.0], [5.0, 5.0, 5.0, 5.0]])
AGG_MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_aggregate_token_mean_vs_seq_mean():
    # token_mean = (1 + 2 + 3 + 4 + 10) / 5 = 4
    # seq_mean_token_mean = (2.5 + 10) / 2 = 6.25 (empty row excluded)
    close(aggregate_loss(PER_TOKEN, AGG_MASK, "token_mean"), 4.0)
    close(aggregate_loss(PER_TOKEN, AGG_MASK, "seq_mean_token_mean"), 6.25)


def test_aggregate_all_masked_is_zero():
    empty = torch.zeros_like(AGG_MASK)
    close(aggregate_loss(PER_TOKEN, empty, "token_mean"), 0.0)
    close(aggregate_loss(PER_TOKEN, empty, "seq_mean_token_mean"), 0.0)


def test_loss_normalizer_counts_tokens_or_sequences():
    assert loss_normalizer(AGG_MASK, "token_mean") == 5.0
    assert loss_normalizer(AGG_MASK, "seq_mean_token_mean") == 2.0  # the empty row is no sequence
    with pytest.raises(ValueError, match="token_mean"):
        loss_normalizer(AGG_MASK, "sum")


@pytest.mark.parametrize("loss_agg, whole", [("token_mean", 4.0), ("seq_mean_token_mean", 6.25)])
def test_aggregate_with_the_global_count_splits_into_shares(loss_agg, whole):
    """Rows 0 | 1, 2 as two micro-batches, each divided by the count of all three rows:
    token_mean 10/5 + 10/5 = 4; seq_mean_token_mean 2.5/2 + 10/2 = 6.25. The shares add up to the whole
    mean, while the mean of the two micro-batch means would be (2.5 + 10) / 2 = 6.25 and (2.5 + 5) / 2 = 3.75."""
    count = loss_normalizer(AGG_MASK, loss_agg)
    first = aggregate_loss(PER_TOKEN[:1], AGG_MASK[:1], loss_agg, normalizer=count)
    rest = aggregate_loss(PER_TOKEN[1:], AGG_MASK[1:], loss_agg, normalizer=count)
    close(first + rest, whole)
    close(aggregate_loss(PER_TOKEN, AGG_MASK, loss_agg, normalizer=count), whole)
    close(aggregate_loss(PER_TOKEN, torch.zeros_like(AGG_MASK), loss_agg, normalizer=0.0), 0.0)  # count 0: no NaN


def test_policy_and_value_loss_take_a_normalizer():
    # the hand examples above over 4 valid tokens, divided by a global count of 8 instead: half of each
    loss, stats = policy_loss(NEW, OLD, ADV, MASK, clip_range=0.2, normalizer=8.0)
    close(loss, -0.275 / 2)
    close(stats["clipfrac"], 0.5)  # stats stay this batch's means
    new = NEW.clone().requires_grad_(True)
    policy_loss(new, OLD, ADV, MASK, clip_range=0.2, normalizer=torch.tensor(8.0))[0].backward()
    close(new.grad, [[0.0, 0.0, 0.1375, -0.225, 0.0]])
    loss, stats = value_loss(VALUES, OLD_VALUES, RETURNS, VMASK, clip_range_value=0.2, normalizer=8.0)
    close(loss, 0.57875 / 2)
    close(stats["value_error"], 0.8125)


def test_policy_loss_seq_mean_differs_from_token_mean():
    # ratio = 1 everywhere, so the per-token loss is -A = PER_TOKEN.
    logp = torch.zeros(3, 4)
    t, _ = policy_loss(logp, logp, -PER_TOKEN, AGG_MASK, loss_agg="token_mean")
    s, _ = policy_loss(logp, logp, -PER_TOKEN, AGG_MASK, loss_agg="seq_mean_token_mean")
    close(t, 4.0)
    close(s, 6.25)


# ----------------------------------------------------------------- value loss
#
# c = 0.2:
#   tok  V    V_old  R    V_clip  (V-R)^2  (V_clip-R)^2  max   clipped larger?
#   0    1.0  0.5    2.0  0.7     1.0      1.69          1.69  yes
#   1    2.0  2.5    1.0  2.3     1.0      1.69          1.69  yes
#   2    0.5  0.5    0.0  0.5     0.25     0.25          0.25  no
#   3    3.0  2.0    2.0  2.2     1.0      0.04          1.0   no
#   4    pad (garbage)
# loss = 0.5 * (1.69 + 1.69 + 0.25 + 1.0) / 4 = 0.57875
# value_error = (1 + 1 + 0.25 + 1) / 4 = 0.8125; unclipped loss = 0.5 * 0.8125 = 0.40625
VALUES = torch.tensor([[1.0, 2.0, 0.5, 3.0, 55.0]])
OLD_VALUES = torch.tensor([[0.5, 2.5, 0.5, 2.0, -9.0]])
RETURNS = torch.tensor([[2.0, 1.0, 0.0, 2.0, 0.0]])
VMASK = torch.tensor([[True, True, True, True, False]])


def test_value_loss_clipped_by_hand():
    loss, stats = value_loss(VALUES, OLD_VALUES, RETURNS, VMASK, clip_range_value=0.2)
    close(loss, 0.57875)
    close(stats["vf_clipfrac"], 0.5)
    close(stats["value_error"], 0.8125)
    assert all(not v.requires_grad for v in stats.values())


def test_value_loss_unclipped():
    loss, stats = value_loss(VALUES, OLD_VALUES, RETURNS, VMASK, clip_range_value=None)
    close(loss, 0.40625)
    close(stats["vf_clipfrac"], 0.0)
    close(stats["value_error"], 0.8125)


def test_value_loss_seq_mean():
    # row 0: tokens 0.5*[1.69, 1.69] -> mean 0.845; row 1: 0.5*[0.25, 1.0, 1.0] -> 0.375
    # seq mean = (0.845 + 0.375) / 2 = 0.61; token mean = (1.69 + 0.375*3) / 5 = 0.563
    values = torch.tensor([[1.0, 2.0, 0.0], [0.5, 3.0, 1.0]])
    old = torch.tensor([[0.5, 2.5, 0.0], [0.5, 2.0, 1.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s, _ = value_loss(values, old, returns, mask, 0.2, loss_agg="seq_mean_token_mean")
    t, _ = value_loss(values, old, returns, mask, 0.2, loss_agg="token_mean")
    close(s, 0.61)
    close(t, 0.563)


def test_value_loss_gradient():
    v = VALUES.clone().requires_grad_(True)
    loss, _ = value_loss(v, OLD_VALUES, RETURNS, VMASK, clip_range_value=0.2)
    loss.backward()
    # Clipped branch active on tokens 0, 1: no gradient through the clamp.
    # tok2: max tie -> gradient flows through one branch, 0.5*2*(0.5-0)/4 = 0.125
    # tok3: unclipped branch, 0.5*2*(3-2)/4 = 0.25
    close(v.grad, [[0.0, 0.0, 0.125, 0.25, 0.0]])


def test_ppo_objective_by_hand():
    """ratios 1 and 2, advantages +1 and -1, clip 0.2: token losses -1 and max(2, 1.2) = 2 -> policy 0.5;
    value 0.5 * mean(0.5^2, 0) = 0.0625; entropy mean(1, 3) = 2; k2 KL mean(0, 0.5 ln(2)^2)."""
    import math

    from llm_rl.algorithms.losses import PPOCoefficients, ppo_objective

    logprobs = torch.tensor([[0.0, math.log(2.0)]], requires_grad=True)
    values = torch.tensor([[0.5, 1.0]], requires_grad=True)
    loss, stats = ppo_objective(
        logprobs, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2),
        token_entropy=torch.tensor([[1.0, 3.0]]), values=values, old_values=torch.tensor([[0.5, 0.5]]),
        returns=torch.ones(1, 2), ref_logprobs=torch.zeros(1, 2),
        coefficients=PPOCoefficients(clip_range=0.2, clip_range_value=None, vf_coef=0.1, ent_coef=0.01, kl_coef=0.1,
                                     kl_estimator="k2"),
    )
    kl = 0.25 * math.log(2.0) ** 2
    assert stats["loss/policy"].item() == pytest.approx(0.5)
    assert stats["loss/value"].item() == pytest.approx(0.0625)
    assert stats["entropy"].item() == pytest.approx(2.0)
    assert stats["loss/kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.5 + 0.1 * 0.0625 - 0.01 * 2.0 + 0.1 * kl)
    assert stats["loss/total"].item() == pytest.approx(loss.item())
    assert stats["policy/ratio_max_dev"].item() == pytest.approx(1.0)
    assert stats["policy/clipfrac"].item() == 0.0  # the pessimistic max takes the unclipped term at both tokens
    loss.backward()
    assert logprobs.grad is not None and values.grad is not None
    # no critic, no KL term: only the policy and the entropy
    loss, stats = ppo_objective(logprobs.detach(), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2),
                                token_entropy=torch.tensor([[1.0, 3.0]]), coefficients=PPOCoefficients(ent_coef=0.01))
    assert loss.item() == pytest.approx(0.5 - 0.02) and "loss/kl" not in stats and stats["loss/value"] == 0


# ----------------------------------------------------------------- TRL's loss types (llm-rl grpo's loss_type)
def test_clip_range_high_clips_the_ratio_asymmetrically():
    """The table above with the upper bound at 1.28 (epsilon 0.2, epsilon_high 0.28): token 0 (ratio 1.5, A +1)
    now gives max(-1.5, -1.28) = -1.28; the others are unchanged: (-1.28 + 0.8 + 1.1 - 1.8) / 4 = -0.295."""
    loss, stats = policy_loss(NEW, OLD, ADV, MASK, clip_range=0.2, clip_range_high=0.28)
    close(loss, -0.295)
    close(stats["clipfrac"], 0.5)
    close(policy_loss(NEW, OLD, ADV, MASK, clip_range=0.2, clip_range_high=None)[0], -0.275)  # None: symmetric
    with pytest.raises(ValueError, match="clip_range_high"):
        policy_loss(NEW, OLD, ADV, MASK, clip_range_high=0.0)


def test_micro_batch_token_mean_is_the_mean_of_the_micro_batches_token_means():
    """bnpo: rows 0 and 1 (tokens 1+2+3+4 and 10) as two micro-batches of one row: (10/4 + 10/1) / 2 = 6.25;
    as one micro-batch of two rows: 20/5 = 4, the token mean. The split changes the loss; token_mean's does not."""
    two = loss_normalizer(AGG_MASK[:2], "micro_batch_token_mean", micro_batch_rows=1)
    assert two == 2.0
    shares = [aggregate_loss(PER_TOKEN[i:i + 1], AGG_MASK[i:i + 1], "micro_batch_token_mean", two) for i in (0, 1)]
    close(sum(shares), 6.25)
    one = loss_normalizer(AGG_MASK[:2], "micro_batch_token_mean", micro_batch_rows=2)
    close(aggregate_loss(PER_TOKEN[:2], AGG_MASK[:2], "micro_batch_token_mean", one), 4.0)
    close(aggregate_loss(PER_TOKEN[:2], AGG_MASK[:2], "micro_batch_token_mean"), 4.0)


def test_token_sum_over_max_length_divides_by_rows_times_the_longest_response():
    """dr_grpo: the 3 rows hold 20 in valid tokens; max length 8: 20 / (3 * 8); without it, the batch's width 4:
    20 / 12. Split into rows 0 | 1, 2 with the mini-batch's count the shares add up to the same 20 / 24."""
    count = loss_normalizer(AGG_MASK, "token_sum_over_max_length", max_length=8)
    assert count == 24.0
    close(aggregate_loss(PER_TOKEN, AGG_MASK, "token_sum_over_max_length", count), 20 / 24)
    close(aggregate_loss(PER_TOKEN, AGG_MASK, "token_sum_over_max_length"), 20 / 12)
    shares = (aggregate_loss(PER_TOKEN[:1], AGG_MASK[:1], "token_sum_over_max_length", count)
              + aggregate_loss(PER_TOKEN[1:], AGG_MASK[1:], "token_sum_over_max_length", count))
    close(shares, 20 / 24)


def test_kl_ratio_weighted_keeps_the_value_and_changes_the_gradient():
    """One token, log pi = log pi_old = 0, log ref = ln 2, k3 in the loss, kl_coef 1, A = 0:
    k3 = e^(ln 2) - ln 2 - 1 = 0.306853 either way. d k3 / d log pi = 1 - e^(ln 2 - 0) = -1; times the ratio
    pi / pi_old (1 in value) the gradient gains k3 * 1: -1 + 0.306853 = -0.693147 = log pi - log ref."""
    from llm_rl.algorithms.losses import PPOCoefficients, ppo_objective

    for weighted, gradient in ((False, -1.0), (True, -0.693147)):
        logprobs = torch.zeros(1, 1, requires_grad=True)
        loss, stats = ppo_objective(
            logprobs, torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), token_entropy=torch.zeros(1, 1),
            ref_logprobs=torch.full((1, 1), math.log(2.0)),
            coefficients=PPOCoefficients(kl_coef=1.0, kl_estimator="k3", kl_ratio_weighted=weighted))
        loss.backward()
        close(stats["loss/kl"], 0.306853)
        close(logprobs.grad, [[gradient]])
