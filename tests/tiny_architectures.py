"""Tiny random configs of the causal-LM families the conformance suite covers
(tests/models/test_architectures.py, benchmarks/architecture_conformance.py). No llm_rl import here, so the
benchmark can measure any checkout.

To add an architecture: one line in ARCHITECTURES (its model_type and the config keys that make it tiny or
switch on what its forward does after the lm head).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

VOCAB = 15  # the character tokenizer: <pad>=0, <eos>=1, <unk>=2, '0'..'9'=3..12, '+'=13, '='=14
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    tie_word_embeddings=False,
)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
# model_type -> config keys on top of TINY. Post-processing after the lm head is switched on with values
# large enough to matter on a random model: softcapping (Gemma 2/3, VaultGemma, nanochat), logit scaling (Granite,
# Cohere, HyperCLOVA X), embedding/residual scaling (MiniCPM3).
ARCHITECTURES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": {},
    "mistral": {},
    "mixtral": dict(**MOE, router_jitter_noise=0.1),
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": dict(final_logit_softcapping=2.0),
    "gemma3_text": dict(final_logit_softcapping=2.0),
    "vaultgemma": dict(final_logit_softcapping=2.0),
    "phi": {},
    "phi3": {},
    "gpt_neox": dict(rotary_pct=0.5),
    "gptj": dict(rotary_dim=4, n_embd=32, n_layer=2, n_head=4),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "bloom": {},
    "starcoder2": {},
    "olmo2": {},
    "granite": dict(logits_scaling=4.0),
    "granite_swa": dict(logits_scaling=4.0),
    "granitemoe": dict(logits_scaling=4.0, **MOE),
    "granitemoeshared": dict(logits_scaling=4.0, shared_intermediate_size=32, **MOE),
    "granitemoehybrid": dict(logits_scaling=4.0, shared_intermediate_size=32, layer_types=["attention", "mamba"],
                             mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8, **MOE),
    "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.25),
    "cohere2_moe": dict(logit_scale=0.25, num_experts=4, num_experts_per_tok=2),
    "minicpm3": dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                     head_dim=None, num_key_value_heads=4, dim_model_base=16, scale_emb=2.0),
    "nanochat": dict(final_logit_softcapping=2.0),
    "hyperclovax": dict(logits_scaling=4.0),
    "laguna": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                   layer_types=["full_attention"] * 2, mlp_layer_types=["dense", "sparse"],
                   num_attention_heads_per_layer=[4, 4]),
}
# what real instruct checkpoints ship in generation_config.json (Qwen2.5-Instruct: repetition_penalty)
CHECKPOINT_GENERATION = dict(
    repetition_penalty=1.5, no_repeat_ngram_size=2, suppress_tokens=[5], bad_words_ids=[[6]], top_k=3, do_sample=True
)
PROMPTS = ["1+2=", "17+5=", "123+45=", "7+77=", "30+3=", "999+1=", "4+56=", "78+9="]  # different lengths


def tiny_config(model_type: str):
    """The tiny config with every dropout-like float (and Mixtral's router jitter) at 0.1."""
    config = AutoConfig.for_model(model_type, **{**TINY, **ARCHITECTURES[model_type]})
    for key, value in config.to_dict().items():
        if ("drop" in key or "jitter" in key) and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, key, 0.1)
    return config


def save_tiny_checkpoint(model_type: str, path: Path) -> None:
    """Build the tiny model (seed 0), give it the checkpoint generation config, save it (safetensors)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    model.generation_config = GenerationConfig(**CHECKPOINT_GENERATION, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(path)
