"""rollout_engine: vllm. The weight push (names, buckets, call order) against a fake engine everywhere; the engine
itself where vLLM is installed (the `vllm` marker; `.ci/run` runs them in a venv of their own)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import (
    RANK_REPORT_DRIVER,
    TWO_TURNS_ENV,
    build_tokenizer,
    build_trainer,
    explain,
    launch_two_processes,
    ppo_config,
    write_jsonl,
    write_sevens_reward,
)
from llm_rl.config.errors import ConfigError
from llm_rl.config.sections import Config
from llm_rl.sampling.vllm import EngineWeights, buckets, engine_length, engine_weight_names

PROMPTS = ["1+2=", "17+5=", "123+45=", "7+77=", "30+3=", "999+1=", "4+56=", "78+9="]


class FakeEngine:
    """Records what EngineWeights asks of a vllm.LLM: the calls in order and the tensors each bucket carried."""

    def __init__(self):
        self.calls, self.loaded = [], {}

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(method)
        if method == "reload_weights":
            self.loaded.update((name, tensor.clone()) for name, tensor in kwargs["weights_iterator"])
        if method == "update_weights":
            self.loaded.update(dict.fromkeys(args[0]["names"]))
            self.calls[-1] = ("update_weights", len(args[0]["names"]))

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def test_buckets_keep_order_and_bound_their_size():
    named = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]  # float32: 4 bytes each
    groups = list(buckets(named, max_bytes=80))
    assert [[name for name, _ in g] for g in groups] == [["w0", "w1"], ["w2"], ["w3", "w4", "w5"]]  # w2 (120 B) alone


def test_weight_names_are_the_checkpoints_without_value_head_or_peft(tiny_lm):
    from peft import LoraConfig, get_peft_model

    plain = dict(engine_weight_names(tiny_lm))
    assert set(plain) == {name for name, _ in tiny_lm.named_parameters()}
    peft_lm = get_peft_model(tiny_lm, LoraConfig(r=2, target_modules=["c_attn"]))
    names = dict(engine_weight_names(peft_lm))
    assert set(names) == set(plain)  # base_model.model. and .base_layer. gone, lora_A/lora_B left out


def test_cpu_push_is_one_reload_of_every_weight_then_a_cache_reset(tiny_lm):
    engine = FakeEngine()
    EngineWeights(engine, bucket_bytes=1 << 10).push(tiny_lm)
    assert engine.calls == ["reload_weights", "reset_prefix_cache"]
    for name, tensor in tiny_lm.named_parameters():
        torch.testing.assert_close(engine.loaded[name], tensor.detach())


def test_cpu_push_of_a_tied_model_repacks_the_lm_head_after_the_reload(tiny_lm):
    """vLLM's CPU build computes logits from a packed copy of the head; a tied head gets no weights of its own in
    the reload, so the push asks the worker to repack it (else the engine samples from the old head)."""
    from llm_rl.sampling.vllm import repack_tied_lm_head, ties_output_embedding

    assert ties_output_embedding(tiny_lm)  # the GPT-2 of the fixture ties its head to wte
    engine = FakeEngine()
    EngineWeights(engine, bucket_bytes=1 << 10, tied_head=True).push(tiny_lm)
    assert engine.calls == ["reload_weights", repack_tied_lm_head, "reset_prefix_cache"]


def test_lora_is_merged_for_the_push_and_unmerged_after(tiny_lm):
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(tiny_lm, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    base = {k: v.clone() for k, v in lm.base_model.model.state_dict().items() if "lora_" not in k}
    engine = FakeEngine()
    EngineWeights(engine, bucket_bytes=1 << 20).push(lm)
    layer = lm.base_model.model.transformer.h[0].attn.c_attn
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).T * layer.scaling["default"]
    name = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(engine.loaded[name], base["transformer.h.0.attn.c_attn.base_layer.weight"] + delta)
    torch.testing.assert_close(layer.base_layer.weight, base["transformer.h.0.attn.c_attn.base_layer.weight"])


def test_gpu_transfer_calls_in_order_one_update_per_bucket(tiny_lm, monkeypatch):
    """vLLM's weight-transfer API (GPU): init once, then start, one update per bucket, finish, per push. On this
    CPU machine the IPC handles are stubbed: only the order and the bucketing are checked here."""
    import torch.multiprocessing.reductions as reductions

    monkeypatch.setattr(reductions, "reduce_tensor", lambda t: (None, ("handle", t.shape)))
    engine = FakeEngine()
    params = list(tiny_lm.named_parameters())
    largest = max(p.numel() * p.element_size() for _, p in params)
    pusher = EngineWeights(engine, bucket_bytes=largest, transfer=True)
    pusher.push(tiny_lm)
    pusher.push(tiny_lm)
    expected_buckets = [len(g) for g in buckets(((n, p.detach()) for n, p in params), largest)]
    per_push = ["start_weight_update", *[("update_weights", n) for n in expected_buckets], "finish_weight_update",
                "reset_prefix_cache"]
    assert engine.calls == ["init_weight_transfer_engine", *per_push, *per_push]
    assert len(expected_buckets) > 1 and sum(expected_buckets) == len(params)
    assert set(engine.loaded) == {name for name, _ in params}


# ----------------------------------------------------------------------------- what the config refuses
def vllm_config(**values) -> Config:
    return Config.from_dict({"rollout_engine": "vllm", **values})


def test_vllm_missing_names_the_install_command(monkeypatch):
    import llm_rl.config.rules as rules

    monkeypatch.setattr(rules, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs vllm, which is not installed.*pip install torch==2.13.0 -e \"\.\[vllm\]\""):
        vllm_config().validate()


@pytest.mark.parametrize("values, message", [
    (dict(vllm_max_model_len=100, max_prompt_length=64, max_new_tokens=64), r"vllm_max_model_len 100 is below .* = 128"),
    (dict(top_k=5), "top_k/top_p-truncated distribution"),
    (dict(top_p=0.9), "top_k/top_p-truncated distribution"),
    (dict(vllm_importance_sampling_clip_min=4.0), "clip_min must be >= 0 and below"),
])
def test_vllm_settings_it_cannot_do_are_refused(monkeypatch, values, message):
    import llm_rl.config.rules as rules

    monkeypatch.setattr(rules, "find_spec", lambda name: object())  # as if installed
    with pytest.raises(ConfigError, match=message):
        vllm_config(**values).validate()


def test_engine_length_stays_within_the_models_positions():
    from transformers import GPT2Config

    config = Config.from_dict(dict(max_prompt_length=512, max_new_tokens=6))
    assert engine_length(config, GPT2Config(n_positions=32)) == 32  # the demo's model: 518 would be refused
    assert engine_length(config, GPT2Config(n_positions=1024)) == 518
    config.sampling.vllm_max_model_len = 24
    assert engine_length(config, GPT2Config(n_positions=32)) == 24
    config.sampling.vllm_max_model_len = 64
    with pytest.raises(ConfigError, match="vllm_max_model_len 64 is above the model's 32 positions"):
        engine_length(config, GPT2Config(n_positions=32))


def test_truncated_sampling_is_allowed_without_the_correction(monkeypatch):
    import llm_rl.config.rules as rules

    monkeypatch.setattr(rules, "find_spec", lambda name: object())
    vllm_config(top_k=5, vllm_importance_sampling_correction=False, reward_funcs=["m:f"]).validate()


def test_trl_names_point_to_the_keys():
    with pytest.raises(ConfigError, match="Did you mean vllm_max_model_len"):
        Config.from_dict({"vllm_max_model_length": 512})
    with pytest.raises(ConfigError, match="Did you mean rollout_engine"):
        Config.from_dict({"use_vllm": True})


# ----------------------------------------------------------------------------- the engine itself
def save_engine_model(path, family: str):
    """A tiny random LM of `family` (head_dim 32, which vLLM's CPU attention takes) and the character tokenizer:
    an untied Llama, and two whose lm head is the input embedding (a tied Qwen2 and GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    decoder = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, **ids)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if family == "llama":
            lm = LlamaForCausalLM(LlamaConfig(**decoder))
        elif family == "qwen2_tied":
            lm = Qwen2ForCausalLM(Qwen2Config(**decoder, tie_word_embeddings=True))
        else:
            lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2,
                                            n_positions=128, **ids))
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    pytest.importorskip("vllm", reason="vllm not installed")
    return save_engine_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="module", params=["llama", "qwen2_tied", "gpt2"])
