"""chunked_logprobs_and_entropy: the log-probs and entropy of the unchunked formulas (logprobs_from_logits,
entropy_from_logits on post(hidden @ W.T + b)), values and gradients, from the hidden states in chunks."""

import math

import pytest
import torch
from conftest import close

from llm_rl.algorithms.chunked import chunked_logprobs_and_entropy
from llm_rl.algorithms.ops import entropy_from_logits, logprobs_from_logits

LN3, LN5 = math.log(3.0), math.log(5.0)
NEG_INF = float("-inf")

# vocab 4, hidden 2: logits = [0, h0, h1, -inf] (the bias bans token 3)
HAND_WEIGHT = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
HAND_BIAS = torch.tensor([0.0, 0.0, 0.0, NEG_INF])
# position 0: logits [0, 0, 0, -inf], uniform over 3; position 1: [0, ln 3, 0, -inf], probs [1/5, 3/5, 1/5, 0]
HAND_HIDDEN = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]])
HAND_TOKENS = torch.tensor([[2, 1]])
H_POSITION_1 = 0.4 * LN5 + 0.6 * math.log(5 / 3)  # -(2/5 ln 1/5 + 3/5 ln 3/5) = 0.950271


def softcap(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x / 2.0) * 2.0


def unchunked(hidden, weight, bias, tokens, temperature, post=None):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = post(logits) if post is not None else logits
    return logprobs_from_logits(logits, tokens, temperature), entropy_from_logits(logits, temperature)


def random_case(seed=0, batch=3, length=7, hidden=5, vocab=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(batch, length, hidden, generator=g, dtype=dtype) * 2).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_()
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    return h, w, b, tokens


def gradients(outputs, inputs, seed=1):
    """d(sum_i a_i lp_i + c_i H_i)/d inputs for random weights a, c (the same for every call with one seed)."""
    g = torch.Generator().manual_seed(seed)
    total = sum((out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() for out in outputs)
    return torch.autograd.grad(total, inputs)


def test_hand_values():
    logprobs, entropy = chunked_logprobs_and_entropy(HAND_HIDDEN, HAND_WEIGHT, HAND_BIAS, HAND_TOKENS, chunk_size=1)
    close(logprobs, [[-LN3, math.log(0.6)]])
    close(entropy, [[LN3, H_POSITION_1]])


def test_temperature_hand_values():
    # [2 ln 3, 0] / T=2 -> the logits of position 1 above
    hidden = torch.tensor([[[2 * LN3, 0.0]]])
    logprobs, entropy = chunked_logprobs_and_entropy(hidden, HAND_WEIGHT, HAND_BIAS, torch.tensor([[1]]), 2.0)
    close(logprobs, [[math.log(0.6)]])
    close(entropy, [[H_POSITION_1]])


def test_gradient_hand_values():
    # d log p(1) / d logits = onehot(1) - p = [-1/5, 2/5, -1/5, 0]; d / d hidden = W.T @ that = [2/5, -1/5]
    hidden = HAND_HIDDEN[:, 1:].clone().requires_grad_()
    logprobs, _ = chunked_logprobs_and_entropy(hidden, HAND_WEIGHT, HAND_BIAS, torch.tensor([[1]]))
    logprobs.sum().backward()
    close(hidden.grad, [[[0.4, -0.2]]])


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 21, 1000])  # 21 positions: 5 does not divide them
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("post", [None, softcap], ids=["plain", "softcap"])
def test_values_and_gradients_equal_the_unchunked_formula(chunk_size, temperature, post):
    h, w, b, tokens = random_case()
    expected = unchunked(h, w, b, tokens, temperature, post)
    got = chunked_logprobs_and_entropy(h, w, b, tokens, temperature, post, chunk_size)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    for a, e in zip(gradients(got, (h, w, b)), gradients(expected, (h, w, b))):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


def test_gradcheck():
    h, w, b, tokens = random_case(batch=2, length=3, hidden=3, vocab=5)
    assert torch.autograd.gradcheck(lambda h, w, b: chunked_logprobs_and_entropy(h, w, b, tokens, 0.8, softcap, 2),
                                    (h, w, b))


def test_banned_tokens_and_padding_rows():
    """-inf logits (a banned token, as a -inf bias gives) and padding rows (zero hidden states, pad token 0,
    no gradient flowing in): finite entropy and gradients, equal to the unchunked formula."""
    h, w, b, tokens = random_case(seed=3)
    bias = b.detach().clone()
    bias[4] = NEG_INF
    bias.requires_grad_()
    with torch.no_grad():
        h[2, 4:] = 0.0  # padding rows
    tokens = tokens.masked_fill(tokens == 4, 0)
    tokens[2, 4:] = 0
    mask = torch.ones_like(tokens, dtype=torch.float64)
    mask[2, 4:] = 0.0
    expected = unchunked(h, w, bias, tokens, 0.9)
    got = chunked_logprobs_and_entropy(h, w, bias, tokens, 0.9, chunk_size=4)
    assert all(torch.isfinite(t).all() for t in got)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    masked = lambda outs: [out * mask for out in outs]  # noqa: E731
    grads = gradients(masked(got), (h, w, bias))
    for a, e in zip(grads, gradients(masked(expected), (h, w, bias))):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)
    assert grads[0][2, 4:].abs().max() == 0  # nothing flows into padding


