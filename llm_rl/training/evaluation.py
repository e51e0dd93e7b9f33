"""Held-out evaluation from the config: prompts the policy never trains on, scored by the eval rewards.

Every `eval_steps` updates and at the end, each process decodes its share of the held-out prompts
(every num_processes-th, from its rank) greedily and/or by sampling at the training temperature,
scores them with the eval rewards (default: the training rewards, with their weights), and the
totals are summed over processes, so each number is a mean over all held-out prompts:

    eval/<decoding>/score          weighted sum of the rewards (before scaling, clipping, EOS penalty)
    eval/<decoding>/reward/<name>  each reward's mean
    eval/<decoding>/length         response length in tokens
    eval/<decoding>/eos_rate       fraction of responses that ended with a stop token

`<decoding>` is `greedy` or `sampled` (`eval_decoding`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch

from llm_rl.data.prompts import PromptData
from llm_rl.rewards.functions import RewardFn, TrainerState, compute_rewards, reward_name
from llm_rl.sampling.hf import generate_responses, generating
from llm_rl.sampling.rollout import decode_responses


class Evaluator:
    """`evaluator(trainer) -> {'eval/greedy/score': ..., ...}` on `prompts` with `rewards`."""

    def __init__(self, prompts: PromptData, rewards: Sequence[RewardFn], weights: Optional[Sequence[float]],
                 decodings: Sequence[str]):
        self.prompts, self.rewards, self.weights, self.decodings = prompts, list(rewards), weights, list(decodings)

    @torch.no_grad()
    def __call__(self, trainer) -> dict[str, float]:
        acc = trainer.accelerator
        mine = list(range(acc.process_index, len(self.prompts), acc.num_processes))
        out = {}
        for decoding in self.decodings:
            totals = self.decode_and_score(trainer, mine, sample=decoding == "sampled")
            g = trainer.global_sum(totals)
            rows = max(g.pop("rows"), 1.0)
            out.update({f"eval/{decoding}/{k}": v / rows for k, v in g.items()})
        return out

    def decode_and_score(self, trainer, indices: list[int], sample: bool) -> dict[str, torch.Tensor]:
        """Sums over this process's held-out prompts (every key present on every process, even with none)."""
        acc = trainer.accelerator
        names = [f"reward/{reward_name(fn)}" for fn in self.rewards]
        totals = {k: torch.zeros(()) for k in ("rows", "score", "length", "eos_rate", *names)}
        settings = dataclasses.replace(trainer.sampling, do_sample=sample)
        chunk = settings.chunk_size
        with generating(trainer.model, acc) as lm:
            for start in range(0, len(indices), chunk):
                batch = self.prompts.batch(indices[start : start + chunk])
                ids, mask, ended = generate_responses(
                    lm, batch["prompt_ids"].to(acc.device), batch["prompt_mask"].to(acc.device), settings
                )
                lengths = mask.sum(dim=1)
                result = compute_rewards(
                    self.rewards, self.weights, batch["prompts"], decode_responses(trainer.tokenizer, ids, mask, ended),
                    batch["columns"], completion_ids=[row[:n] for row, n in zip(ids.tolist(), lengths.tolist())],
                    prompt_messages=batch.get("prompt_messages"), trainer_state=TrainerState(trainer.update, trainer.num_updates),
                )
                totals["rows"] += len(lengths)
                totals["score"] += result.sequence.sum()
                totals["length"] += lengths.float().sum().cpu()
                totals["eos_rate"] += ended.float().sum().cpu()
                for name, values in result.per_reward.items():
                    totals[f"reward/{name}"] += values.nan_to_num(0.0).sum()
        return totals

