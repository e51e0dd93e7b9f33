"""The built-in dialogue task: the scripted user's rewards, and the exact expected return the demo
compares the value head with (checked against a Monte Carlo estimate)."""

from __future__ import annotations

import torch

from llm_rl.tasks import arithmetic, dialogue


def test_debug_user_rewards_favour_asking_only_when_far_sighted():
    user = dialogue.DebugUser()
    assert user.reset({"bug": "37", "line": "5"}) == "b37>"
    assert user.step("a") == ("t5>", dialogue.ASK_REWARD, False)
    assert user.step("5") == (None, dialogue.FIX_REWARD, True)
    user.reset({"bug": "37", "line": "5"})
    assert user.step("x") == ("?>", 0.0, False)  # confused, the bot may try again
    assert user.step("p") == (None, dialogue.POLITE_REWARD, True)
    ask, polite = dialogue.ASK_REWARD + 0.9 * dialogue.FIX_REWARD, dialogue.POLITE_REWARD
    assert ask > polite and dialogue.ASK_REWARD < polite  # far-sighted asks, myopic apologises


def test_exact_return_matches_monte_carlo():
    """The tree walk against 4000 sampled episodes of a briefly warm-started model. Rewards are >= 0 and an
    episode returns at most 1.75, so the true value lies in [exact, exact + 1.75 * dropped mass]."""
    tokenizer = dialogue.build_tokenizer()
    torch.manual_seed(0)
    lm = arithmetic.build_model(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=32)
    train, _ = dialogue.make_rows(0)
    dialogue.supervised_warm_start(lm, tokenizer, train, steps=250, batch_size=32)
    row = {"bug": "42", "line": "3"}
    exact, dropped = dialogue.exact_return(lm, tokenizer, row, gamma=0.9, prune=1e-5)
    assert dropped < 0.05
    torch.manual_seed(1)
    sampled = dialogue.behaviour(lm, tokenizer, [row] * 4000, greedy=False, gamma=0.9)
    assert 0.2 < sampled["ask_rate"] < 0.8  # both behaviours take part
    # 4000 episodes: a standard error under 0.015
    assert exact - 0.05 <= sampled["return"] <= exact + 1.75 * dropped + 0.05
