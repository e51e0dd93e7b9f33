"""PPOTrainer end to end, in process, on a tiny GPT-2-style model (CPU, offline).

The model and tokenizer are built here, saved to a temporary folder and loaded back
through `from_pretrained`, the way a user's Hub model is; prompts come from a jsonl
file and the reward is a function in a module file, named 'path/to/file.py:function'.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import build_trainer, ppo_config, read_jsonl, write_jsonl, write_sevens_reward
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import llm_rl.training.ppo_trainer as trainer_module
from llm_rl.config.errors import ConfigError
from llm_rl.config.sections import Config
from llm_rl.models.loading import load_policy, load_tokenizer
from llm_rl.training.callbacks import TrainerCallback
from llm_rl.training.pipeline import run_ppo

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds its own Accelerator

# prompts of different lengths, so batches are left-padded
PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (17, 5), (123, 45), (7, 77), (30, 3), (999, 1), (4, 56), (78, 9),
                                    (5, 5), (61, 250), (8, 0), (42, 42), (300, 7), (2, 96), (71, 17), (6, 600)]]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ppo_assets")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p, "answer": "0"} for p in PROMPTS])
    return SimpleNamespace(model_dir=tiny_model_dir, prompts=prompts, reward=write_sevens_reward(root))


def make_config(assets, output_dir: Path, **overrides) -> Config:
    values = dict(reward_funcs=[assets.reward], batch_size=4, max_new_tokens=4, max_updates=3, learning_rate=1e-3,
                  seed=0)
    config = ppo_config(assets.model_dir, assets.prompts, output_dir, **{**values, **overrides})
    config.validate()
    return config


def assert_finite_metrics(history: list[dict]) -> None:
    for row in history:
        for key, value in row.items():
            assert isinstance(value, (int, float)), f"update {row['update']}: {key} is {type(value).__name__}"
            assert math.isfinite(value), f"update {row['update']}: {key} = {value}"


def ratio_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "ratio" in str(w.message)]


# ----------------------------------------------------------------------------- the main run
def test_ppo_run_trains_logs_and_saves(assets, tmp_path):
    out = tmp_path / "run"
    config = make_config(assets, out, num_mini_batches=1, ppo_epochs=1)
    initial = load_policy(config, load_tokenizer(str(assets.model_dir)))
    initial_lm = {k: v.clone() for k, v in initial.pretrained_model.state_dict().items()}
    initial_head = {k: v.clone() for k, v in initial.v_head.state_dict().items()}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, history = run_ppo(config)

    # metrics: one row per update, every value finite, the same rows on disk
    assert [row["update"] for row in history] == [1, 2, 3]
    assert_finite_metrics(history)
    for key in ("score/mean", "kl/per_sequence", "entropy", "loss/policy", "loss/value", "policy/ratio_max_dev",
                "grad_norm", "lr", "tokens_per_second"):
        assert key in history[0], key
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert [json.loads(line)["update"] for line in lines] == [1, 2, 3]

    # one micro-batch per update: its ratio before any step is 1, and nothing warned about it
    assert history[0]["policy/ratio_max_dev"] < 1e-4
    assert ratio_warnings(caught) == []

    # the files of a finished run
    for name in ("config.json", "model.safetensors", "value_head.safetensors", "config.yaml",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    # the exported model is safetensors only (the checkpoint's optimizer/RNG files load with weights_only)
    pickled = [p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl") for p in out.glob(pattern)]
    assert pickled == []
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]  # saved at the end by default
    saved_config = Config.from_yaml(out / "config.yaml")
    assert saved_config.train.max_updates == 3 and saved_config.ppo.batch_size == 4

    # plain transformers loads the policy: no llm_rl class, no remote code
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    trained = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    assert torch.isfinite(trained(input_ids=ids).logits).all()

    # the policy and the value head moved away from their initial weights
    trained_lm = trained.state_dict()
    changed = [k for k, v in initial_lm.items() if k in trained_lm and not torch.equal(v, trained_lm[k])]
    assert changed, "no policy weight changed in 3 PPO updates"
    head = load_file(out / "value_head.safetensors")
    assert set(head) == set(initial_head)
    assert any(not torch.equal(head[k], initial_head[k]) for k in head), "the value head did not change"
    # what was saved is what the trainer holds
    live = trainer.accelerator.unwrap_model(trainer.model).pretrained_model.state_dict()
    torch.testing.assert_close(trained_lm["transformer.h.0.attn.c_attn.weight"],
                               live["transformer.h.0.attn.c_attn.weight"].cpu())


def test_ratio_warning_when_rollout_and_training_temperatures_differ(assets, tmp_path, monkeypatch):
    """Old log-probs taken at another temperature than training uses must trip the first-minibatch check."""
    original = trainer_module.logprobs_and_values

    def score_at_double_temperature(model, rollout, temperature, *args, **kwargs):
        return original(model, rollout, temperature * 2, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "logprobs_and_values", score_at_double_temperature)
    # two micro-batches: the rollout takes its own no-grad forward (the fused path has none to get wrong)
    config = make_config(assets, tmp_path / "run", max_updates=1, gradient_accumulation_steps=2, ppo_epochs=1)
    with pytest.warns(RuntimeWarning, match="ratio"):
        run_ppo(config)


@pytest.mark.parametrize("num_generations", [1, 3])
def test_fused_update_matches_the_plain_path(assets, tmp_path, num_generations):
    """One epoch over one micro-batch reuses the training forward as the old policy: same result as
    taking the old log-probs and values in a separate no-grad forward. With num_generations > 1 the fused
    forward runs each prompt once for its group (shared_prompt_cache); the plain one runs every row."""
    results = []
    for fused in (True, False):
        config = make_config(assets, tmp_path / f"run-{fused}", max_updates=2, seed=3,
                             num_generations=num_generations)
        trainer = build_trainer(config)
        assert trainer.fused
        trainer.fused = fused
        history = trainer.train()
        params = {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
        results.append((history, params))
    (fused_history, fused_params), (plain_history, plain_params) = results
    for key in ("loss/policy", "loss/value", "score/mean", "kl/per_sequence", "policy/clipfrac"):
        assert [r[key] for r in fused_history] == pytest.approx([r[key] for r in plain_history], rel=1e-4, abs=1e-6)
    for name, value in fused_params.items():
        torch.testing.assert_close(value, plain_params[name], atol=1e-5, rtol=1e-4)
    assert fused_history[0]["policy/ratio_max_dev"] == 0.0
    assert plain_history[0]["policy/ratio_max_dev"] < 1e-5


class ShiftedEngine:
    """A `Sampler` standing for a second rollout engine: it samples through the trainer's own sampler and
    reports its own log-probs of the sampled tokens, `shift` above the training model's."""

    def __init__(self, inner, model, temperature: float, shift: float):
        self.inner, self.model, self.temperature, self.shift = inner, model, temperature, shift

    def sample(self, batch):
        import dataclasses

        from llm_rl.sampling.rollout import logprobs_and_values

        rollout = self.inner.sample(batch)
        logprobs, _ = logprobs_and_values(self.model, rollout, self.temperature, len(rollout), reference=True)
        return dataclasses.replace(rollout, sampler_logprobs=(logprobs + self.shift) * rollout.action_mask)


