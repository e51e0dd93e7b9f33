"""LoRA: the reference is the adapter-disabled policy (no copy), only adapters + value head train."""

from __future__ import annotations

import torch
from conftest import addition_prompts, build_trainer, ppo_config, write_sevens_reward
from transformers import AutoModelForCausalLM

from llm_rl.config.sections import Config
from llm_rl.sampling.rollout import Rollout, logprobs_and_values


def lora_config(tiny_model_dir, tmp_path, **extra) -> Config:
    return ppo_config(tiny_model_dir, addition_prompts(tmp_path), tmp_path / "out", **{
        "use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["c_attn", "c_fc"],
        "batch_size": 8, "max_new_tokens": 4, "learning_rate": 1e-2, "max_updates": 2,
        "reward_funcs": [write_sevens_reward(tmp_path)], "kl_coef": 0.1, **extra,
    })


def test_reference_is_the_adapter_disabled_base_model(tiny_model_dir, tmp_path):
    trainer = build_trainer(lora_config(tiny_model_dir, tmp_path))
    assert trainer.ref_model is None  # no second copy of the weights
    policy = trainer.accelerator.unwrap_model(trainer.model)
    # make the adapter matter: LoRA's B starts at zero, so perturb it
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = trainer.tokenizer
    prompt = torch.tensor([tok("12+34=").input_ids])
    response = torch.tensor([tok("46").input_ids + [tok.eos_token_id]])
    rollout = Rollout(prompt, torch.ones_like(prompt), response, torch.ones_like(response), torch.tensor([True]))

    with trainer.reference() as ref:
        ref_logprobs, _ = logprobs_and_values(ref, rollout, temperature=1.0, chunk_size=1, reference=True)
    policy_logprobs, _ = logprobs_and_values(policy, rollout, temperature=1.0, chunk_size=1)
    ids = torch.cat([prompt, response], 1)
    base_logprobs = torch.log_softmax(base(ids).logits[0, prompt.shape[1] - 1 : -1], -1)
    expected = base_logprobs.gather(-1, response[0, :, None])[:, 0]
    torch.testing.assert_close(ref_logprobs[0], expected, atol=1e-5, rtol=0)
    assert (policy_logprobs - ref_logprobs).abs().max() > 1e-3  # the adapter is back on outside the context


def test_lora_run_trains_only_adapter_and_value_head(tiny_model_dir, tmp_path):
    trainer = build_trainer(lora_config(tiny_model_dir, tmp_path))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("v_head.") for n in trainable)
    assert any(n.startswith("v_head.") for n in trainable)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer.train()
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert "v_head.weight" in changed and any("lora_A" in n for n in changed)

    # the output folder holds the adapter (not a full model) and reloads with plain peft
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "value_head.safetensors").is_file() and not (out / "model.safetensors").exists()
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    ids = torch.tensor([trainer.tokenizer("12+34=46").input_ids])
    torch.testing.assert_close(reloaded(ids).logits, policy.pretrained_model(ids).logits, atol=1e-5, rtol=0)


def test_merge_adapter_saves_a_plain_model(tiny_model_dir, tmp_path):
    trainer = build_trainer(lora_config(tiny_model_dir, tmp_path, merge_adapter=True, max_updates=1))
    trainer.train()
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    policy = trainer.accelerator.unwrap_model(trainer.model).pretrained_model
    ids = torch.tensor([trainer.tokenizer("12+34=46").input_ids])
    torch.testing.assert_close(plain(ids).logits, policy(ids).logits, atol=1e-5, rtol=0)


def test_lora_keeps_the_chunked_logprobs_unless_it_adapts_the_lm_head(tiny_model_dir, tmp_path):
    """Adapters inside the model leave the lm head a plain linear layer: log-probs stay chunked. An adapter
    on the head itself (added after the check at load) makes the forward take the logits path, which
    includes the adapter's output."""
    from llm_rl.models.lm_head import plain_linear_head
    from llm_rl.models.value_head import unwrap_transformers_model

    for targets, chunked in ((["c_attn", "c_fc"], True), (["c_attn", "lm_head"], False)):
        trainer = build_trainer(lora_config(tiny_model_dir, tmp_path / str(chunked), lora_target_modules=targets))
        policy = trainer.accelerator.unwrap_model(trainer.model)
        assert (plain_linear_head(unwrap_transformers_model(policy.pretrained_model)) is not None) == chunked
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
        tok = trainer.tokenizer
        ids = torch.tensor([tok("12+34=46").input_ids + [tok.eos_token_id]])
        mask = torch.ones_like(ids)
        logprobs, _, entropy = policy(ids, mask, 6, tokens=ids[:, 6:])
        logits, _ = policy(ids, mask, 6)
        expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 6:, None])[..., 0]
        torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)
        assert trainer.train()[0]["entropy"] > 0
