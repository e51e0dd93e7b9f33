"""Built-in multi-turn task: the primer's debugging chatbot, small enough to learn on a CPU.

A scripted user reports a bug ("b37>"). The bot can apologise politely ("p"): the user is pleased
(reward 1.0) and leaves. Or it can ask for the stack trace ("a"): less pleasant right now (0.4),
but the user sends it ("t5>": the bug is on line 5) and a bot that answers with that line ("5")
fixes the bug (1.5). Anything else confuses the user ("?>", 0.0) and the bot may try again.

With the turn discount gamma = 0.9, asking is worth 0.4 + 0.9 * 1.5 = 1.75 against 1.0 for the
apology; a myopic learner (gamma = 0) sees 0.4 against 1.0 and apologises. The higher immediate
reward is the worse choice over the episode, as in the primer's example.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Optional

import torch

from llm_rl.tasks import arithmetic

POLITE, ASK = "p", "a"
POLITE_REWARD, ASK_REWARD, FIX_REWARD = 1.0, 0.4, 1.5
CHARACTERS = list("0123456789") + ["b", "t", POLITE, ASK, "?", ">"]


class DebugUser:
    """The scripted user: one instance per episode, built from a row {"bug": "37", "line": "5"}."""

    def reset(self, row: dict) -> str:
        self.line, self.has_trace = str(row["line"]), False
        return f"b{row['bug']}>"

    def step(self, response: str) -> tuple[Optional[str], float, bool]:
        if self.has_trace:  # the bot has seen the trace: the fix is naming the line
            return None, FIX_REWARD if response == self.line else 0.0, True
        if response == POLITE:
            return None, POLITE_REWARD, True
        if response == ASK:
            self.has_trace = True
            return f"t{self.line}>", ASK_REWARD, False
        return "?>", 0.0, False


def make_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows; held-out bug numbers (80-99) never appear in training (10-79)."""
    rng = random.Random(seed)
    train = [{"bug": str(b), "line": str(rng.randrange(10))} for b in range(10, 80) for _ in range(4)]
    heldout = [{"bug": str(b), "line": str(line)} for b in range(80, 100) for line in (rng.randrange(10),)]
    return train, heldout


def build_tokenizer():
    return arithmetic.build_tokenizer(CHARACTERS)


def transcript(row: dict, ask: bool) -> list[tuple[str, bool]]:
    """A warm-start episode as (text, spoken by the bot) pieces."""
    if not ask:
        return [(f"b{row['bug']}>", False), (POLITE, True)]
    return [(f"b{row['bug']}>", False), (ASK, True), (f"t{row['line']}>", False), (row["line"], True)]


