"""Masked reductions and log-prob / entropy helpers for token-level RL.

Every function takes a ``mask`` marking which positions are real tokens
(1 / True) and which are padding (0 / False). Masks may be bool or 0/1 float;
they are cast to the data dtype inside, so callers never need to convert.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch

Tensor = torch.Tensor

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is 1.

    x, mask: same shape, e.g. ``(batch, resp_len)``.
    dim=None sums every element (scalar); otherwise reduces ``dim``.
    """
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum()
    return (x * m).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    ``sum(x * m) / max(sum(m), 1)``. The count is clamped at 1 so a row (or a
    whole batch) without any valid position yields 0 instead of 0/0 = NaN;
    that keeps losses and logged statistics finite when a response is empty.
    """
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all valid positions (one global scalar).

    ``var = sum(m * (x - mean)^2) / d`` with ``d = n - 1`` (Bessel correction)
    when ``unbiased`` else ``d = n``, where ``n = sum(m)``.

    Degenerate cases return 0 rather than NaN: with n == 0 nothing is valid,
    and with n == 1 (unbiased) a single sample carries no spread information.
    Both fall out of clamping ``d`` at 1 since the squared deviations are 0.
    """
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    sq_dev = ((x - mean) ** 2 * m).sum()
    denom = (n - 1) if unbiased else n
    return sq_dev / denom.clamp(min=1)


def masked_moments(x: Tensor, mask: Tensor) -> Tensor:
    """``(3,)`` float64: the sum, the sum of squares and the count of ``x`` over valid positions;
    they add up across processes, so a global mean and variance need one all-reduce of them."""
    m = mask.to(torch.float64)
    x = x.to(torch.float64)
    return torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])


def masked_mean_var(x: Tensor, mask: Tensor, reduce=None) -> tuple[Tensor, Tensor]:
    """The mean and unbiased variance of ``x`` over its valid positions, two scalars of ``x``'s dtype.
    ``reduce``: a function that sums a tensor over processes (``lambda t: accelerator.reduce(t, "sum")``);
    with it they are those of the valid positions of every process, whatever the split."""
    if reduce is None:
        m = mask.to(x.dtype)
        return masked_mean(x, m), masked_var(x, m, unbiased=True)
    total, total_sq, n = reduce(masked_moments(x, mask)).tolist()
    mean = total / max(n, 1.0)
    var = max(total_sq - n * mean * mean, 0.0) / max(n - 1, 1.0)
    return (torch.tensor(mean, dtype=x.dtype, device=x.device), torch.tensor(var, dtype=x.dtype, device=x.device))


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce=None
) -> Tensor:
    """Normalise ``x`` to unit variance using statistics of valid positions only.

    ``y = (x - mean) * rsqrt(var + eps)`` with the unbiased masked variance.
    With ``shift_mean=False`` the original mean is added back,
    ``y = (x - mean) * rsqrt(var + eps) + mean``, i.e. only the scale changes
    (useful for rewards, whose sign carries meaning).
    Padding positions are returned as 0 so they cannot leak into later sums.
    ``reduce``: statistics over every process (`masked_mean_var`), so the result does
    not depend on how a batch is split over processes.
    """
    mean, var = masked_mean_var(x, mask, reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision softmax statistics lose several digits, so work in at
    # least float32; float64 inputs stay float64.
    return torch.promote_types(dtype, torch.float32)


def logprobs_from_logits(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0
) -> Tensor:
    """Log-probability of each chosen token under ``softmax(logits / T)``.

    logits: ``(batch, len, vocab)``; tokens: ``(batch, len)`` long.
    Returns ``(batch, len)``: ``log pi(tok) = z[tok] - logsumexp(z)``, z = logits / T.

    Memory: a full ``(batch, len, vocab)`` log-softmax is never materialised
    for fp32/fp64 (``logsumexp`` reduces directly). For bf16/fp16, the
    log-softmax is computed in float32 one batch row at a time, which is
    accurate and only ever holds a ``(len, vocab)`` float32 buffer.
    Half-precision inputs therefore return float32. Differentiable.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    index = tokens.long().unsqueeze(-1)

    if logits.dtype in _HALF_DTYPES:
        rows = []
        for row_logits, row_index in zip(logits, index, strict=True):
            # Upcast before dividing by T: a half-precision division would
            # round every logit a second time.
            z = row_logits.float()
            if temperature != 1.0:
                z = z / temperature
            row_logp = torch.log_softmax(z, dim=-1)
            rows.append(row_logp.gather(-1, row_index).squeeze(-1))
        return torch.stack(rows)

    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, index).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


ENTROPY_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of entropy_from_logits: 64 MB of float32 temporaries


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of the categorical ``softmax(logits / T)`` at each position.

    logits: ``(batch, len, vocab)`` -> ``(batch, len)``.
    ``H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v`` with z = logits / T;
    this form avoids ``log(p)`` of tiny probabilities. Computed in (at least)
    float32 a few batch rows at a time (``ENTROPY_CHUNK_ELEMENTS`` logits, at
    least one row) to bound the extra memory; small logits go in one chunk,
    so that a batch costs a handful of ops rather than a handful per row.
    Logits of ``-inf`` (banned tokens) are supported.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(logits.dtype)
    per_row = max(logits[0].numel(), 1) if len(logits) else 1
    rows = []
    for row in logits.split(max(ENTROPY_CHUNK_ELEMENTS // per_row, 1)):
        z = row.to(dtype)
        if temperature != 1.0:
            z = z / temperature
        probs = torch.softmax(z, dim=-1)
        # p * z with z = -inf and p = 0 is NaN (also in backward), so replace
        # those logits by 0: their probability is exactly 0 anyway.
        z_finite = z.masked_fill(torch.isneginf(z), 0.0)
        rows.append(torch.logsumexp(z, dim=-1) - (probs * z_finite).sum(dim=-1))
    return torch.cat(rows) if rows else logits.new_zeros(logits.shape[:-1], dtype=dtype)


def select_rows(batch, rows: torch.Tensor, width: Optional[int], prompt_fields: tuple[str, ...] = ()) -> dict:
    """The tensor fields of the dataclass `batch` at `rows`, as a dict; per-token fields (all 2-D ones but
    `prompt_fields`) keep their first `width` response columns (all with None)."""
    out = {}
    for f in fields(batch):
        tensor = getattr(batch, f.name)
        if isinstance(tensor, torch.Tensor):
            tensor = tensor[rows]
            if width is not None and tensor.dim() == 2 and f.name not in prompt_fields:
                tensor = tensor[:, :width]
            out[f.name] = tensor
    return out


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align token lists for generation: (ids (batch, longest), mask (batch, longest))."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, longest - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, longest - len(seq) :] = 1
    return ids, mask


def right_pad(rows: list[list], width: int, fill, dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out
