"""The sampling seam: what a rollout engine is given (`SamplingSettings`) and what it must do (`Sampler`).

The trainer picks one `Sampler` when it is built (`llm_rl.sampling.hf.HFSampler` for single responses,
`llm_rl.sampling.episodes.EpisodeSampler` for multi-turn episodes) and its loop only calls
`sampler.sample(batch)`. A second engine (vLLM, `llm_rl.sampling.vllm`) plugs in here: it returns the same
`Rollout`, token ids and masks, and may fill `Rollout.sampler_logprobs` with its own per-token log-probs.
Episodes take their engine one level lower, as a `TurnEngine` that generates each assistant turn. Whatever the
engine, the trainer recomputes the old policy's log-probs with the training model; an engine's own
log-probs are only compared with them (`mismatch/*` metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from contextlib import AbstractContextManager
from typing import Optional, Protocol

import torch

from llm_rl.config.errors import ConfigError
from llm_rl.sampling.rollout import Rollout


@dataclass(frozen=True)
class SamplingSettings:
    """The run's sampling keys, resolved once: every engine and every call site reads them from here.

    Only these shape the sampling distribution; the log-probs PPO trains on are taken at `temperature`."""

    max_new_tokens: int
    temperature: float
    top_k: int  # 0 = off
    top_p: float  # 1.0 = off
    stop_token_ids: tuple[int, ...]  # EOS and the optional stop_token: a response ends at the first of them
    pad_token_id: int
    chunk_size: int  # rows per generate call (generation_batch_size)
    do_sample: bool = True  # False: greedy decoding (held-out evaluation)

    @classmethod
    def from_config(cls, sampling, tokenizer, rows: int) -> SamplingSettings:
        """From a `SamplingConfig` and the tokenizer; `rows` is the default chunk (one call per rollout)."""
        return cls(
            max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, stop_token_ids=stop_token_ids(tokenizer, sampling.stop_token),
            pad_token_id=tokenizer.pad_token_id, chunk_size=sampling.generation_batch_size or rows,
        )


def stop_token_ids(tokenizer, stop_token) -> tuple[int, ...]:
    """The tokenizer's EOS and `stop_token` (a single token's text) as ids; ConfigError when there is
    none (responses could never end) or the tokenizer has no pad token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if stop_token is not None:
        stop_ids = tokenizer.convert_tokens_to_ids([stop_token])
        if stop_ids[0] is None or stop_ids[0] == tokenizer.unk_token_id:
            raise ConfigError(f"stop_token {stop_token!r} is not a single token of the tokenizer")
        ids += stop_ids
    if not ids:
        raise ConfigError("the tokenizer has no eos_token and no stop_token is set: responses could never end")
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; llm_rl.models.loading.load_tokenizer adds one")
    return tuple(ids)


class Sampler(Protocol):
    """A rollout engine. `sample` turns one batch of the prompt data (`PromptData.batch` or
    `EpisodeRows.batch`) into a `Rollout`: num_generations rows per prompt, on consecutive rows.

    It fills token ids, masks, texts and, where it has them, `sampler_logprobs`; never the old policy's
    or the reference's log-probs (the trainer's phase 3). An engine holding its own copy of the weights
    brings them up to date inside `sample` (the trainer's model is what it samples from)."""

    def sample(self, batch: dict) -> Rollout: ...


class TurnGenerator(Protocol):
    """One assistant turn of several episodes at once: the engine's completion of each token-id context
    (unpadded), at most `max_new_tokens` tokens. Returns (response_ids, action_mask, ended, logprobs):
    (rows, longest) right-padded and cut after the first stop token as `truncate_after_stop` does, ended
    (rows,), and the engine's own log-prob of each sampled token (rows, longest), or None if it has none."""

    def __call__(self, contexts: list[list[int]], max_new_tokens: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]: ...


class TurnEngine(Protocol):
    """What samples the turns of one rollout's episodes (`llm_rl.sampling.hf.HFTurns`,
    `llm_rl.sampling.vllm.VLLMEngine`): `turns()` readies the engine once per rollout (gathers or pushes the
    current weights) and yields its `TurnGenerator`; `timing` holds the engine's own phases of the last one."""

    timing: dict[str, float]

    def turns(self) -> AbstractContextManager[TurnGenerator]: ...
