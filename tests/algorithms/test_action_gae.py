"""GAE over the action tokens of multi-turn episodes (`action_gae`), hand-computed: turn vs token discount,
observation tokens, bootstrapping a cut episode, and the single-turn case against `compute_gae`."""

from __future__ import annotations

import pytest
import torch

from llm_rl.algorithms.advantages import action_gae, compute_gae

DESIGN_TURNS = [[1.3, 1.2, 1.7, 1.5, 1.8], [1.7, 1.5, 1.8, 1.7, 1.6]]  # DESIGN.md's two chatbot episodes


def turn_layout(turn_rewards: list[float], tokens_per_turn: int = 3, obs_tokens: int = 2):
    """One row: each bot turn `tokens_per_turn` action tokens, its reward on the last, then observation tokens."""
    rewards, actions, ends = [], [], []
    for r in turn_rewards:
        rewards += [0.0] * (tokens_per_turn - 1) + [r] + [0.0] * obs_tokens
        actions += [1] * tokens_per_turn + [0] * obs_tokens
        ends += [False] * (tokens_per_turn - 1) + [True] + [False] * obs_tokens
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(actions), torch.tensor(ends)


def test_turn_discount_gives_the_design_returns_exactly():
    rows = [turn_layout(r) for r in DESIGN_TURNS]
    rewards, actions, ends = (torch.stack(x) for x in zip(*rows))
    _, returns = action_gae(rewards, torch.zeros_like(rewards), actions, gamma=0.9, lam=1.0, turn_ends=ends)
    assert returns[:, 0].tolist() == pytest.approx([6.03148, 6.79706], abs=1e-12)
    # every token of a turn has that turn's return (gamma is 1 inside a turn); observations get 0
    assert returns[0, :3].tolist() == pytest.approx([6.03148] * 3, abs=1e-12)
    assert returns[0, 3:5].tolist() == [0.0, 0.0]
    assert returns[0, 5].item() == pytest.approx(1.2 + 0.9 * 1.7 + 0.81 * 1.5 + 0.729 * 1.8, abs=1e-12)


def test_token_discount_on_the_design_example():
    """With one-token turns the token discount is the turn discount: DESIGN.md's sums again; with three
    tokens a turn it discounts inside turns too, so the same rewards are worth less."""
    one = [turn_layout(r, tokens_per_turn=1) for r in DESIGN_TURNS]
    rewards, actions, _ = (torch.stack(x) for x in zip(*one))
    _, returns = action_gae(rewards, torch.zeros_like(rewards), actions, gamma=0.9, lam=1.0)
    assert returns[:, 0].tolist() == pytest.approx([6.03148, 6.79706], abs=1e-12)
    three = [turn_layout(r, tokens_per_turn=3) for r in DESIGN_TURNS]
    rewards, actions, _ = (torch.stack(x) for x in zip(*three))
    _, returns = action_gae(rewards, torch.zeros_like(rewards), actions, gamma=0.9, lam=1.0)
    # reward k sits on action token 3k + 2 of the episode: G_0 = sum_k 0.9 ** (3k + 2) * r_k
    expected = [sum(0.9 ** (3 * k + 2) * r for k, r in enumerate(turns)) for turns in DESIGN_TURNS]
    assert returns[:, 0].tolist() == pytest.approx(expected, abs=1e-12)


def test_token_discount_counts_every_action_token_but_no_observation():
    rewards, actions, _ = turn_layout([1.0, 2.0], tokens_per_turn=2, obs_tokens=3)
    _, returns = action_gae(rewards[None], torch.zeros(1, 10, dtype=torch.float64), actions[None], gamma=0.5, lam=1.0)
    # action tokens at 0, 1 (reward 1 on 1) and 5, 6 (reward 2 on 6): G_0 = 0 + .5*1 + .25*0 + .125*2
    assert returns[0, 0].item() == pytest.approx(0.5 * 1.0 + 0.125 * 2.0)
    assert returns[0, 1].item() == pytest.approx(1.0 + 0.5 * 0 + 0.25 * 2.0)


def test_values_at_observation_positions_do_not_matter():
    rewards, actions, ends = turn_layout([1.0, 0.5], tokens_per_turn=2, obs_tokens=2)
    values = torch.tensor([0.3, 0.2, 9.0, -7.0, 0.4, 0.1, 5.0, 5.0], dtype=torch.float64)
    other = values.clone()
    other[[2, 3, 6, 7]] = torch.tensor([-100.0, 3.0, 42.0, 0.0], dtype=torch.float64)
    a1, r1 = action_gae(rewards[None], values[None], actions[None], 0.9, 0.8, turn_ends=ends[None])
    a2, r2 = action_gae(rewards[None], other[None], actions[None], 0.9, 0.8, turn_ends=ends[None])
    assert torch.equal(a1, a2) and torch.equal(r1, r2)
    # by hand, action tokens 0, 1 | 4, 5 with gamma 1 inside a turn, 0.9 across, lam 0.8:
    # d5 = 0.5 - 0.1 = 0.4                      A5 = 0.4
    # d4 = 0 + 1*0.1 - 0.4 = -0.3               A4 = -0.3 + 0.8*0.4 = 0.02
    # d1 = 1.0 + 0.9*0.4 - 0.2 = 1.16           A1 = 1.16 + 0.9*0.8*0.02 = 1.1744
    # d0 = 0 + 1*0.2 - 0.3 = -0.1               A0 = -0.1 + 0.8*1.1744 = 0.83952
    assert a1[0].tolist() == pytest.approx([0.83952, 1.1744, 0, 0, 0.02, 0.4, 0, 0], abs=1e-12)


def test_cut_episode_bootstraps_from_the_next_state_value():
    rewards, actions, ends = turn_layout([1.0], tokens_per_turn=2, obs_tokens=2)
    values = torch.tensor([[0.5, 0.25, 0.0, 0.0]], dtype=torch.float64)
    _, done = action_gae(rewards[None], values, actions[None], 0.9, 1.0, turn_ends=ends[None])
    _, cut = action_gae(rewards[None], values, actions[None], 0.9, 1.0, turn_ends=ends[None],
                        final_values=torch.tensor([2.0], dtype=torch.float64))
    assert done[0, :2].tolist() == pytest.approx([1.0, 1.0])
    assert cut[0, :2].tolist() == pytest.approx([1.0 + 0.9 * 2.0] * 2)


def test_single_turn_equals_compute_gae():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] + [0] * 6, [0] * 7])
    a1, r1 = compute_gae(rewards, values, mask, 0.95, 0.9)
    a2, r2 = action_gae(rewards, values, mask, 0.95, 0.9)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)