def engine_model_dir(request, tmp_path_factory):
    pytest.importorskip("vllm", reason="vllm not installed")
    return save_engine_model(tmp_path_factory.mktemp(request.param), request.param)


def engine_config(model_dir, tmp_path, engine: str, **values):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    values = {**dict(reward_funcs=[write_sevens_reward(tmp_path)], batch_size=4, num_generations=2, max_new_tokens=12,
                     max_updates=2, learning_rate=1e-3, seed=0, advantage_estimator="grpo", rollout_engine=engine,
                     max_prompt_length=16, vllm_kv_cache_gb=1), **values}
    config = ppo_config(model_dir, prompts, tmp_path / f"run-{engine}", **values)
    config.validate()
    return config


@pytest.mark.vllm
def test_vllm_rollout_matches_the_training_model(engine_model_dir, tmp_path):
    """The engine's rollout: num_generations rows per prompt, cut after the first stop token like HF's, and its
    log-probs of the sampled tokens equal to the training model's (float32, CPU) within 1e-4."""
    from llm_rl.sampling.rollout import logprobs_and_values

    trainer = build_trainer(engine_config(engine_model_dir, tmp_path, "vllm"))
    batch = trainer.prompts.batch(list(range(4)))
    rollout = trainer.sampler.sample(batch)
    assert len(rollout) == 8 and rollout.group_size == 2
    assert rollout.response_ids.shape == rollout.sampler_logprobs.shape
    for row in range(8):
        n = int(rollout.action_mask[row].sum())
        ids = rollout.response_ids[row, :n].tolist()
        eos = trainer.tokenizer.eos_token_id
        assert eos not in ids[:-1]  # nothing after a stop token
        assert bool(rollout.ended[row]) == (ids[-1] == eos)
        assert (rollout.response_ids[row, n:] == trainer.tokenizer.pad_token_id).all()
    logprobs, _ = logprobs_and_values(trainer.model, rollout, 1.0, len(rollout), reference=True)
    torch.testing.assert_close(rollout.sampler_logprobs, logprobs, atol=1e-4, rtol=0)


