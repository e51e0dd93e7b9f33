"""The keys that lower the memory an update needs: gradient checkpointing (with the value head, with LoRA)
gives the update it gives without; chunked_logprobs on and off give the same update; and running out of
memory in an update stops the run with one error that names those keys."""

from __future__ import annotations

import pytest
import torch
from conftest import addition_prompts, build_trainer, ppo_config, write_sevens_reward

from llm_rl.config.errors import OutOfMemoryError, UserError
from llm_rl.models.value_head import activation_checkpointing, unwrap_transformers_model

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds its own Accelerator

LORA = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["c_attn", "c_fc"]}


def run_config(tiny_model_dir, tmp_path, name: str, **extra):
    return ppo_config(tiny_model_dir, addition_prompts(tmp_path), tmp_path / name, **{
        "batch_size": 8, "max_new_tokens": 4, "learning_rate": 1e-2, "max_updates": 1, "seed": 0,
        "num_mini_batches": 2, "ent_coef": 0.01, "kl_coef": 0.1, "reward_funcs": [write_sevens_reward(tmp_path)],
        "save_steps": 0, **extra,
    })


def one_update(config) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], int, object]:
    """Train one update; returns its metrics, the trained parameters, the gradients of its first optimizer
    step, how often the first block's MLP started (a module inside the checkpointed forward: its pre-hooks
    run again on the recompute), and the policy."""
    trainer = build_trainer(config)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    lm = unwrap_transformers_model(policy.pretrained_model)
    calls, grads = [], {}
    lm.transformer.h[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    apply_gradients = trainer.apply_gradients

    def recording():
        if not grads:
            grads.update({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
        return apply_gradients()

    trainer.apply_gradients = recording
    history = trainer.train()
    params = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    return history[0], params, grads, len(calls), policy


@pytest.mark.parametrize("lora", [False, True], ids=["value_head", "lora"])
def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir, tmp_path, lora):
    """One update with gradient_checkpointing: true trains the same parameters as without (the value head
    reads the lm head's input, outside the checkpointed blocks; LoRA's frozen embeddings need no
    grad-requiring input with non-reentrant checkpoints); the blocks really ran again in backward."""
    extra = LORA if lora else {}
    plain, params, grads, calls, _ = one_update(run_config(tiny_model_dir, tmp_path, "plain", **extra))
    checkpointed, params_ckpt, grads_ckpt, calls_ckpt, policy = one_update(
        run_config(tiny_model_dir, tmp_path, "ckpt", gradient_checkpointing=True, **extra))
    assert activation_checkpointing(unwrap_transformers_model(policy.pretrained_model))
    assert calls_ckpt > calls  # recomputed in backward
    assert set(params) == set(params_ckpt) and any(n.startswith("v_head.") for n in params)
    assert (not lora) or all("lora_" in n or n.startswith("v_head.") for n in params)
    assert set(grads) == set(grads_ckpt) == set(params)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-7, rtol=1e-5, msg=name)
    for name in params:
        torch.testing.assert_close(params_ckpt[name], params[name], atol=1e-6, rtol=1e-5, msg=name)
    for key in ("loss/policy", "loss/value", "entropy", "grad_norm"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key


def test_chunked_logprobs_key_gives_the_same_update(tiny_model_dir, tmp_path):
    """chunked_logprobs on (the default) and off: the same losses, entropy (with its bonus on) and gradients.
    (Not the same weights to 1e-6: Adam's first step is lr * sign(g) for a gradient near 0, rounding's sign.)"""
    chunked, _, grads, _, policy = one_update(run_config(tiny_model_dir, tmp_path, "chunked"))
    assert policy.chunked_logprobs
    full, _, grads_full, _, policy = one_update(run_config(tiny_model_dir, tmp_path, "full", chunked_logprobs=False))
    assert not policy.chunked_logprobs
    assert set(grads) == set(grads_full) and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_full[name], atol=1e-6, rtol=1e-4, msg=name)
    for key in ("loss/policy", "loss/value", "entropy", "kl/per_sequence", "grad_norm"):
        assert chunked[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key


OOM_KEYS = ("num_mini_batches", "gradient_accumulation_steps", "generation_batch_size", "max_new_tokens",
            "gradient_checkpointing", "chunked_logprobs", "use_peft")


@pytest.mark.parametrize("where, error", [
    ("forward", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")),
    ("sample", RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                            "you tried to allocate 85899345920 bytes.")),
    ("forward", RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)")),
])
def test_out_of_memory_names_the_keys_that_lower_memory(tiny_model_dir, tmp_path, monkeypatch, where, error):
    trainer = build_trainer(run_config(tiny_model_dir, tmp_path, "run"))

    def run_out(*args, **kwargs):
        raise error

    monkeypatch.setattr(trainer.sampler if where == "sample" else trainer, where, run_out)
    with pytest.raises(OutOfMemoryError) as caught:
        trainer.train()
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and caught.value.__cause__ is error
    assert all(key in message for key in OOM_KEYS), message
    assert "update 1" in message and ("generate" if where == "sample" else "train") in message
    assert "now 4 rows per forward" in message  # 8 rows / 2 mini-batches


def test_other_runtime_errors_pass_through(tiny_model_dir, tmp_path, monkeypatch):
    trainer = build_trainer(run_config(tiny_model_dir, tmp_path, "run"))
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(trainer, "forward", broken)
    with pytest.raises(RuntimeError) as caught:
        trainer.train()
    assert caught.value is error
