import math

import pytest
import torch

from llm_rl.algorithms.kl import KL_LOSS_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty

# r = logprobs - ref_logprobs = [0.5, -1.0, 0.0]
LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-1.5, -1.0, -0.5]])


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected), atol=atol, rtol=0)


def test_k1():
    close(kl_penalty(LOGPROBS, REF, "k1"), [[0.5, -1.0, 0.0]])


def test_k2():
    # 0.5 * r^2
    close(kl_penalty(LOGPROBS, REF, "k2"), [[0.125, 0.5, 0.0]])


def test_k3():
    # exp(-0.5) - 1 + 0.5 = 0.106531;  exp(1) - 1 - 1 = e - 2 = 0.718282
    close(kl_penalty(LOGPROBS, REF, "k3"), [[0.106531, 0.718282, 0.0]])


def test_abs():
    close(kl_penalty(LOGPROBS, REF, "abs"), [[0.5, 1.0, 0.0]])


def test_default_is_k1():
    close(kl_penalty(LOGPROBS, REF), [[0.5, -1.0, 0.0]])


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="k1.*k2.*k3.*abs"):
        kl_penalty(LOGPROBS, REF, "k4")


def test_mask_is_applied_before_exp():
    """Padding holds arbitrary log-probs: r = -1000 there would make k3 = exp(1000) = inf, and inf * 0 = NaN."""
    logprobs = torch.tensor([[-1.0, -1000.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, 0.0]])
    mask = torch.tensor([[1, 0]])
    for estimator in ("k1", "k2", "k3", "abs"):
        kl = kl_penalty(logprobs, ref, estimator, mask)
        assert kl[0, 1] == 0.0 and torch.isfinite(kl).all(), estimator
        (kl * mask).sum().backward()
        assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 1] == 0.0, estimator
        logprobs.grad = None
    close(kl_penalty(logprobs.detach(), ref, "k3", mask), [[math.expm1(-0.5) + 0.5, 0.0]])


def expected_loss_gradient(estimator: str) -> torch.Tensor:
    """E_{a ~ pi}[grad k(a)], exactly, over a 3-token vocabulary: what a KL loss term pushes on average."""
    logits = torch.tensor([0.3, -0.2, 1.1], requires_grad=True)
    ref_logprobs = torch.log_softmax(torch.tensor([-0.5, 0.4, 0.2]), dim=-1)
    logprobs = torch.log_softmax(logits, dim=-1)
    per_action = kl_penalty(logprobs[None], ref_logprobs[None], estimator)[0]
    (logprobs.exp().detach() * per_action).sum().backward()  # samples from pi, not differentiated through
    return logits.grad, logits, ref_logprobs


def kl_gradient(forward: bool) -> torch.Tensor:
    _, logits, ref_logprobs = expected_loss_gradient("k1")
    logits = logits.detach().requires_grad_(True)
    logprobs = torch.log_softmax(logits, dim=-1)
    p, q = (ref_logprobs, logprobs) if forward else (logprobs, ref_logprobs)
    (p.exp() * (p - q)).sum().backward()
    return logits.grad


def test_as_a_loss_k2_has_the_kl_gradient_and_k1_none():
    """Tang & Munos 2025: E[grad k2] = grad KL(pi || ref); E[grad k1] = E[grad log pi] = 0;
    E[grad k3] = grad KL(ref || pi), the forward KL."""
    torch.testing.assert_close(expected_loss_gradient("k2")[0], kl_gradient(forward=False))
    torch.testing.assert_close(expected_loss_gradient("k1")[0], torch.zeros(3), atol=1e-7, rtol=0)
    torch.testing.assert_close(expected_loss_gradient("k3")[0], kl_gradient(forward=True))
    assert not torch.allclose(kl_gradient(forward=True), kl_gradient(forward=False))
    assert KL_LOSS_ESTIMATORS == ("k2", "k3")


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.adapt(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_above_target_is_clipped():
    # error = clip(12/6 - 1, -0.2, 0.2) = 0.2 -> 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    ctl.adapt(current_kl=12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    # Compounds: 0.100512 * 1.00512 = 0.101026621...
    ctl.adapt(current_kl=12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.101026621, abs=1e-9)


def test_adaptive_kl_below_target_is_clipped():
    # error = clip(3/6 - 1) = clip(-0.5) = -0.2 -> 0.1 * (1 - 0.00512) = 0.099488
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.adapt(3.0, 256)
    assert ctl.value == pytest.approx(0.099488, abs=1e-12)


def test_adaptive_kl_inside_clip_band():
    # error = 6.6/6 - 1 = 0.1 -> 0.1 * (1 + 0.1 * 256 / 10000) = 0.100256
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.adapt(torch.tensor(6.6), 256)  # tensors accepted too
    assert ctl.value == pytest.approx(0.100256, abs=1e-9)


def test_adaptive_kl_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.adapt(12.0, 256)
    state = ctl.state_dict()
    restored = AdaptiveKLController(0.1, 6.0, 10000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    restored.adapt(12.0, 256)
    ctl.adapt(12.0, 256)
    assert restored.value == ctl.value


@pytest.mark.parametrize("target,horizon", [(0.0, 100), (-1.0, 100), (6.0, 0), (6.0, -5)])
def test_adaptive_kl_validation(target, horizon):
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target, horizon)