@pytest.mark.vllm
def test_pushed_weights_change_what_the_engine_samples_from(engine_model_dir, tmp_path):
    """After the policy's weights change, the next rollout's engine log-probs are the new weights' (a sync bug
    would leave them at the old ones)."""
    from llm_rl.sampling.rollout import logprobs_and_values

    trainer = build_trainer(engine_config(engine_model_dir, tmp_path, "vllm"))
    lm = trainer.accelerator.unwrap_model(trainer.model).pretrained_model
    with torch.no_grad():
        lm.lm_head.weight.mul_(3.0)
    rollout = trainer.sampler.sample(trainer.prompts.batch(list(range(4))))
    logprobs, _ = logprobs_and_values(trainer.model, rollout, 1.0, len(rollout), reference=True)
    torch.testing.assert_close(rollout.sampler_logprobs, logprobs, atol=1e-4, rtol=0)
    assert trainer.sampler.engine.weights.seconds > 0


@pytest.mark.vllm
def test_vllm_run_trains_and_logs_the_mismatch(llama_dir, tmp_path):
    """Two GRPO updates through the engine: the mismatch metrics are logged and tiny (same float32 maths on the
    same weights), so the correction's weights are 1 and nothing is over the cap."""
    history = build_trainer(engine_config(llama_dir, tmp_path, "vllm")).train()
    assert len(history) == 2
    for row in history:
        assert row["mismatch/kl"] < 1e-6 and row["mismatch/max_abs_logprob_diff"] < 1e-4
        assert row["mismatch/over_cap_fraction"] == 0.0
        assert row["mismatch/importance_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert row["policy/ratio_max_dev"] < 1e-5
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))


@pytest.mark.vllm
def test_first_update_agrees_with_hf(llama_dir, tmp_path):
    """Learning parity on one update: at temperature 0.02 both engines sample the likeliest tokens, so they give
    the same completions, and the first update (PPO with a value head) has the same losses and gradient norm
    within 1e-4 relative, whichever engine sampled."""
    values = dict(advantage_estimator="gae", num_generations=1, temperature=0.02, max_updates=1)
    runs = {}
    for engine in ("vllm", "hf"):
        trainer = build_trainer(engine_config(llama_dir, tmp_path, engine, **values))
        runs[engine] = trainer.train()[0]
    for key in ("loss/policy", "loss/value", "grad_norm", "response/length", "score/mean"):
        assert runs["vllm"][key] == pytest.approx(runs["hf"][key], rel=1e-4, abs=1e-6), key


# ----------------------------------------------------------------------------- episodes through the engine


