"""Score shaping (llm_rl.algorithms.scores) by hand: the sequence score and the KL penalty placed on the
response tokens (`token_rewards`), and scaling, clipping and the missing-EOS penalty (`shape_scores`)."""

import torch

from llm_rl.algorithms.scores import shape_scores, token_rewards

# ----------------------------------------------------------------- token_rewards


def test_token_rewards_hand_computed():
    scores = torch.tensor([1.0, 2.0, 3.0, -1.0])
    kl = torch.tensor(
        [
            [0.1, 0.2, 0.3],
            [0.4, 0.5, 100.0],  # 100 sits on a pad position: it must not leak
            [7.0, 8.0, 9.0],  # no response tokens at all
            [0.6, -50.0, -50.0],  # one token (e.g. an immediate EOS)
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    expected = torch.tensor(
        [
            [-0.05, -0.10, -0.15 + 1.0],
            [-0.20, -0.25 + 2.0, 0.0],
            [0.0, 0.0, 0.0],
            [-0.30 - 1.0, 0.0, 0.0],
        ]
    )
    rewards = token_rewards(scores, kl, mask, beta=0.5)
    torch.testing.assert_close(rewards, expected, atol=1e-6, rtol=0)
    # bool masks give the same result
    torch.testing.assert_close(token_rewards(scores, kl, mask.bool(), beta=0.5), expected, atol=1e-6, rtol=0)
    # inputs are not modified
    assert kl[1, 2] == 100.0


def test_token_rewards_beta_zero_is_score_on_last_token():
    rewards = token_rewards(
        torch.tensor([5.0]), torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1, 1, 0, 0]]), 0.0
    )
    assert rewards.tolist() == [[0.0, 5.0, 0.0, 0.0]]


# ----------------------------------------------------------------- shape_scores


def test_shape_scores_scale_clip_penalty():
    scores = torch.tensor([2.0, -3.0, 0.5, 4.0])
    ended = torch.tensor([True, False, False, True])
    # scale: [4, -6, 1, 8]; clip to [-5, 5]: [4, -5, 1, 5]; penalty 1 on rows that never stopped
    out = shape_scores(scores, ended, scale=2.0, clip=5.0, missing_eos_penalty=1.0)
    assert out.tolist() == [4.0, -6.0, 0.0, 5.0]
    assert shape_scores(scores, ended).tolist() == [2.0, -3.0, 0.5, 4.0]
    assert shape_scores(scores, ended, scale=0.5).tolist() == [1.0, -1.5, 0.25, 2.0]
    assert shape_scores(scores, ended, clip=1.0).tolist() == [1.0, -1.0, 0.5, 1.0]
    assert shape_scores(scores, ended.long(), missing_eos_penalty=2.5).tolist() == [2.0, -5.5, -2.0, 4.0]