def test_an_engine_with_its_own_logprobs_plugs_into_the_sampler_seam(assets, tmp_path):
    """The loop asks its sampler for a rollout and nothing else; an engine's own log-probs are compared with
    the trainer's recomputed old log-probs: r = -0.5 on every action, so KL = e^-0.5 - 1 + 0.5 = 0.1065307."""
    config = make_config(assets, tmp_path / "run", max_updates=2, num_generations=2)
    trainer = build_trainer(config)
    trainer.sampler = ShiftedEngine(trainer.sampler, trainer.model, config.sampling.temperature, shift=0.5)
    history = trainer.train()
    for row in history:
        assert row["mismatch/kl"] == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-4)
        assert row["mismatch/max_abs_logprob_diff"] == pytest.approx(0.5, abs=1e-4)
    _, plain = run_ppo(make_config(assets, tmp_path / "plain", max_updates=1))
    assert not any(key.startswith("mismatch/") for key in plain[0])  # HF generate reports no log-probs of its own


def shifted_run(assets, folder, shift: float, **overrides):
    config = make_config(assets, folder, max_updates=1, num_generations=2, **overrides)
    trainer = build_trainer(config)
    trainer.sampler = ShiftedEngine(trainer.sampler, trainer.model, config.sampling.temperature, shift=shift)
    return trainer.train()[0]


