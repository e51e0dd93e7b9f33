"""The same update at any scale: how a mini-batch is split over micro-batches and processes, and fp16 loss
scaling, must not change the maths.

One PPO update on a fixed 8-row rollout whose responses are 1 to 12 tokens long (tests/fixed_update.py)
gives the same parameters with gradient accumulation 1, 2 or 4 and with 1 or 2 processes (gloo on CPU);
the logged lr of every update is the same with 1 and 2 processes; an fp16 loss-scale overflow skips the
step instead of stopping the run.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import explain, launch_two_processes, reset_accelerate_state
from fixed_update import logged_lrs, make_trainer, one_update, relative_difference
from safetensors.torch import load_file

from llm_rl.training.ppo_trainer import SHARE_STATS, PPOTrainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds its own Accelerator

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "token_sum_over_max_length")  # micro_batch_token_mean: split-dependent
# same parameters to 1e-5 relative to the parameters; the difference relative to the update itself is what
# shows: 0.4 to 0.8 before the fix for accumulation 2 and 4, 2e-6 to 6e-6 after (float32 rounding)
PARAM_RTOL, UPDATE_RTOL = 1e-5, 1e-4

WARMUP, UPDATES, STEPS_PER_UPDATE = 3, 4, 2  # num_mini_batches=2: 8 optimizer steps


def expected_lrs(schedule: str, lr: float = 1e-3) -> list[float]:
    """transformers' schedules by hand, read after each update's 2 optimizer steps (warmup 3 of 8 steps)."""
    total = UPDATES * STEPS_PER_UPDATE
    out = []
    for k in range(STEPS_PER_UPDATE, total + 1, STEPS_PER_UPDATE):
        progress = max(k - WARMUP, 0) / (total - WARMUP)
        after = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}
        out.append(lr * (k / WARMUP if k < WARMUP else after[schedule]))
    return out


def lr_case(schedule: str) -> dict:
    return dict(lr_scheduler_type=schedule, warmup_steps=WARMUP, max_updates=UPDATES,
                num_mini_batches=STEPS_PER_UPDATE)


def param_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all parameters."""
    diff = sum(float((a[k] - b[k]).double().square().sum()) for k in a)
    return (diff / sum(float(b[k].double().square().sum()) for k in b)) ** 0.5


def assert_same_update(after: dict, reference: dict, before: dict, what: str) -> None:
    assert param_distance(after, reference) < PARAM_RTOL, what
    assert relative_difference(after, reference, before) < UPDATE_RTOL, what


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, tmp_path_factory):
    """One process, gradient accumulation 1: the reference updates, and the lr of every update."""
    root = tmp_path_factory.mktemp("single")
    updates = {}
    for agg in LOSS_AGGS:
        updates[agg] = one_update(tiny_model_dir, root / agg, loss_agg=agg)
        reset_accelerate_state()
    lrs = {}
    for schedule in ("constant", "linear", "cosine"):
        lrs[schedule] = logged_lrs(tiny_model_dir, root / f"lr_{schedule}", **lr_case(schedule))
        reset_accelerate_state()
    return SimpleNamespace(updates=updates, lrs=lrs)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("accumulation", [2, 4])
def test_gradient_accumulation_gives_the_same_update(tiny_model_dir, tmp_path, single_process, loss_agg,
                                                     accumulation):
    before, reference, reference_stats = single_process.updates[loss_agg]
    _, after, stats = one_update(tiny_model_dir, tmp_path, loss_agg=loss_agg,
                                 gradient_accumulation_steps=accumulation)
    assert_same_update(after, reference, before, f"{loss_agg}, gradient_accumulation_steps={accumulation}")
    for key in SHARE_STATS:  # the logged losses are the mini-batch's, however split
        if key in reference_stats:
            assert stats[key] == pytest.approx(reference_stats[key], rel=1e-5, abs=1e-7), key


def test_micro_batch_token_mean_is_token_mean_on_one_micro_batch_and_changes_with_the_split(tiny_model_dir, tmp_path,
                                                                                           single_process):
    """TRL's bnpo: on one micro-batch (one process, no accumulation) it is the token mean; split in two it averages
    the two micro-batches' token means, which weighs the rows of the shorter half more: another update."""
    before, reference, _ = single_process.updates["token_mean"]
    _, whole, _ = one_update(tiny_model_dir, tmp_path / "one", loss_agg="micro_batch_token_mean")
    assert_same_update(whole, reference, before, "micro_batch_token_mean, one micro-batch")
    reset_accelerate_state()
    _, split, _ = one_update(tiny_model_dir, tmp_path / "two", loss_agg="micro_batch_token_mean",
                             gradient_accumulation_steps=2)
    assert relative_difference(split, reference, before) > 1e-2


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_by_hand_with_warmup(single_process, schedule):
    """warmup_steps applies to every schedule, 'constant' included; one schedule step per optimizer step."""
    assert single_process.lrs[schedule] == pytest.approx(expected_lrs(schedule), rel=1e-6)


