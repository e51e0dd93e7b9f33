"""The `Rollout` type every sampler returns, and the no-grad forwards that read a rollout.

Every per-token tensor of a `Rollout` is aligned to response positions: column t of `logprobs`,
`values`, `ref_logprobs`, `action_mask` and `response_mask` all refer to `response_ids[:, t]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from llm_rl.algorithms.ops import select_rows
from llm_rl.models.forward import forward_logprobs
from llm_rl.models.value_head import CausalLMWithValueHead


@dataclass(frozen=True)
class Rollout:
    """What was sampled, and what the policy and the reference said about it before any step.

    Two masks, the same two words in every type of the package:
      `action_mask`   the policy's tokens (the actions): the only ones that get log-probs, KL, values,
                      advantages and a loss. Single-turn: the response up to and including its stop token.
      `response_mask` every real token after the prompt: what the forwards attend to. Single-turn it is the
                      action mask; in a multi-turn episode it also covers the environment's observations.

    Frozen: the later phases return their own values (`Scores`, `Targets`) instead of writing here;
    `dataclasses.replace` makes a copy with more fields filled (phase 3 adds the old policy's and the
    reference's log-probs)."""

    prompt_ids: torch.Tensor  # (batch, prompt_len), left-padded
    prompt_mask: torch.Tensor  # (batch, prompt_len)
    response_ids: torch.Tensor  # (batch, resp_len), pad after the stop token
    action_mask: torch.Tensor  # (batch, resp_len) 1 on the policy's tokens, the stop token included
    ended: torch.Tensor  # (batch,) bool: the response emitted a stop token (multi-turn: the episode is done)
    response_mask: Optional[torch.Tensor] = None  # (batch, resp_len) every real token; None: the action mask
    logprobs: Optional[torch.Tensor] = None  # (batch, resp_len) log pi_old(a_t | x_t); None until phase 3
    values: Optional[torch.Tensor] = None  # (batch, resp_len) V_old(x_t); None without a value head
    ref_logprobs: Optional[torch.Tensor] = None  # (batch, resp_len); None when nothing reads the reference
    sampler_logprobs: Optional[torch.Tensor] = None  # (batch, resp_len) the engine's own log-probs, if it has them
    prompts: list = field(default_factory=list)  # prompt texts, as the policy saw them
    prompt_messages: list = field(default_factory=list)  # chat messages of each prompt, or None (plain text)
    completions: list = field(default_factory=list)  # response texts, stop token removed (multi-turn: transcripts)
    columns: dict = field(default_factory=dict)  # other dataset columns, passed to reward functions
    group_size: int = 1  # consecutive rows that share one prompt exactly (num_generations), run once per group
    # multi-turn episodes (llm_rl.sampling.episodes)
    turn_ends: Optional[torch.Tensor] = None  # (batch, resp_len) bool: last token of each bot turn
    turn_scores: Optional[torch.Tensor] = None  # (batch, resp_len) the environment's reward on each turn's last token
    final_values: Optional[torch.Tensor] = None  # (batch,) V after the last token of an episode cut before done
    num_turns: Optional[torch.Tensor] = None  # (batch,)

    def __post_init__(self):
        if self.response_mask is None:
            object.__setattr__(self, "response_mask", self.action_mask)

    @property
    def is_episode(self) -> bool:
        """Multi-turn: the response region holds bot turns and observations, and the turn fields are set."""
        return self.turn_ends is not None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: torch.Tensor, width: Optional[int] = None) -> Rollout:
        """The `rows` of every tensor field, response columns cut to `width`; text fields are left out."""
        return Rollout(**select_rows(self, rows, width, prompt_fields=("prompt_ids", "prompt_mask")))


def truncate_after_stop(
    response_ids: torch.Tensor, stop_token_ids: list[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first stop token; pad the rest.

    response_ids (batch, n) -> (ids (batch, n), mask (batch, n), ended (batch,) bool).
    """
    is_stop = torch.isin(response_ids, torch.tensor(stop_token_ids, device=response_ids.device))
    # stops seen strictly before t: a position is kept while none has been seen yet.
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()
    mask = stops_before == 0
    ids = response_ids.masked_fill(~mask, pad_token_id)
    return ids, mask.long(), is_stop.any(dim=1)


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor, ended: torch.Tensor) -> list[str]:
    """Response texts without the stop token or padding."""
    lengths, stops = response_mask.sum(dim=1).tolist(), ended.tolist()
    kept = [row[: n - int(stop)] for row, n, stop in zip(response_ids.tolist(), lengths, stops)]
    return tokenizer.batch_decode(kept, skip_special_tokens=True)


@torch.no_grad()
def logprobs_and_values(
    model: CausalLMWithValueHead,
    rollout: Rollout,
    temperature: float,
    chunk_size: int,
    reference: bool = False,
    group_size: int = 1,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """No-grad log-probs (and values) of a rollout's responses in chunks of `chunk_size` rows; 0 off the
    policy's tokens (`action_mask`). `group_size` > 1: each group's prompt runs once."""
    logprobs, values = [], []
    for start in range(0, len(rollout), chunk_size):
        rows = slice(start, start + chunk_size)
        lp, v, _ = forward_logprobs(
            model,
            rollout.prompt_ids[rows],
            rollout.prompt_mask[rows],
            rollout.response_ids[rows],
            rollout.response_mask[rows],
            temperature,
            group_size=group_size if chunk_size % group_size == 0 else 1,
            entropy=False,
        )
        logprobs.append(lp)
        if v is not None and not reference:
            values.append(v)
    mask = rollout.action_mask.bool()
    logprobs = torch.cat(logprobs).masked_fill(~mask, 0.0)
    values = torch.cat(values).float().masked_fill(~mask, 0.0) if values else None
    return logprobs.float(), values


@torch.no_grad()
def bootstrap_values(model: CausalLMWithValueHead, rollout: Rollout, chunk_size: int) -> torch.Tensor:
    """(batch,) V of the state after each row's last real token: where an episode cut before it was
    done would go on. One extra padding column lets the last position of the longest row be read."""
    region = torch.nn.functional.pad(rollout.response_mask, (0, 1))
    ids = torch.nn.functional.pad(rollout.response_ids, (0, 1))
    lengths = rollout.response_mask.sum(dim=1)
    out = []
    for start in range(0, len(rollout), chunk_size):
        rows = slice(start, start + chunk_size)
        mask = torch.cat([rollout.prompt_mask[rows], region[rows]], dim=1)
        # given the tokens, the forward skips the (rows, len, vocab) logits where it can (chunked_logprobs)
        _, values, _ = model(torch.cat([rollout.prompt_ids[rows], ids[rows]], dim=1), mask,
                             response_start=rollout.prompt_ids.shape[1], tokens=ids[rows], entropy=False)
        # values[:, j] is V before region token j, so j = length is V after the last real token
        out.append(values.float().gather(1, lengths[rows, None].long())[:, 0])
    return torch.cat(out)
