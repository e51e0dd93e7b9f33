"""Architecture conformance: what is sampled is exactly what PPO trains on, for every family users run.

Each architecture is a tiny random model built offline from its config, with dropout 0.1 in every
config field that has one (Mixtral: router jitter too) and a saved `generation_config.json` holding
settings real checkpoints ship (repetition penalty, no-repeat n-grams, suppressed and bad words).
It is saved and loaded back through `from_pretrained`, the path a Hub checkpoint takes. Checked:

- the log-probs PPO trains on (training mode) equal `log_softmax(model(...).logits / T)` of the plain
  transformers model (eval mode, each row alone, unpadded) at the sampled tokens, to 1e-5;
- the distribution `generate()` sampled from (its processed scores) equals the one PPO scores;
- before any step the PPO ratio is 1 to 1e-6, and the value head reads the same hidden state in the
  rollout and in training;
- one PPO update runs and the saved policy reloads with plain transformers.

The architectures and their tiny configs are in tests/tiny_architectures.py; adding one is one line there.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import build_trainer, length_reward, ppo_config, sample_rollout, write_jsonl
from tiny_architectures import ARCHITECTURES, PROMPTS, save_tiny_checkpoint, tiny_config
from transformers import AutoModelForCausalLM

from llm_rl.config.sections import Config
from llm_rl.models.forward import forward_logprobs
from llm_rl.models.loading import load_tokenizer
from llm_rl.models.value_head import CausalLMWithValueHead, disable_dropout
from llm_rl.sampling.hf import generate_responses, generation_settings, sampling_config
from llm_rl.sampling.rollout import truncate_after_stop
from llm_rl.sampling.sampler import SamplingSettings
from llm_rl.tasks.arithmetic import build_tokenizer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds its own Accelerator


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoint(request, tmp_path_factory) -> Path:
    """A saved tiny checkpoint of one architecture: weights, tokenizer, generation_config.json."""
    model_type = request.param
    path = tmp_path_factory.mktemp(model_type)
    save_tiny_checkpoint(model_type, path)
    build_tokenizer().save_pretrained(path)
    write_jsonl(path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return path


def prompt_batch(tokenizer, prompts=PROMPTS[:4]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")  # left padding
    return encoded["input_ids"], encoded["attention_mask"]


def run_config(path: Path, output_dir: Path, **overrides) -> Config:
    values = dict(batch_size=4, max_new_tokens=5, num_mini_batches=2, max_updates=1, learning_rate=1e-3, seed=0,
                  temperature=0.7)
    return ppo_config(path, path / "prompts.jsonl", output_dir, **{**values, **overrides})


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_trained_logprobs_and_sampled_distribution_equal_the_plain_model(checkpoint, temperature):
    tokenizer = load_tokenizer(str(checkpoint))
    policy = CausalLMWithValueHead.from_pretrained(str(checkpoint))
    disable_dropout(policy)  # what the trainer does; the model stays in training mode below
    lm = policy.pretrained_model
    prompt_ids, prompt_mask = prompt_batch(tokenizer)

    # sample through the rollout's own generation settings, keeping the processed scores
    config = sampling_config(SamplingSettings(max_new_tokens=5, temperature=temperature, top_k=0, top_p=1.0, stop_token_ids=(1,), pad_token_id=0, chunk_size=1))
    recorded = copy.deepcopy(config)
    recorded.output_scores, recorded.return_dict_in_generate = True, True
    lm.eval()
    torch.manual_seed(1)
    with torch.no_grad(), generation_settings(lm, recorded):
        out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=recorded)
    torch.manual_seed(1)
    response_ids, response_mask, _ = generate_responses(lm, prompt_ids, prompt_mask, SamplingSettings(max_new_tokens=5, temperature=temperature, top_k=0, top_p=1.0, stop_token_ids=(1,), pad_token_id=0, chunk_size=4))
    sampled = out.sequences[:, prompt_ids.shape[1] :]
    ids, mask, _ = truncate_after_stop(sampled, [1], 0)
    assert torch.equal(response_ids, ids[:, : response_ids.shape[1]])  # the rollout samples exactly this way

    policy.train()
    logprobs, _, _ = forward_logprobs(policy, prompt_ids, prompt_mask, ids, mask, temperature)  # chunked if it can
    logits, _ = policy(torch.cat([prompt_ids, ids], 1), torch.cat([prompt_mask, mask], 1), prompt_ids.shape[1])
    scored = torch.log_softmax(logits.float() / temperature, dim=-1)  # (batch, resp, vocab) what PPO scores
    processed = torch.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1)  # what generate sampled from
    valid = mask.bool()
    torch.testing.assert_close(scored[valid], processed[valid], atol=1e-5, rtol=0)

    plain = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        for row in range(len(ids)):
            prompt = prompt_ids[row][prompt_mask[row].bool()]
            response = ids[row][valid[row]]
            alone = plain(torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(alone.float() / temperature, -1).gather(-1, response[:, None])[:, 0]
            torch.testing.assert_close(logprobs[row][valid[row]], expected, atol=1e-5, rtol=0)


def test_ratio_is_one_value_head_agrees_and_an_update_reloads(checkpoint, tmp_path):
    trainer = build_trainer(run_config(checkpoint, tmp_path / "run"), [length_reward])
    trainer.fused = False  # the rollout takes the old log-probs and values in its own no-grad forward
    rollout = sample_rollout(trainer, [0, 1, 2, 3])
    assert rollout.response_mask.sum() > 0
    trainer.model.train()
    logprobs, values, _ = trainer.forward(rollout)
    valid = rollout.response_mask.bool()
    ratio = (logprobs.detach().float() - rollout.logprobs).exp()
    assert (ratio - 1).abs()[valid].max() <= 1e-6
    assert (values.detach().float() - rollout.values).abs()[valid].max() <= 1e-6

    history = trainer.train()
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss/total"]))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    trained = trainer.accelerator.unwrap_model(trainer.model).pretrained_model.state_dict()
    before = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in before)  # the update changed the policy
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_checkpoint_generation_config_would_change_sampling(tmp_path):
    """Control for the checks above: the saved generation_config does change generate()'s scores
    when the model's own settings are used, so an equality above is a real one."""
    path = tmp_path / "llama"
    save_tiny_checkpoint("llama", path)
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt_ids, prompt_mask = prompt_batch(build_tokenizer())
    common = dict(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=3, temperature=1.0, top_k=0,
                  output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(1)
    leaky = lm.generate(**common)
    torch.manual_seed(1)
    ours = copy.deepcopy(sampling_config(SamplingSettings(max_new_tokens=3, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(1,), pad_token_id=0, chunk_size=1)))
    ours.output_scores, ours.return_dict_in_generate = True, True
    with generation_settings(lm, ours):
        clean = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=ours)
    assert torch.isinf(leaky.scores[0][:, 5]).all()  # suppress_tokens leaked in
    assert torch.isfinite(clean.scores[0]).all()