def test_two_processes_give_the_same_update_and_lr(tiny_model_dir, tmp_path, single_process):
    cases = {f"{agg}_ga{ga}": {"loss_agg": agg, "gradient_accumulation_steps": ga}
             for agg in LOSS_AGGS for ga in (1, 2)}
    cases.update({f"lr_{s}": lr_case(s) for s in ("constant", "linear", "cosine")})
    proc = launch_two_processes("tests/fixed_update.py", [str(tiny_model_dir), str(tmp_path), json.dumps(cases)],
                                tmp_path, timeout=600)
    assert proc.returncode == 0, explain(proc)
    for name, overrides in cases.items():
        report = json.loads((tmp_path / f"{name}.json").read_text())
        if name.startswith("lr_"):
            schedule = overrides["lr_scheduler_type"]
            assert report == single_process.lrs[schedule], name  # identical, not merely close
            continue
        before, reference, reference_stats = single_process.updates[overrides["loss_agg"]]
        assert_same_update(load_file(tmp_path / f"{name}.safetensors"), reference, before, name)
        for key in SHARE_STATS:
            if key in reference_stats:
                assert report[key] == pytest.approx(reference_stats[key], rel=1e-5, abs=1e-7), (name, key)


# ----------------------------------------------------------------------------- fp16 loss scaling
def fp16_accelerator(init_scale: float) -> Accelerator:
    """fp16 autocast with torch's GradScaler on the CPU. accelerate 1.15 builds neither on a CPU (it trains in
    fp32 there), so both are switched on by hand, before the trainer prepares the model and optimizer."""
    acc = Accelerator(mixed_precision="fp16", cpu=True)
    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return acc


def overflow_first_backward(trainer: PPOTrainer) -> None:
    """Turn the first backward's gradient of one weight into inf, as a loss-scale overflow does."""
    calls = []

    def hook(grad):
        calls.append(1)
        return grad * math.inf if len(calls) == 1 else grad

    model = trainer.accelerator.unwrap_model(trainer.model)
    next(p for p in model.parameters() if p.requires_grad).register_hook(hook)


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tiny_model_dir, tmp_path):
    acc = fp16_accelerator(2.0**16)
    trainer = make_trainer(tiny_model_dir, tmp_path, accelerator=acc, max_updates=2, max_new_tokens=4,
                           ppo_epochs=1, lr_scheduler_type="linear", kl_placement="reward", kl_estimator=None)
    overflow_first_backward(trainer)
    model = acc.unwrap_model(trainer.model)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    history = trainer.train()  # no FloatingPointError
    first, second = history
    # linear over 2 steps: 1e-3, then 0.5e-3 after one applied step; the skipped step did not advance it
    assert first["optimizer/skipped_steps"] == 1.0 and first["lr"] == pytest.approx(1e-3)
    assert second["optimizer/skipped_steps"] == 0.0 and second["lr"] == pytest.approx(0.5e-3)
    assert acc.scaler.get_scale() == 2.0**15  # halved once, not grown yet
    assert math.isfinite(second["grad_norm"]) and second["grad_norm"] > 0
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, initial[k])]
    assert changed, "the second update applied no step"


def test_fp16_real_overflow_is_skipped_while_the_scale_shrinks(tiny_model_dir, tmp_path):
    """A scale of 2^100 overflows fp16 in every backward: each step is skipped and the scale halves."""
    acc = fp16_accelerator(2.0**100)
    trainer = make_trainer(tiny_model_dir, tmp_path, accelerator=acc, max_updates=2, max_new_tokens=4,
                           ppo_epochs=1, kl_placement="reward", kl_estimator=None)
    history = trainer.train()
    assert [row["optimizer/skipped_steps"] for row in history] == [1.0, 1.0]
    assert acc.scaler.get_scale() == 2.0**98


def test_non_finite_gradient_the_scaler_cannot_explain_stops(tiny_model_dir, tmp_path):
    """At scale 1 an overflow is the gradient's own, not the scaling's: the run stops, nothing applied."""
    acc = fp16_accelerator(1.0)
    trainer = make_trainer(tiny_model_dir, tmp_path, accelerator=acc, max_updates=1, max_new_tokens=4,
                           ppo_epochs=1, kl_placement="reward", kl_estimator=None)
    overflow_first_backward(trainer)
    with pytest.raises(FloatingPointError, match="update 1: the gradient norm is"):
        trainer.train()


# ----------------------------------------------------------------------------- adaptive KL counts samples
def test_adaptive_kl_counts_every_sample(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, batch_size=4, num_generations=2, max_updates=1,
                           max_new_tokens=4, ppo_epochs=1, adaptive_kl=True, kl_coef=0.1, kl_target=1.0,
                           kl_horizon=100, kl_placement="reward", kl_estimator=None)
    (row,) = trainer.train()
    error = min(max(row["kl/per_sequence"] / 1.0 - 1.0, -0.2), 0.2)
    samples = 4 * 2  # prompts x num_generations, not the 4 prompts
    assert trainer.kl_controller.value == pytest.approx(0.1 * (1 + error * samples / 100))