def supervised_warm_start(lm, tokenizer, rows: Sequence[dict], steps: int = 300, batch_size: int = 64,
                          learning_rate: float = 1e-3, seed: int = 0) -> list[float]:
    """Next-token loss on the bot's tokens (and their EOS) of transcripts that ask or apologise half
    the time each: the policy starts indifferent between the two behaviours, and able to fix."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=learning_rate, weight_decay=0.0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    losses = []
    lm.train()
    for _ in range(steps):
        picks = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
        asks = torch.rand(batch_size, generator=generator).lt(0.5).tolist()
        sequences, targets = [], []
        for i, ask in zip(picks, asks):
            ids, labels = [], []
            for text, bot in transcript(rows[i], ask):
                piece = tokenizer(text, add_special_tokens=False).input_ids + ([eos] if bot else [])
                ids += piece
                labels += piece if bot else [-100] * len(piece)
            sequences.append(ids)
            targets.append(labels)
        width = max(map(len, sequences))
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        loss = lm(input_ids=input_ids, attention_mask=(labels != -100) | (input_ids != pad), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    lm.eval()
    return losses


@torch.no_grad()
def behaviour(lm, tokenizer, rows: Sequence[dict], greedy: bool, temperature: float = 1.0, gamma: float = 0.9,
              max_turns: int = 3) -> dict:
    """Play one episode per row: the share of first replies that ask / apologise, the fix rate after a
    trace, and the mean discounted return."""
    from llm_rl.sampling.episodes import run_episodes
    from llm_rl.sampling.sampler import SamplingSettings

    users = [DebugUser() for _ in rows]
    settings = SamplingSettings(max_new_tokens=2, temperature=temperature, top_k=0, top_p=1.0,
                                stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
                                chunk_size=len(rows), do_sample=not greedy)
    episodes = run_episodes(lm, tokenizer, users, list(rows), settings, max_turns=max_turns, max_episode_tokens=16,
                            device=next(lm.parameters()).device)
    first = [t.split("<eos>")[0] for t in episodes.transcripts]
    turn_index = episodes.turn_ends.long().cumsum(dim=1) - episodes.turn_ends.long()  # turn of each token
    discount = torch.where(episodes.action_mask.bool(), gamma ** turn_index.float(), torch.zeros(()))
    returns = (episodes.turn_scores * discount).sum(dim=1)
    asked = [f == ASK for f in first]
    fixed = [t.endswith(f"t{r['line']}>{r['line']}<eos>") for t, r in zip(episodes.transcripts, rows)]
    return {
        "ask_rate": sum(asked) / len(rows),
        "polite_rate": sum(f == POLITE for f in first) / len(rows),
        "fix_rate": sum(fixed) / max(sum(asked), 1),
        "return": float(returns.mean()),
        "turns": float(episodes.num_turns.float().mean()),
    }


@torch.no_grad()
def exact_return(lm, tokenizer, row: dict, gamma: float, temperature: float = 1.0, max_turns: int = 3,
                 prune: float = 1e-6) -> tuple[float, float]:
    """E[sum_k gamma^k R_k] of the sampling policy in this task, by walking the tree of every reply
    (one token then EOS, or two tokens cut at max_new_tokens=2) with its probability under the
    policy and the environment's deterministic answer; branches below `prune` probability are dropped.
    Returns (expected return, probability mass dropped)."""
    from llm_rl.algorithms.ops import left_pad
    from llm_rl.models.value_head import position_ids_from_mask

    eos = tokenizer.eos_token_id

    def next_token_probs(contexts: list[list[int]]) -> torch.Tensor:  # (n, vocab)
        ids, mask = left_pad(contexts, tokenizer.pad_token_id)
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        logits = logits.float()
        return torch.softmax(logits / temperature, dim=-1)

    dropped = 0.0

    def value(context: list[int], user: DebugUser, turn: int, mass: float) -> float:
        nonlocal dropped
        if turn == max_turns:
            return 0.0
        first = next_token_probs([context])[0]
        seconds = [t for t in range(len(first)) if t != eos and mass * first[t] >= prune]
        second = next_token_probs([context + [t] for t in seconds]) if seconds else None
        replies = [([eos], float(first[eos]))] if mass * first[eos] >= prune else []
        for k, t in enumerate(seconds):
            replies += [([t, u], float(first[t] * second[k, u])) for u in range(second.shape[1])
                        if mass * first[t] * second[k, u] >= prune]
        dropped += mass * (1.0 - sum(p for _, p in replies))
        total = 0.0
        for reply, p in replies:
            text = tokenizer.decode(reply[:-1] if reply[-1] == eos else reply, skip_special_tokens=True)
            branch = copy.deepcopy(user)
            observation, reward, done = branch.step(text)
            future = 0.0
            if not done:
                obs_ids = tokenizer(observation, add_special_tokens=False).input_ids
                future = value(context + reply + obs_ids, branch, turn + 1, mass * p)
            total += p * (reward + gamma * future)
        return total

    user = DebugUser()
    first_observation = user.reset(row)
    expected = value(tokenizer(first_observation).input_ids, user, 0, 1.0)
    return expected, dropped