def episode_config(model_dir, tmp_path, engine: str, **values):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "users.py").write_text(TWO_TURNS_ENV)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": p} for p in PROMPTS])
    values = {**dict(environment=f"{tmp_path / 'users.py'}:TwoTurns", max_turns=3, max_episode_tokens=16,
                     max_new_tokens=5, batch_size=4, num_generations=1, max_updates=2, learning_rate=1e-3, seed=0,
                     gamma=0.9, rollout_engine=engine, max_prompt_length=16, vllm_kv_cache_gb=1), **values}
    config = ppo_config(model_dir, rows, tmp_path / f"episodes-{engine}", reward_funcs=[], **values)
    config.validate()
    return config


@pytest.mark.vllm
def test_episode_turns_come_from_the_engine_with_its_logprobs(llama_dir, tmp_path):
    """Each bot turn is one engine call from the episode's tokens so far: the engine's log-probs sit on the bot's
    tokens and equal the training model's there (float32, CPU, within 1e-4); observations carry none."""
    from llm_rl.sampling.rollout import logprobs_and_values

    trainer = build_trainer(episode_config(llama_dir, tmp_path, "vllm"))
    rollout = trainer.sampler.sample(trainer.prompts.batch(list(range(4))))
    assert rollout.sampler_logprobs is not None and rollout.sampler_logprobs.shape == rollout.response_ids.shape
    action = rollout.action_mask.bool()
    observation = rollout.response_mask.bool() & ~action
    assert observation.any()  # the user's "7" came between the bot's turns
    assert (rollout.sampler_logprobs[~action] == 0).all() and (rollout.sampler_logprobs[action] < 0).all()
    assert int(rollout.num_turns.max()) == 2
    logprobs, _ = logprobs_and_values(trainer.model, rollout, 1.0, len(rollout), reference=True)
    torch.testing.assert_close(rollout.sampler_logprobs[action], logprobs[action], atol=1e-4, rtol=0)
    assert trainer.sampler.timing["time/weight_sync"] > 0


@pytest.mark.vllm
def test_episodes_first_update_agrees_with_hf(llama_dir, tmp_path):
    """Multi-turn learning parity on one update: with the lm head scaled up tenfold (a sharp policy) at
    temperature 0.02 both engines play the same episodes, so the first PPO update has the same losses, returns
    and gradient norm within 1e-4 relative; the vLLM run logs the mismatch and it is tiny."""
    runs = {}
    for engine in ("vllm", "hf"):
        trainer = build_trainer(episode_config(llama_dir, tmp_path / engine, engine, temperature=0.02, max_updates=1))
        with torch.no_grad():  # the engine gets the scaled weights with the push before the rollout
            trainer.accelerator.unwrap_model(trainer.model).pretrained_model.lm_head.weight.mul_(10.0)
        runs[engine] = trainer.train()[0]
    for key in ("loss/policy", "loss/value", "grad_norm", "entropy", "episode/return", "episode/turns"):
        assert runs["vllm"][key] == pytest.approx(runs["hf"][key], rel=1e-4, abs=1e-6), key
    assert runs["vllm"]["mismatch/max_abs_logprob_diff"] < 1e-3


@pytest.mark.vllm
def test_two_processes_each_sample_through_their_own_engine(llama_dir, tmp_path):
    """DDP on 2 CPU processes with rollout_engine: vllm (DDP wraps the model, so the engine is sized from the
    unwrapped one): each rank builds its engine, both ranks end with the same parameters, and the mismatch between
    each engine and its rank's policy stays tiny."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    values = dict(model_name_or_path=str(llama_dir), dataset_name=str(prompts), reward_funcs=[write_sevens_reward(tmp_path)],
                  batch_size=2, num_generations=2, max_new_tokens=8, max_updates=2, learning_rate=1e-3, seed=0,
                  advantage_estimator="grpo", rollout_engine="vllm", max_prompt_length=16, vllm_kv_cache_gb=1,
                  progress_bar=False, logging_steps=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "driver.py").write_text(RANK_REPORT_DRIVER)
    proc = launch_two_processes(str(tmp_path / "driver.py"),
                                [str(tmp_path / "run.yaml"), "--output_dir", str(tmp_path / "out")], tmp_path, timeout=420)
    assert proc.returncode == 0, explain(proc)
    reports = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["num_processes"] == 2 for r in reports)
    assert reports[0]["digest"] == reports[1]["digest"]
    for row in reports[0]["history"]:
        assert row["mismatch/max_abs_logprob_diff"] < 1e-3 and row["mismatch/over_cap_fraction"] == 0.0