def test_entropy_without_gradient_keeps_no_graph_for_it():
    h, w, b, tokens = random_case()
    logprobs, entropy = chunked_logprobs_and_entropy(h, w, b, tokens, entropy_grad=False)
    assert logprobs.requires_grad and not entropy.requires_grad
    torch.testing.assert_close(entropy, unchunked(h, w, b, tokens, 1.0)[1].detach(), atol=1e-12, rtol=0)
    only_logprobs = gradients([logprobs], (h, w, b))
    expected = gradients([unchunked(h, w, b, tokens, 1.0)[0]], (h, w, b))
    for a, e in zip(only_logprobs, expected):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)
    logprobs, entropy = chunked_logprobs_and_entropy(h, w, b, tokens, entropy=False)
    assert entropy is None and logprobs.shape == tokens.shape


def test_no_vocab_sized_activation_is_saved_for_backward():
    """What autograd keeps is the hidden states, the head's weight and bias and the tokens: no tensor of
    (positions x vocab) elements, which is what the unchunked formula keeps."""
    h, w, b, tokens = random_case(batch=4, length=32, hidden=3, vocab=50)
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_logprobs_and_entropy(h, w, b, tokens, chunk_size=8)
    assert sizes and max(sizes) < 4 * 32 * 50 // 8  # (128 x 3) hidden, (50 x 3) weight, ...
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unchunked(h, w, b, tokens, 1.0)
    assert max(sizes) >= 4 * 32 * 50  # control: the full logits


def test_frozen_head_and_frozen_hidden():
    """Only the inputs that need a gradient get one (LoRA: a frozen head; a frozen backbone: no hidden grad)."""
    h, w, b, tokens = random_case()
    frozen_w, frozen_b = w.detach(), b.detach()
    (grad_h,) = gradients(chunked_logprobs_and_entropy(h, frozen_w, frozen_b, tokens, chunk_size=3), (h,))
    (expected,) = gradients(unchunked(h, frozen_w, frozen_b, tokens, 1.0), (h,))
    torch.testing.assert_close(grad_h, expected, atol=1e-12, rtol=1e-10)
    grad_w, grad_b = gradients(chunked_logprobs_and_entropy(h.detach(), w, b, tokens, chunk_size=3), (w, b))
    expected = gradients(unchunked(h.detach(), w, b, tokens, 1.0), (w, b))
    torch.testing.assert_close(grad_w, expected[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad_b, expected[1], atol=1e-12, rtol=1e-10)
    logprobs, _ = chunked_logprobs_and_entropy(h, w, None, tokens)  # no bias
    torch.testing.assert_close(logprobs, unchunked(h, w, None, tokens, 1.0)[0], atol=1e-12, rtol=0)


def test_half_precision_statistics_in_float32():
    """bf16 hidden states and head: the logits are bf16 (as the model's), their softmax statistics float32,
    as logprobs_from_logits computes them; gradients in the inputs' dtype."""
    h, w, b, tokens = (t.detach().to(torch.bfloat16).requires_grad_() if t.is_floating_point() else t
                       for t in random_case(dtype=torch.float32))
    got = chunked_logprobs_and_entropy(h, w, b, tokens, 0.8, softcap, chunk_size=4)
    expected = unchunked(h, w, b, tokens, 0.8, softcap)
    assert got[0].dtype == got[1].dtype == torch.float32
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    for a, e in zip(gradients(got, (h, w, b)), gradients(expected, (h, w, b))):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), e.float(), atol=2e-2, rtol=2e-2)


def test_autocast_applies_to_the_head_in_forward_and_backward():
    """Under autocast (mixed precision) the head runs in the autocast dtype in the forward and in the
    recomputing backward, as the model's own head does; the float32 weight gets a float32 gradient."""
    h, w, b, tokens = (t.detach().float().requires_grad_() if t.is_floating_point() else t
                       for t in random_case(dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_logprobs_and_entropy(h, w, b, tokens, 0.8, chunk_size=4)
        expected = unchunked(h, w, b, tokens, 0.8)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    grads, expected_grads = gradients(got, (h, w, b)), gradients(expected, (h, w, b))
    for a, e in zip(grads, expected_grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, atol=5e-2, rtol=2e-2)


def test_empty_and_rejects_bad_temperature():
    h, w, b, tokens = random_case(length=0)
    logprobs, entropy = chunked_logprobs_and_entropy(h, w, b, tokens)
    assert logprobs.shape == entropy.shape == (3, 0)
    with pytest.raises(ValueError):
        chunked_logprobs_and_entropy(HAND_HIDDEN, HAND_WEIGHT, HAND_BIAS, HAND_TOKENS, temperature=0.0)
