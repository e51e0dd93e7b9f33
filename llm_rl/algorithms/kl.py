"""KL estimators between the policy and a frozen reference model, and the
controllers that set the KL penalty coefficient (beta)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llm_rl.config import variants
from llm_rl.config.variants import default_kl_estimator, kl_estimators_for

Tensor = torch.Tensor

KL_ESTIMATORS = tuple(variants.KL_ESTIMATORS)
# estimators whose expected gradient, as a loss term, is the gradient of a KL: k2 of KL(pi || pi_ref),
# k3 of KL(pi_ref || pi) (see `kl_penalty`); k1's is 0 and abs's is no KL's
KL_LOSS_ESTIMATORS = tuple(kl_estimators_for("loss"))

# each estimator's per-token term of r = logprobs - ref_logprobs, keyed by its name in the config's variant table
_KL_TERMS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda r: r,
    "k2": lambda r: 0.5 * r.square(),
    "k3": lambda r: torch.expm1(-r) + r,  # with samples from pi, exp(-r) = pi_ref / pi is the density ratio
    "abs": lambda r: r.abs(),
}
assert set(_KL_TERMS) == set(KL_ESTIMATORS), "kl._KL_TERMS and config KL_ESTIMATORS disagree"


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, estimator: str = default_kl_estimator("reward"), mask: Tensor | None = None
) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens.

    logprobs, ref_logprobs: ``(batch, resp_len)`` log-probs of the sampled
    tokens under the policy and the reference. With ``r = logprobs - ref_logprobs``,
    ``estimator`` (one of `KL_ESTIMATORS`; default: the one of the reward) is

    - ``k1``: ``r`` (unbiased, high variance, can be negative per token)
    - ``k2``: ``0.5 * r**2`` (biased, low variance, always >= 0)
    - ``k3``: ``exp(-r) - 1 + r`` (unbiased and always >= 0)
    - ``abs``: ``|r|``

    ``mask`` ``(batch, resp_len)``: positions outside it are 0. ``r`` is zeroed
    there *before* any ``exp``, so the arbitrary log-probs of padding can never
    overflow (``inf * 0`` would be NaN in the forward and the backward).

    As a loss term (differentiated w.r.t. the policy, samples from the policy):
    ``E[grad k2] = E[r * grad log pi] = grad KL(pi || pi_ref)`` exactly;
    ``E[grad k1] = E[grad log pi] = 0`` (no pull to the reference at all);
    ``E[grad k3] = -sum_a pi_ref(a) grad log pi(a) = grad KL(pi_ref || pi)``,
    the gradient of the *forward* KL (GRPO's choice), not of the KL above;
    ``abs`` is the gradient of no KL. See `KL_LOSS_ESTIMATORS`.

    References: J. Schulman, "Approximating KL Divergence" (2020),
    http://joschu.net/blog/kl-approx.html; Tang & Munos 2025, "On a few
    pitfalls in KL divergence gradient estimation for RL".
    """
    term = _KL_TERMS.get(estimator)
    if term is None:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; valid estimators: {', '.join(KL_ESTIMATORS)}"
        )
    r = logprobs - ref_logprobs
    if mask is not None:
        r = torch.where(mask.bool(), r, torch.zeros_like(r))
    return term(r)


class FixedKLController:
    """Constant KL coefficient: ``value`` never changes."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def adapt(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so both controllers share one interface."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards ``target``.

    ``error = clip(current_kl / target - 1, -0.2, 0.2)``
    ``value <- value * (1 + error * n_steps / horizon)``

    The clip limits how fast beta moves on a noisy KL estimate; ``horizon``
    (in samples) sets how many samples it takes to close the gap.
    Reference: Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", Section 2.2.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if target is None or target <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0, got {target}")
        if horizon is None or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs horizon > 0, got {horizon}")
        if init_beta < 0:
            raise ValueError(f"AdaptiveKLController needs init_beta >= 0, got {init_beta}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def adapt(self, current_kl: float, n_steps: int) -> None:
        """Adjust ``value`` after ``n_steps`` samples that had mean KL ``current_kl``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        # Only beta is state; target/horizon come from the (possibly edited) config.
        self.value = float(state["value"])
