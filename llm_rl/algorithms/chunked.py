"""Log-probs and entropy of the sampled tokens straight from the hidden states an lm head reads, in chunks.

`logprobs_from_logits` and `entropy_from_logits` (llm_rl.algorithms.ops) take the full (batch, len, vocab)
logits, so memory grows with length x vocab, and autograd keeps those logits (and their softmax) for the
backward. `chunked_logprobs_and_entropy` takes the hidden states (batch, len, hidden) and the head's
weight instead: each chunk of positions gets its logits, the statistics PPO reads and nothing else; the
backward recomputes each chunk's logits (a `torch.autograd.Function`), so no (batch, len, vocab) tensor
exists at once, in the forward or the backward. Same numbers as the unchunked formulas, to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from llm_rl.algorithms.ops import ENTROPY_CHUNK_ELEMENTS, _compute_dtype

Tensor = torch.Tensor


def chunked_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    tokens: Tensor,
    temperature: float = 1.0,
    post: Optional[Callable[[Tensor], Tensor]] = None,
    chunk_size: Optional[int] = None,
    entropy: bool = True,
    entropy_grad: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-prob of each token and the entropy, from the hidden states the lm head reads.

    hidden ``(..., hidden)``, weight ``(vocab, hidden)``, bias ``(vocab,)`` or None, tokens ``(...)`` long.
    ``logits = post(hidden @ weight.T + bias)`` (``post``: what the architecture does after its head, e.g.
    softcapping; None: nothing), ``z = logits / T`` in at least float32 (half precision is upcast, as
    ``logprobs_from_logits`` does). Returns ``(logprobs (...), entropy (...) or None)``:
    ``log pi(tok) = z[tok] - logsumexp(z)`` and ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` (``-inf``
    logits allowed), float32 (float64 for float64 inputs).

    ``chunk_size``: positions (of the flattened leading dims) per chunk; default: about
    ``ENTROPY_CHUNK_ELEMENTS`` logits per chunk. The backward recomputes each chunk's logits, so only
    one chunk's ``(chunk, vocab)`` temporaries exist at a time. ``entropy=False``: no entropy (None);
    ``entropy_grad=False``: the entropy is a value without a gradient (no graph is kept for it).
    Differentiable in hidden, weight and bias; autocast, when on, applies to the head as in the model.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        chunk_size = ENTROPY_CHUNK_ELEMENTS // max(weight.shape[0], 1)
    shape = tokens.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    logprobs, ent = _ChunkedHead.apply(
        flat_hidden, weight, bias, tokens.reshape(-1).long(), float(temperature), post, max(int(chunk_size), 1),
        entropy, entropy_grad,
    )
    return logprobs.view(shape), (ent.view(shape) if entropy else None)


def chunk_statistics(
    x: Tensor, tokens: Tensor, temperature: float, post: Optional[Callable], entropy: bool
) -> tuple[Tensor, Optional[Tensor]]:
    """(chunk, vocab) head outputs ``x`` (before ``post``) -> log-probs of ``tokens`` and the entropy (or None)."""
    logits = post(x) if post is not None else x
    z = logits.to(_compute_dtype(logits.dtype))
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logprobs = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
    if not entropy:
        return logprobs, None
    # p * z with z = -inf and p = 0 is NaN (also in backward): those logits become 0, their p is 0 anyway
    z_finite = z.masked_fill(torch.isneginf(z), 0.0)
    return logprobs, lse - (torch.softmax(z, dim=-1) * z_finite).sum(dim=-1)


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    kind = device.type
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


class _ChunkedHead(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) | None, tokens (N,) -> log-probs (N,), entropy (N,) (empty
    without entropy). The backward runs chunk by chunk: logits again, the gradient of the chunk's
    statistics w.r.t. them (autograd, through `post`), then the head's linear backward by hand,
    accumulated into one weight gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, post, chunk_size, entropy, entropy_grad):
        ctx.set_materialize_grads(False)
        logprobs, entropies = [], []
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            lp, ent = chunk_statistics(F.linear(hidden[rows], weight, bias), tokens[rows], temperature, post, entropy)
            logprobs.append(lp)
            entropies.append(ent)
        dtype = _compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        logprobs = torch.cat(logprobs) if logprobs else hidden.new_zeros(0, dtype=dtype)
        ent = torch.cat(entropies) if entropy and entropies else logprobs.new_zeros(0)
        if not (entropy and entropy_grad):
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(hidden, weight, bias, tokens)
        ctx.settings = (temperature, post, chunk_size, entropy and entropy_grad, _autocast_state(hidden.device))
        return logprobs, ent

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, tokens = ctx.saved_tensors
        temperature, post, chunk_size, entropy_grad, (kind, autocast, autocast_dtype) = ctx.settings
        if not entropy_grad:
            grad_entropy = None
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if (grad_logprobs is None and grad_entropy is None) or not (needs_hidden or needs_weight or needs_bias):
            return (None,) * 9
        grads = _HeadGradients(hidden, weight, bias, needs_hidden, needs_weight, needs_bias)
        with torch.enable_grad(), torch.autocast(kind, dtype=autocast_dtype, enabled=autocast):
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                x = F.linear(hidden[rows].detach(), weight.detach(), None if bias is None else bias.detach())
                x.requires_grad_(True)
                lp, ent = chunk_statistics(x, tokens[rows], temperature, post, grad_entropy is not None)
                total = 0.0
                if grad_logprobs is not None:
                    total = (lp * grad_logprobs[rows]).sum()
                if grad_entropy is not None:
                    total = total + (ent * grad_entropy[rows]).sum()
                (grad_x,) = torch.autograd.grad(total, x)
                grads.add(rows, grad_x)
        return grads.hidden, grads.weight, grads.bias, None, None, None, None, None, None


class _HeadGradients:
    """The linear head's backward, chunk by chunk: d hidden per chunk, d weight and d bias summed over chunks
    (in the parameters' dtype). Under autocast the products run in the head's compute dtype, as autograd's."""

    def __init__(self, hidden, weight, bias, needs_hidden, needs_weight, needs_bias):
        self.hidden_rows = hidden
        self.weight_value = weight
        self.hidden = torch.empty_like(hidden) if needs_hidden else None
        self.weight = torch.zeros_like(weight) if needs_weight else None
        self.bias = torch.zeros_like(bias) if needs_bias and bias is not None else None
        self._cast_weight = None

    def add(self, rows: slice, grad_x: Tensor) -> None:
        dtype = grad_x.dtype
        if self.hidden is not None:
            if self._cast_weight is None:  # one cast of the weight for every chunk
                self._cast_weight = self.weight_value.detach().to(dtype)
            self.hidden[rows] = (grad_x @ self._cast_weight).to(self.hidden.dtype)
        if self.weight is not None:
            h = self.hidden_rows[rows].detach().to(dtype)
            if dtype == self.weight.dtype:
                self.weight.addmm_(grad_x.T, h)
            else:
                self.weight.add_(grad_x.T @ h)
        if self.bias is not None:
            self.bias.add_(grad_x.sum(dim=0).to(self.bias.dtype))
