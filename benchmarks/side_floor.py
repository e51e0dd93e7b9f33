"""ppo_update.py's floor (`--floor`): the model passes one PPO update needs, each timed alone, in plain
transformers and torch (neither llm_rl nor TRL): `model.generate` (KV cache, sampling), one reference forward
(+ log-probs of the sampled tokens), one policy+value forward without grad, one reward-model forward, one
training step (policy+value forward, PPO-shaped loss, backward, AdamW); interleaved, after 2 warm-ups.
"""

from __future__ import annotations

import json
import time

try:  # imported as benchmarks.side_floor, or from a driver run as a script (its folder on sys.path)
    from . import harness
except ImportError:
    import harness


def floor_worker(a, assets: dict) -> dict:
    """The model passes one update needs, each timed alone (median over repeats)."""
    harness.silence()
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    s, size = harness.PPO_SETTINGS, assets["size"]
    torch.manual_seed(s["seed"] + a._round)
    tokenizer = AutoTokenizer.from_pretrained(assets["policy"])
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    ref = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval().requires_grad_(False)
    reward = AutoModelForSequenceClassification.from_pretrained(assets["reward"], num_labels=1).eval()
    reward.config.pad_token_id = tokenizer.pad_token_id  # as llm_rl's RewardModel does; never present in the ids
    v_head = torch.nn.Linear(policy.config.n_embd, 1)
    params = list(policy.parameters()) + list(v_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=s["learning_rate"], weight_decay=0.0)
    B, P, N = size["batch_size"], size["prompt_len"], size["max_new_tokens"]
    prompts = [json.loads(line)["prompt"] for line in open(assets["data"])][:B]
    prompt_ids = torch.tensor([tokenizer(p).input_ids for p in prompts])
    prompt_mask = torch.ones_like(prompt_ids)

    def generate():
        with torch.no_grad():
            out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
                                  temperature=1.0, max_new_tokens=N, pad_token_id=tokenizer.pad_token_id)
        return out

    full = generate()
    assert full.shape == (B, P + N), full.shape
    mask = torch.ones_like(full)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    response = full[:, P:]

    def logprobs(logits):
        return torch.gather(logits.log_softmax(-1), 2, response[..., None]).squeeze(-1)

    def ref_forward():
        with torch.no_grad():
            logits = ref(input_ids=full, attention_mask=mask, position_ids=pos, logits_to_keep=N + 1).logits[:, :-1]
            return logprobs(logits)

    def policy_value_forward(grad=False):
        with torch.set_grad_enabled(grad):
            hidden = policy.transformer(input_ids=full, attention_mask=mask, position_ids=pos).last_hidden_state
            hidden = hidden[:, P - 1:-1]
            return logprobs(policy.lm_head(hidden)), v_head(hidden).squeeze(-1)

    def reward_forward():
        with torch.no_grad():
            return reward(input_ids=full, attention_mask=mask, position_ids=pos).logits[:, 0]

    old_lp, old_v = policy_value_forward()
    adv = torch.randn_like(old_lp)
    ret = torch.randn_like(old_v)

    def train_step():
        lp, v = policy_value_forward(grad=True)
        ratio = (lp - old_lp).exp()
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        vf = 0.5 * torch.max((v - ret) ** 2, (old_v + (v - old_v).clamp(-0.2, 0.2) - ret) ** 2).mean()
        (pg + 0.1 * vf).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    passes = {"generate": generate, "ref_forward": ref_forward, "policy_value_forward": policy_value_forward,
              "reward_forward": reward_forward, "train_step": train_step}
    repeats = max(a.updates, 5)
    times = {name: [] for name in passes}
    for _ in range(2):  # warm-up
        for fn in passes.values():
            fn()
    rss_setup, _ = harness.setup_memory(policy, ref, reward)
    for _ in range(repeats):  # interleaved, so load changes hit every pass alike
        for name, fn in passes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"side": "floor", "passes": times, "rss_after_setup_mb": rss_setup, "peak_rss_mb": harness.peak_rss_mb(),
            "threads": torch.get_num_threads(), "tokens_per_update": B * N}
