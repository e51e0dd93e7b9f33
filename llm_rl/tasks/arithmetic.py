"""Built-in verifiable task: multi-digit addition ("357+468=" -> "825").

Everything here is built offline: a character-level tokenizer, a small GPT-2-style
model from a config, and problem splits. The held-out problems are a fixed set of
operand pairs that the training split never contains.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARACTERS = list("0123456789+=")


def build_tokenizer(characters: Sequence[str] = CHARACTERS):
    """A character-level fast tokenizer: one token per digit/symbol, plus pad, eos and unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in characters:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    return tokenizer


def build_model(tokenizer, n_layer: int = 4, n_embd: int = 128, n_head: int = 4, n_positions: int = 32):
    """A randomly initialised GPT-2-style causal LM sized for the task."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def make_splits(num_digits: int, num_train: int, num_heldout: int, seed: int = 0) -> tuple[list, list]:
    """Disjoint train and held-out problems with operands of up to `num_digits` digits.

    The held-out set is drawn first from a generator seeded by `seed` alone, so it is the
    same for every run with the same seed, and training pairs are drawn from the rest.
    """
    high = 10**num_digits
    if num_train + num_heldout > high * high:
        raise ValueError(f"only {high * high} distinct problems with {num_digits} digits")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()

    def draw(n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            pair = (rng.randrange(high), rng.randrange(high))
            if pair not in seen:
                seen.add(pair)
                out.append(Problem(*pair))
        return out

    heldout = draw(num_heldout)
    train = draw(num_train)
    return train, heldout


def reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **_) -> list[float]:
    """1.0 when the completion is exactly the sum, else 0.0 (no partial credit to game)."""
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]


def write_jsonl(problems: Sequence[Problem], path: Path) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n")
    return path


def supervised_warm_start(
    lm,
    tokenizer,
    problems: Sequence[Problem],
    max_steps: int,
    target_accuracy: float = 1.0,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    check_every: int = 50,
) -> list[float]:
    """Teach the format and some arithmetic: next-token loss on the answer and EOS only.

    Stops after `max_steps`, or earlier once greedy exact match on 256 *training* problems
    reaches `target_accuracy`: the policy should start competent but far from perfect,
    whatever the seed, leaving room for RL. Returns the loss of every step.
    """
    generator = torch.Generator().manual_seed(seed)
    probe = [problems[i] for i in torch.randperm(len(problems), generator=generator)[:256].tolist()]
    optimizer = torch.optim.AdamW(lm.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    losses = []
    for step in range(1, max_steps + 1):
        lm.train()
        rows = torch.randint(len(problems), (batch_size,), generator=generator).tolist()
        input_ids, labels = sft_batch([problems[i] for i in rows], tokenizer)
        loss = lm(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if target_accuracy < 1.0 and step % check_every == 0:
            texts = complete(lm, tokenizer, probe, greedy=True)[0]
            if sum(reward(None, texts, [p.answer for p in probe])) / len(probe) >= target_accuracy:
                break
    lm.eval()
    return losses


@torch.no_grad()
def complete(lm, tokenizer, problems: Sequence[Problem], greedy: bool, temperature: float = 1.0,
             max_new_tokens: int = 6):
    """Answer every problem in one batch: (texts, rollout) with the prompts, responses and masks."""
    from llm_rl.algorithms.ops import left_pad
    from llm_rl.sampling.hf import generate_responses
    from llm_rl.sampling.rollout import Rollout, decode_responses
    from llm_rl.sampling.sampler import SamplingSettings

    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    prompt_ids, prompt_mask = left_pad([tokenizer(p.prompt).input_ids for p in problems], tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                                stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
                                chunk_size=len(problems), do_sample=not greedy)
    response_ids, action_mask, ended = generate_responses(lm, prompt_ids, prompt_mask, settings)
    lm.train(was_training)
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, action_mask, ended)
    return decode_responses(tokenizer, response_ids, action_mask, ended), rollout


def sft_batch(problems: Sequence[Problem], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer+EOS ids (batch, len) and labels that are -100 outside the answer."""
    prompts = [tokenizer(p.prompt).input_ids for p in problems]
    answers = [tokenizer(p.answer).input_ids + [tokenizer.eos_token_id] for p in problems]
    longest = max(len(p) + len(a) for p, a in zip(prompts, answers))
    input_ids = torch.full((len(problems), longest), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(problems), longest), -100, dtype=torch.long)
    for row, (p, a) in enumerate(zip(prompts, answers)):
        input_ids[row, : len(p) + len(a)] = torch.tensor(p + a)
        labels[row, len(p) : len(p) + len(a)] = torch.tensor(a)
    return input_ids, labels
