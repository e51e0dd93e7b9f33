"""Measure, per architecture, how far what PPO trains on is from what was sampled.

For each tiny architecture of tests/models/test_architectures.py (dropout 0.1 in every config field, a saved
generation_config with a repetition penalty, no-repeat n-grams, suppressed and bad words):

- logprob_vs_plain: max |log-prob PPO trains on - log_softmax(plain model logits / T)| at the sampled tokens
  (plain model in eval mode, each row alone, unpadded);
- logprob_vs_sampler: max |log-prob PPO trains on - log-prob of the same token under the distribution
  generate() sampled from| (its processed scores);
- ratio_dev: max |pi_train / pi_rollout - 1| before any step (rollout forward in eval mode, training
  forward in training mode, as the trainer runs them).

Only the public llm_rl API is used, so the script also measures an older checkout:
`PYTHONPATH=/path/to/old/checkout python benchmarks/architecture_conformance.py`.

    python benchmarks/architecture_conformance.py [--temperature 0.7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from llm_rl.sampling.sampler import SamplingSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_architectures import ARCHITECTURES, PROMPTS, save_tiny_checkpoint  # noqa: E402

from llm_rl.models.forward import forward_logprobs  # noqa: E402
from llm_rl.models.value_head import CausalLMWithValueHead, disable_dropout  # noqa: E402
from llm_rl.sampling.hf import generate_responses
from llm_rl.tasks.arithmetic import build_tokenizer  # noqa: E402


def measure(model_type: str, folder: Path, temperature: float) -> dict:
    from transformers import AutoModelForCausalLM

    save_tiny_checkpoint(model_type, folder)
    tokenizer = build_tokenizer()
    encoded = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]

    policy = CausalLMWithValueHead.from_pretrained(str(folder))
    disable_dropout(policy)
    lm = policy.pretrained_model
    scores = []  # generate's processed scores, captured through the rollout's own call
    generate = lm.generate

    def recording_generate(*args, **kwargs):
        kwargs.update(output_scores=True, return_dict_in_generate=True)
        out = generate(*args, **kwargs)
        scores.append(torch.stack(out.scores, dim=1))
        return out.sequences

    lm.generate = recording_generate
    lm.eval()
    torch.manual_seed(1)
    response_ids, response_mask, _ = generate_responses(lm, prompt_ids, prompt_mask, SamplingSettings(max_new_tokens=6, temperature=temperature, top_k=0, top_p=1.0, stop_token_ids=(1,), pad_token_id=0, chunk_size=len(PROMPTS)))
    valid = response_mask.bool()
    with torch.no_grad():
        rollout_logprobs, _, _ = forward_logprobs(policy, prompt_ids, prompt_mask, response_ids, response_mask,
                                                  temperature)
        policy.train()
        logprobs, _, _ = forward_logprobs(policy, prompt_ids, prompt_mask, response_ids, response_mask, temperature)
    sampler = torch.log_softmax(scores[0][:, : response_ids.shape[1]].float(), -1)
    sampler = sampler.gather(-1, response_ids[..., None])[..., 0]

    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    vs_plain = 0.0
    with torch.no_grad():
        for row in range(len(PROMPTS)):
            prompt = prompt_ids[row][prompt_mask[row].bool()]
            response = response_ids[row][valid[row]]
            logits = plain(torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1 : -1].float()
            truth = torch.log_softmax(logits / temperature, -1).gather(-1, response[:, None])[:, 0]
            vs_plain = max(vs_plain, float((logprobs[row][valid[row]] - truth).abs().max()))
    return {
        "architecture": model_type,
        "class": type(plain).__name__,
        "logprob_vs_plain": vs_plain,
        "logprob_vs_sampler": float((logprobs - sampler).abs()[valid].max()),
        "ratio_dev": float(((logprobs - rollout_logprobs).exp() - 1).abs()[valid].max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    rows = []
    print("| architecture | class | max logprob diff vs plain model | vs sampler | ratio deviation |")
    print("|---|---|---|---|---|")
    for model_type in ARCHITECTURES:
        with tempfile.TemporaryDirectory() as folder:
            row = measure(model_type, Path(folder), args.temperature)
        rows.append(row)
        print(f"| {model_type} | {row['class']} | {row['logprob_vs_plain']:.2e} | {row['logprob_vs_sampler']:.2e} "
              f"| {row['ratio_dev']:.2e} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
