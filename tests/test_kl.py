import pytest
import torch

from llm_rl.kl import AdaptiveKLController, FixedKLController, kl_penalty

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


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_above_target_is_clipped():
    # error = clip(12/6 - 1, -0.2, 0.2) = 0.2 -> 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    # Compounds: 0.100512 * 1.00512 = 0.101026621...
    ctl.update(current_kl=12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.101026621, abs=1e-9)


def test_adaptive_kl_below_target_is_clipped():
    # error = clip(3/6 - 1) = clip(-0.5) = -0.2 -> 0.1 * (1 - 0.00512) = 0.099488
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(3.0, 256)
    assert ctl.value == pytest.approx(0.099488, abs=1e-12)


def test_adaptive_kl_inside_clip_band():
    # error = 6.6/6 - 1 = 0.1 -> 0.1 * (1 + 0.1 * 256 / 10000) = 0.100256
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(torch.tensor(6.6), 256)  # tensors accepted too
    assert ctl.value == pytest.approx(0.100256, abs=1e-9)


def test_adaptive_kl_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(12.0, 256)
    state = ctl.state_dict()
    restored = AdaptiveKLController(0.1, 6.0, 10000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    restored.update(12.0, 256)
    ctl.update(12.0, 256)
    assert restored.value == ctl.value


@pytest.mark.parametrize("target,horizon", [(0.0, 100), (-1.0, 100), (6.0, 0), (6.0, -5)])
def test_adaptive_kl_validation(target, horizon):
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target, horizon)
