"""Return and advantage estimators.

Token-level tensors are ``(batch, resp_len)`` with a ``mask`` marking real
response tokens. Masks are expected to be right-padded (valid prefix, then
zeros after EOS); a masked position ends the episode, so nothing is
bootstrapped past the last valid token.

Critic-free estimators take one scalar score per completion, with the
completions of a prompt stored as consecutive rows: rows ``[0, g)`` belong to
prompt 0, rows ``[g, 2g)`` to prompt 1, and so on (``g = group_size``).
"""

from __future__ import annotations

import torch

from llm_rl.ops import masked_whiten

Tensor = torch.Tensor


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` over valid positions.

    rewards, mask: ``(batch, resp_len)`` -> ``(batch, resp_len)``.
    ``G_t = m_t * (r_t + gamma * G_{t+1})`` with ``G_{resp_len} = 0``: masked
    positions are 0 and the sum stops at the last valid token (no bootstrap).
    """
    m = mask.to(rewards.dtype)
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = m[:, t] * (rewards[:, t] + gamma * running)
        out.append(running)
    return torch.stack(out[::-1], dim=1)


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation.

    rewards, values, mask: ``(batch, resp_len)``. Returns ``(advantages, returns)``,
    both ``(batch, resp_len)``:

    ``delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t``
    ``A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}``
    ``returns_t = A_t + V_t``

    The value after the last valid token is taken as 0 (the episode ended), so
    values/rewards at padded positions never leak into valid ones; padded
    positions get advantage 0 and return 0.
    Reference: Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", eq. 16.
    """
    m = mask.to(values.dtype)
    resp_len = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advs = []
    # resp_len is short (hundreds), so a loop over time is cheap and keeps the
    # recursion readable; the batch dimension stays vectorised.
    for t in reversed(range(resp_len)):
        next_m = m[:, t + 1] if t + 1 < resp_len else torch.zeros_like(m[:, 0])
        delta = rewards[:, t] + gamma * next_m * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_m * next_adv
        next_value = values[:, t]
        advs.append(next_adv)
    advantages = torch.stack(advs[::-1], dim=1) * m
    returns = (advantages + values) * m
    return advantages, returns


def _grouped(scores: Tensor, group_size: int) -> Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (batch,), got shape {tuple(scores.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"batch size {scores.shape[0]} is not divisible by group_size {group_size}"
        )
    if not scores.is_floating_point():
        scores = scores.float()
    return scores.view(-1, group_size)


def grpo_advantages(scores: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Group-normalised advantages (GRPO outcome supervision).

    scores: ``(batch,)`` -> ``(batch,)``,
    ``A_i = (s_i - mean_group) / (std_group + eps)`` with the unbiased sample
    std of the group. A group of one, or a group whose scores are all equal,
    carries no learning signal and yields 0 (never NaN).
    Reference: Shao et al. 2024, "DeepSeekMath", Section 4.1.2.
    """
    groups = _grouped(scores, group_size)
    if group_size == 1:
        # The unbiased std of a single sample is undefined (0/0).
        return torch.zeros_like(groups).view(-1)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=True, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out advantages.

    scores: ``(batch,)`` -> ``(batch,)``,
    ``A_i = s_i - (1 / (g - 1)) * sum_{j != i} s_j``: the baseline for each
    sample is the mean of the other samples of its prompt, so it is
    independent of the sample itself (unbiased). ``group_size == 1`` has no
    other sample and returns 0.
    Reference: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
    Style Optimization for Learning from Human Feedback in LLMs".
    """
    groups = _grouped(scores, group_size)
    if group_size == 1:
        return torch.zeros_like(groups).view(-1)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).view(-1)


def reinforce_pp_advantages(
    rewards: Tensor, mask: Tensor, gamma: float = 1.0, eps: float = 1e-8
) -> Tensor:
    """REINFORCE++ advantages: batch-whitened discounted returns.

    rewards, mask: ``(batch, resp_len)`` per-token rewards (the caller has
    already folded in the per-token KL penalty) -> ``(batch, resp_len)``.
    ``A = whiten(G)`` where ``G_t = sum_{k>=t} gamma^(k-t) r_k`` and the mean
    and (unbiased) std are taken over every valid token in the batch, which
    replaces a critic with a global baseline. Padded positions are 0.
    Reference: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for
    Aligning Large Language Models".
    """
    returns = discounted_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask, shift_mean=True, eps=eps)


def prefix_diff_advantages(prefix_scores: Tensor, prompt_score: Tensor, mask: Tensor) -> Tensor:
    """Advantages as score increments of successive response prefixes.

    prefix_scores: ``(batch, resp_len)`` with ``Q_t = score(prompt + response[:t+1])``;
    prompt_score: ``(batch,)``, the score of the bare prompt (``Q_{-1}``).
    Returns ``(batch, resp_len)``: ``A_t = m_t * (Q_t - Q_{t-1})``, so each
    token is credited with how much it changed the score. The increments of
    the valid prefix telescope to ``Q_last - Q_{-1}``.
    """
    m = mask.to(prefix_scores.dtype)
    previous = torch.cat(
        [prompt_score.to(prefix_scores.dtype).unsqueeze(1), prefix_scores[:, :-1]], dim=1
    )
    return (prefix_scores - previous) * m