def test_the_importance_correction_weighs_the_policy_loss(assets, tmp_path):
    """A perturbed engine: its log-probs 0.5 above the trainer's on every action, so each token's ratio
    pi_old / pi_engine is e^-0.5. token_truncate (cap 3) weighs every token's loss by e^-0.5 = 0.6065, so on the
    same first rollout (GRPO: the policy loss is the only term) the gradient is e^-0.5 times the uncorrected one."""
    grpo = dict(advantage_estimator="grpo")
    plain = shifted_run(assets, tmp_path / "off", 0.5, vllm_importance_sampling_correction=False, **grpo)
    tis = shifted_run(assets, tmp_path / "tis", 0.5, vllm_importance_sampling_mode="token_truncate", **grpo)
    assert plain["grad_norm"] > 0.0
    assert tis["grad_norm"] == pytest.approx(math.exp(-0.5) * plain["grad_norm"], rel=1e-4)
    for key in ("mean", "min", "max"):
        assert tis[f"mismatch/importance_weight_{key}"] == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert tis["mismatch/over_cap_fraction"] == 0.0
    assert "mismatch/importance_weight_mean" not in plain and plain["mismatch/kl"] > 0


def test_sequence_mask_drops_responses_over_the_cap(assets, tmp_path):
    """The engine 2 nats below the trainer on every action: every token's ratio e^2 = 7.4 is over the cap 3, and
    so is every response's; sequence_mask (the default) gives them all weight 0, so nothing is trained."""
    row = shifted_run(assets, tmp_path / "mask", -2.0)
    assert row["mismatch/over_cap_fraction"] == 1.0
    assert row["mismatch/importance_weight_max"] == 0.0
    assert row["loss/policy"] == 0.0


# ----------------------------------------------------------------------------- other shapes of run
def test_gradient_accumulation_and_minibatches(assets, tmp_path):
    config = make_config(assets, tmp_path / "run", batch_size=8, num_mini_batches=2, gradient_accumulation_steps=2,
                         ppo_epochs=2, max_updates=2)
    trainer, history = run_ppo(config)
    assert len(history) == 2
    assert_finite_metrics(history)
    assert trainer.micro_batch_size == 2 and trainer.mini_batch_size == 4
    # one optimizer step per mini-batch, not per micro-batch: 2 updates x 2 epochs x 2 mini-batches
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {8}
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


def test_kl_in_the_loss(assets, tmp_path):
    config = make_config(assets, tmp_path / "run", kl_placement="loss", kl_coef=0.1, max_updates=2)
    _, history = run_ppo(config)
    assert_finite_metrics(history)
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2
    # the KL stays out of the token rewards: their mean is the scores spread over the response tokens
    for row in history:
        expected = row["score/mean"] * config.ppo.batch_size / row["response/tokens"]
        assert row["token_reward/mean"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert history[-1]["kl/beta"] == pytest.approx(0.1)


def test_output_dir_holding_a_run_needs_overwrite(assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"update": 1}\n{"update": 2}\n')
    with pytest.raises(ConfigError, match="overwrite_output_dir"):
        run_ppo(make_config(assets, out, max_updates=1))
    assert len(read_jsonl(out / "metrics.jsonl")) == 2  # the old run is untouched

    _, history = run_ppo(make_config(assets, out, max_updates=1, overwrite_output_dir=True))
    assert len(history) == 1
    assert [row["update"] for row in read_jsonl(out / "metrics.jsonl")] == [1]


# ----------------------------------------------------------------------------- callbacks, the reference
def test_callbacks_see_every_update_and_what_they_add_is_logged(assets, tmp_path):
    class Recorder(TrainerCallback):
        def __init__(self):
            self.updates, self.trained = [], None

        def on_evaluate(self, trainer):
            return {"calls": float(trainer.update)}

        def on_update_end(self, trainer, metrics):
            self.updates.append(metrics["update"])
            metrics["custom/twice_score"] = 2 * metrics["score/mean"]

        def on_train_end(self, trainer, history):
            self.trained = len(history)

    recorder = Recorder()
    config = make_config(assets, tmp_path / "run", max_updates=3, eval_steps=2)
    _, history = run_ppo(config, callbacks=[recorder])
    assert recorder.updates == [1, 2, 3] and recorder.trained == 3
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [row["custom/twice_score"] for row in logged] == pytest.approx([2 * row["score/mean"] for row in logged])
    assert [row.get("eval/calls") for row in logged] == [None, 2.0, 3.0]  # every 2 updates and at the end


def test_no_reference_is_kept_or_run_when_nothing_reads_it(assets, tmp_path):
    config = make_config(assets, tmp_path / "run", max_updates=1, kl_coef=0.0)
    trainer, history = run_ppo(config)
    assert trainer.ref_model is None and not trainer.uses_reference
    assert not any(key.startswith("kl/") for key in history[0])
    config = make_config(assets, tmp_path / "run2", max_updates=1, kl_coef=0.0, adaptive_kl=True)
    trainer, history = run_ppo(config)
    assert trainer.ref_model is not None and "kl/per_sequence" in history[0]  # the controller may raise beta
