"""Phase 3 as a pure function: `compute_targets` on hand-made rollouts, against values computed by hand;
the estimator table and the typed config choices it is keyed by."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
from conftest import close

from llm_rl.algorithms.advantages import ESTIMATORS
from llm_rl.algorithms.scores import Scores, kl_rewards, place_scores, token_rewards
from llm_rl.algorithms.targets import compute_targets
from llm_rl.config.choices import AdvantageEstimator
from llm_rl.config.errors import ConfigError
from llm_rl.config.sections import Config
from llm_rl.sampling.rollout import Rollout


def rollout_of(mask, logprobs, ref_logprobs=None, values=None) -> Rollout:
    mask = torch.tensor(mask)
    n, width = mask.shape
    return Rollout(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
                   torch.zeros(n, width, dtype=torch.long), mask, torch.ones(n, dtype=torch.bool),
                   logprobs=torch.tensor(logprobs),
                   ref_logprobs=None if ref_logprobs is None else torch.tensor(ref_logprobs),
                   values=None if values is None else torch.tensor(values))


def scores_of(sequence, valid=None, tokens=None) -> Scores:
    valid = torch.ones(len(sequence), dtype=torch.bool) if valid is None else torch.tensor(valid)
    return Scores(torch.tensor(sequence), None if tokens is None else torch.tensor(tokens), valid, {}, {})


MASK = [[1, 1, 1], [1, 1, 0]]
LOGPROBS = [[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]]
REF = [[-1.5, -1.0, -0.5], [-2.0, -3.0, 0.0]]  # k1 KL = logprobs - ref = [[0.5, 0, -0.5], [0, 1, 0]]
VALUES = [[0.5, 0.5, 0.5], [1.0, 1.0, 0.0]]


def test_gae_targets_by_hand():
    """beta 0.1, scores (1, 2): r = [[-0.05, 0, 0.05 + 1], [0, -0.1 + 2, 0]]; GAE gamma 1, lam 0.5:
    row 0: A_2 = 1.05 - 0.5 = 0.55, A_1 = 0 + 0.5 * 0.55 = 0.275, A_0 = -0.05 + 0.5 * 0.275 = 0.0875;
    row 1: A_1 = 1.9 - 1 = 0.9, A_0 = 0 + 0.5 * 0.9 = 0.45. Returns are A + V on the response."""
    targets = compute_targets(rollout_of(MASK, LOGPROBS, REF, VALUES), scores_of([1.0, 2.0]), estimator="gae",
                              beta=0.1, gamma=1.0, lam=0.5, whiten_advantages=False)
    torch.testing.assert_close(targets.kl, torch.tensor([[0.5, 0.0, -0.5], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(targets.token_rewards, torch.tensor([[-0.05, 0.0, 1.05], [0.0, 1.9, 0.0]]))
    torch.testing.assert_close(targets.advantages, torch.tensor([[0.0875, 0.275, 0.55], [0.45, 0.9, 0.0]]))
    torch.testing.assert_close(targets.returns, torch.tensor([[0.5875, 0.775, 1.05], [1.45, 1.9, 0.0]]))
    assert torch.equal(targets.loss_mask, torch.tensor(MASK))


def test_an_invalid_row_gets_no_kl_reward_or_advantage_and_token_scores_add():
    targets = compute_targets(
        rollout_of(MASK, LOGPROBS, REF, VALUES), scores_of([1.0, 2.0], valid=[True, False],
                                                           tokens=[[0.0, 0.5, 0.0], [1.0, 0.0, 0.0]]),
        estimator="gae", beta=0.1, gamma=1.0, lam=1.0, whiten_advantages=False,
    )
    assert targets.loss_mask.tolist() == [[1, 1, 1], [0, 0, 0]]
    assert targets.kl[1].abs().sum() == 0 and targets.advantages[1].abs().sum() == 0
    assert targets.token_rewards[1].abs().sum() == 0
    torch.testing.assert_close(targets.token_rewards[0], torch.tensor([-0.05, 0.5, 1.05]))
    # lam 1, gamma 1: A_t = sum of the rewards to go - V_t
    torch.testing.assert_close(targets.advantages[0], torch.tensor([1.5 - 0.5, 1.55 - 0.5, 1.05 - 0.5]))


def test_without_a_reference_the_kl_is_zero():
    targets = compute_targets(rollout_of(MASK, LOGPROBS, values=VALUES), scores_of([1.0, 2.0]), estimator="gae",
                              beta=0.1, whiten_advantages=False)
    assert targets.kl.abs().sum() == 0
    torch.testing.assert_close(targets.token_rewards, place_scores(torch.tensor([1.0, 2.0]), torch.tensor(MASK)))


def test_grpo_is_not_whitened_again_and_rloo_is():
    """Group of two with summed rewards 1 and 3 (beta 0): grpo gives -/+ 1/sqrt(2) on every token, and
    whiten_advantages leaves it (grpo normalises per group); rloo (-2, +2) is whitened over the tokens."""
    rollout, scores = rollout_of(MASK, LOGPROBS), scores_of([1.0, 3.0])
    grpo = compute_targets(rollout, scores, estimator="grpo", beta=0.0, group_size=2, whiten_advantages=True)
    a = 1 / math.sqrt(2)
    torch.testing.assert_close(grpo.advantages, torch.tensor([[-a, -a, -a], [a, a, 0.0]]), atol=1e-5, rtol=0)
    assert grpo.returns is None
    rloo = compute_targets(rollout, scores, estimator="rloo", beta=0.0, group_size=2, whiten_advantages=True)
    tokens = torch.tensor([-2.0, -2.0, -2.0, 2.0, 2.0])  # the five response tokens' advantages before whitening
    expected = (tokens - tokens.mean()) / tokens.std()
    torch.testing.assert_close(rloo.advantages[torch.tensor(MASK).bool()], expected, atol=1e-5, rtol=0)


def test_reward_placement_functions_by_hand():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    kl = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    assert kl_rewards(kl, mask, 0.5).tolist() == [[-0.5, -1.0, 0.0], [0.0, 0.0, 0.0], [-0.25, -0.25, -0.25]]
    assert place_scores(torch.tensor([2.0, 7.0, 3.0]), mask).tolist() == [[0, 2, 0], [0, 0, 0], [0, 0, 3]]
    assert token_rewards(torch.tensor([2.0, 7.0, 3.0]), kl, mask, 0.5).tolist() == [
        [-0.5, 1.0, 0.0], [0.0, 0.0, 0.0], [-0.25, -0.25, 2.75]]


def test_the_estimator_table_covers_exactly_the_configs_choices():
    assert set(ESTIMATORS) == set(typing.get_args(AdvantageEstimator))
    assert [name for name, spec in ESTIMATORS.items() if spec.needs_values] == ["gae"]


@pytest.mark.parametrize(("key", "value"), [("advantage_estimator", "ppo2"), ("kl_estimator", "k4"),
                                            ("loss_agg", "mean"), ("discount", "episode")])
def test_typed_choices_are_checked_when_the_config_loads(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' is one of .*got '{value}'"):
        Config.from_dict({key: value})


# ----------------------------------------------------------------------------- dropped rows and prefix_diff
def advantages_of(rollout: Rollout, scores: Scores, **values) -> torch.Tensor:
    """The advantages `compute_targets` gives a hand-made rollout under the config `values`, beta 0."""
    ppo = Config.from_dict({"whiten_advantages": False, **values}).ppo
    return compute_targets(rollout, scores, estimator=ppo.advantage_estimator, beta=0.0,
                           group_size=ppo.num_generations, whiten_advantages=ppo.whiten_advantages).advantages


def hand_rollout(scores: list[float], lengths: list[int], width: int = 3, prefix=None) -> tuple[Rollout, Scores]:
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    zeros = [[0.0] * width] * len(scores)
    rollout = rollout_of(mask.tolist(), zeros, zeros)
    valid = torch.tensor(lengths) > 0  # a dropped sample (invalid reward) keeps no tokens
    return rollout, Scores(torch.tensor(scores), None, valid, per_reward={}, means={}, prefix=prefix)


def test_group_estimators_leave_dropped_rows_out_of_their_group():
    # group of 3, the middle sample dropped (no tokens, score 0): the others are compared with each other only
    advantages = advantages_of(*hand_rollout([1.0, 0.0, 3.0], [2, 0, 1]), advantage_estimator="rloo", num_generations=3)
    # rloo: 1 - 3 = -2 and 3 - 1 = 2 on every token; the dropped row gets nothing
    torch.testing.assert_close(advantages, torch.tensor([[-2.0, -2.0, 0.0], [0.0] * 3, [2.0, 0.0, 0.0]]))
    advantages = advantages_of(*hand_rollout([1.0, 0.0, 3.0], [2, 0, 1]), advantage_estimator="grpo", num_generations=3)
    # grpo: mean 2, unbiased std sqrt(2): -/+ 1/sqrt(2)
    a = 1 / math.sqrt(2)
    torch.testing.assert_close(advantages, torch.tensor([[-a, -a, 0.0], [0.0] * 3, [a, 0.0, 0.0]]), atol=1e-5, rtol=0)


def test_prefix_diff_takes_the_sequence_score_as_terminal_reward():
    """prefix scores Q = (0.5, 0.75) after a prompt scored 0.25; the shaped score (other rewards, clipping,
    missing_eos_penalty: whatever made it) is 2.0: A = (Q_0 - Q_-1, score - Q_0)."""
    prefix = (torch.tensor([[0.5, 0.75]]), torch.tensor([0.25]))
    config = {"advantage_estimator": "prefix_diff", "reward_model_name_or_path": "rm"}
    advantages = advantages_of(*hand_rollout([2.0], [2], width=2, prefix=prefix), **config)
    torch.testing.assert_close(advantages, torch.tensor([[0.25, 1.5]]))
    # a different score (say a missing-EOS penalty of 1) changes the advantages
    advantages = advantages_of(*hand_rollout([1.0], [2], width=2, prefix=prefix), **config)
    torch.testing.assert_close(advantages, torch.tensor([[0.25, 0.5]]))


def test_mask_truncated_leaves_a_row_without_stop_token_in_its_group_but_out_of_the_loss():
    """grpo, one group of two: scores 1 and 0, the second cut at max_new_tokens (no stop token). Both are in the
    group's statistics (advantages +-0.707107 as without masking); the second gets no loss, KL or advantage."""
    rollout = dataclasses.replace(rollout_of(MASK, LOGPROBS, REF), ended=torch.tensor([True, False]))
    kept = compute_targets(rollout, scores_of([1.0, 0.0]), estimator="grpo", beta=0.0, group_size=2,
                           kl_estimator="k1")
    masked = compute_targets(rollout, scores_of([1.0, 0.0]), estimator="grpo", beta=0.0, group_size=2,
                             kl_estimator="k1", mask_truncated=True)
    assert kept.loss_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert masked.loss_mask.tolist() == [[1, 1, 1], [0, 0, 0]]
    close(kept.advantages, [[0.707106] * 3, [-0.707106] * 2 + [0.0]], atol=1e-5)
    close(masked.advantages, [[0.707106] * 3, [0.0] * 3], atol=1e-5)
    close(masked.kl, [[0.5, 0.0, -0.5], [0.0, 0.0, 0.0]])