def test_dropout_in_config_floats_is_off(checkpoint):
    """Every config float that applies dropout in training mode is zeroed: two training-mode forwards
    agree. Control: with the configs' 0.1 left in place they differ."""
    ids, mask = prompt_batch(build_tokenizer())
    raw = AutoModelForCausalLM.from_pretrained(checkpoint).train()
    torch.manual_seed(0)
    first = raw(input_ids=ids, attention_mask=mask).logits
    second = raw(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(first, second), "the config's dropout at 0.1 should make training mode random"
    disable_dropout(raw)
    assert torch.equal(raw(input_ids=ids, attention_mask=mask).logits, raw(input_ids=ids, attention_mask=mask).logits)


def test_a_groups_prompt_runs_once_with_the_same_samples_logprobs_values_and_gradients(checkpoint):
    """num_generations rows per prompt: each prompt's forward runs once and its keys and values are repeated
    to the group (`shared_prompt_cache`), in generation and in the training forward. Left-padded prompts of
    different lengths, right-padded responses: the same samples, log-probs, values and gradients."""
    tokenizer = load_tokenizer(str(checkpoint))
    policy = CausalLMWithValueHead.from_pretrained(str(checkpoint))
    disable_dropout(policy)
    # Mamba-style layers keep a recurrent state that transformers' cache cannot repeat: those run each row
    assert policy.shares_prompts == (policy.config.model_type not in ("granitemoehybrid",))
    group = 3
    prompt_ids, prompt_mask = (t.repeat_interleave(group, 0) for t in prompt_batch(tokenizer, PROMPTS[:2]))
    lm = policy.pretrained_model.eval()
    sampled = []
    for group_size in (1, group):
        torch.manual_seed(2)
        with torch.no_grad():
            sampled.append(generate_responses(lm, prompt_ids, prompt_mask, SamplingSettings(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(1,), pad_token_id=0, chunk_size=6), group_size=group_size))
    for plain, shared in zip(*sampled):
        assert torch.equal(plain, shared)

    response_ids = torch.randint(3, 13, (6, 4), generator=torch.Generator().manual_seed(0))
    response_mask = (torch.arange(4)[None, :] < torch.tensor([4, 2, 3, 1, 4, 3])[:, None]).long()
    valid = response_mask.bool()
    policy.train()
    results = []
    for group_size in (1, group):
        policy.zero_grad()
        logprobs, values, _ = forward_logprobs(policy, prompt_ids, prompt_mask, response_ids, response_mask, 0.7,
                                               group_size=group_size)
        (logprobs[valid].sum() + values[valid].sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((logprobs.detach()[valid], values.detach()[valid], grads))
    (lp1, v1, g1), (lp2, v2, g2) = results
    torch.testing.assert_close(lp2, lp1, atol=1e-5, rtol=0)
    torch.testing.assert_close(v2, v1, atol=1e-5, rtol=0)
    assert set(g1) == set(g2)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------- chunked log-probs (llm_rl.algorithms.chunked)
# architectures that the check at load keeps on the unchunked path (full logits), and why: none today
UNCHUNKED: dict[str, str] = {}
TIED = ("gpt2", "llama", "gemma2", "cohere", "granite")  # also run with tied input and output embeddings


def chunked_and_unchunked(policy: CausalLMWithValueHead, chunk_size: int = 3) -> dict[str, float]:
    """The training forward both ways on left-padded prompts and right-padded responses, in training mode:
    log-probs, entropy, values and the gradients of a mix of all three must agree. Returns the largest
    differences (chunks of `chunk_size` positions: 3 does not divide the 16 positions)."""
    prompt_ids, prompt_mask = prompt_batch(build_tokenizer())
    response_ids = torch.randint(3, 13, (4, 4), generator=torch.Generator().manual_seed(0))
    response_mask = (torch.arange(4)[None, :] < torch.tensor([4, 2, 3, 1])[:, None]).long()
    ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    valid = response_mask.bool()
    weights = torch.randn(2, int(valid.sum()), generator=torch.Generator().manual_seed(1))
    policy.logprob_chunk_size = chunk_size
    policy.train()
    results = []
    for chunked in (False, True):
        policy.zero_grad()
        logprobs, values, entropy = policy(ids, mask, prompt_ids.shape[1], tokens=response_ids, temperature=0.7,
                                           chunked=chunked)
        ((logprobs[valid] * weights[0]).sum() + (entropy[valid] * weights[1]).sum() + values[valid].sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((logprobs.detach()[valid], entropy.detach()[valid], values.detach()[valid], grads))
    (lp1, ent1, v1, g1), (lp2, ent2, v2, g2) = results
    torch.testing.assert_close(lp2, lp1, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent2, ent1, atol=1e-5, rtol=0)
    torch.testing.assert_close(v2, v1, atol=1e-6, rtol=0)
    assert set(g1) == set(g2) and policy.pretrained_model.get_output_embeddings().weight.grad is not None
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)
    return {"logprobs": float((lp2 - lp1).abs().max()), "entropy": float((ent2 - ent1).abs().max()),
            "grads": max(float((g2[n] - g1[n]).abs().max()) for n in g1)}


def test_chunked_logprobs_equal_the_unchunked_values_and_gradients(checkpoint):
    """Every architecture takes the chunked path (but those in UNCHUNKED) and it gives the unchunked numbers:
    log-probs, entropy, values and gradients, with softcapping and logit scaling after the head. The check
    at load is a real one: without its post-head transform a model fails it."""
    policy = CausalLMWithValueHead.from_pretrained(str(checkpoint))
    disable_dropout(policy)
    model_type = policy.config.model_type
    assert policy.chunked_logprobs == (model_type not in UNCHUNKED), policy.chunked_head_problem
    diffs = chunked_and_unchunked(policy)
    print(f"chunked vs unchunked, {model_type}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    if policy.logit_transform is not None:  # Gemma 2/3 softcapping, Granite / Cohere / HyperCLOVA X scaling
        policy.logit_transform = None
        assert policy._check_chunked_head() is not None


@pytest.mark.parametrize("model_type", TIED)
def test_chunked_logprobs_with_tied_embeddings(model_type):
    """Tied input and output embeddings: one weight gets the gradient of the embedding and of the head."""
    config = tiny_config(model_type)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    policy = CausalLMWithValueHead(lm)
    disable_dropout(policy)
    assert policy.chunked_logprobs, policy.chunked_head_problem
    diffs = chunked_and_unchunked(policy, chunk_size=5)
    print(f"chunked vs unchunked, tied {model_type}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def test_chunked_logprobs_key_and_a_failed_check_keep_the_unchunked_path(tmp_path):
    """`chunked_logprobs: false` keeps the logits path; so does a model whose check at load failed, even
    when the key asks for chunks."""
    path = tmp_path / "gemma2"
    save_tiny_checkpoint("gemma2", path)
    policy = CausalLMWithValueHead.from_pretrained(str(path))
    assert policy.use_chunked_logprobs(False) is False and not policy.chunked_logprobs
    assert policy.use_chunked_logprobs(True) is True
    policy.chunked_head_problem = "a test"
    assert policy.use_chunked_logprobs(True) is False


def test_the_chunked_training_forward_keeps_no_vocab_sized_tensor():
    """On the chunked path autograd keeps no (batch, len, vocab) tensor; the unchunked path, the control,
    keeps its logits and their softmax. (No hook on the lm head here: a hooked head takes the logits path.)"""
    config = tiny_config("llama")
    config.vocab_size = 97  # no other dimension of the model is 97
    torch.manual_seed(0)
    policy = CausalLMWithValueHead(AutoModelForCausalLM.from_config(config))
    disable_dropout(policy)
    policy.train()
    ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    assert policy.chunked_logprobs and policy._chunked_head(True) is not None
    for chunked in (True, False):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, shapes=shapes: shapes.append(tuple(t.shape)) or t,
                                                      lambda t: t):
            logprobs, values, entropy = policy(ids, torch.ones_like(ids), 5, tokens=ids[:, 5:], chunked=chunked)
        vocab_sized = [s for s in shapes if len(s) >= 2 and s[-1] == 97 and s[0] == 4]  # (4, 7, 97): logits
        assert bool(vocab_sized) == (not chunked), vocab_sized
        (logprobs.sum() + entropy.sum() + values.sum()).backward()
