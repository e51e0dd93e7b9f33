"""Single responses from transformers' `generate` on the training model: the embedded default engine.

    sampler = HFSampler(model, accelerator, tokenizer, settings, num_generations)
    rollout = sampler.sample(batch)     # Rollout: num_generations responses per prompt, cut at the stop token

The generation config is built from the run's sampling keys only (`sampling_config`), and a group's
prompt goes through the model once (`llm_rl.models.value_head.shared_prompt_cache`).
"""

from __future__ import annotations

import contextlib

import torch

from llm_rl.algorithms.ops import left_pad
from llm_rl.models.value_head import cache_argument, can_share_prompts, eval_mode, gathered_for_generation, shared_prompt_cache
from llm_rl.sampling.rollout import Rollout, decode_responses, truncate_after_stop
from llm_rl.sampling.sampler import SamplingSettings


def sampling_config(settings: SamplingSettings, max_new_tokens: int | None = None):
    """The `GenerationConfig` of a rollout, built from the run's sampling keys only (`max_new_tokens`:
    a shorter budget, e.g. an episode's last turn).

    Every logits processor is set explicitly to its neutral value: a checkpoint's saved
    `generation_config.json` (repetition_penalty, no_repeat_ngram_size, bad_words_ids,
    min_length, suppress_tokens, top_k=50, ...) would otherwise change the distribution
    tokens are sampled from, while PPO scores them under `softmax(logits / temperature)`.
    """
    from transformers import GenerationConfig

    s = settings
    sampling = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p) if s.do_sample else {}
    return GenerationConfig(
        do_sample=s.do_sample,
        max_new_tokens=max_new_tokens or s.max_new_tokens,
        min_new_tokens=None,
        min_length=0,
        num_beams=1,
        num_return_sequences=1,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        sequence_bias=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        min_p=None,
        exponential_decay_length_penalty=None,
        renormalize_logits=False,
        remove_invalid_values=False,
        eos_token_id=list(s.stop_token_ids),
        pad_token_id=s.pad_token_id,
        use_cache=True,
        **sampling,
    )


@contextlib.contextmanager
def generation_settings(lm, config):
    """Swap `config` in as the model's own generation config while generating: transformers
    fills every key a passed config leaves unset from the model's, so passing ours is not enough."""
    saved = lm.generation_config
    lm.generation_config = config
    try:
        yield
    finally:
        lm.generation_config = saved


@torch.no_grad()
def generate_responses(
    lm,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: SamplingSettings,
    group_size: int = 1,
    max_new_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or decode greedily) with the KV cache in chunks of `settings.chunk_size` prompts.

    `group_size` > 1: the rows come in consecutive groups of `group_size` copies of one prompt
    (num_generations). Each distinct prompt then goes through the model once: the KV cache of all its
    tokens but the last is computed for one copy and repeated for the others, and `generate` goes on from
    there. Same distribution, a 1/group_size share of the prompt's forward cost.

    Returns (response_ids, action_mask, ended), trimmed to the longest response.
    """
    config = sampling_config(settings, max_new_tokens)
    budget, chunk, pad_id = config.max_new_tokens, settings.chunk_size, settings.pad_token_id
    share = group_size > 1 and chunk % group_size == 0 and prompt_ids.shape[1] > 1 and can_share_prompts(lm)
    pieces = []
    with generation_settings(lm, config):
        for start in range(0, prompt_ids.shape[0], chunk):
            ids, mask = prompt_ids[start : start + chunk], prompt_mask[start : start + chunk]
            # every prompt token but the last, once per group: generate runs the last one and onwards
            cache = cache_argument(lm, shared_prompt_cache(lm, ids[:, :-1], mask[:, :-1], group_size)) if share else {}
            out = lm.generate(input_ids=ids, attention_mask=mask, generation_config=config, **cache)
            response = out[:, ids.shape[1] :]
            # generate stops when every row is done, so chunks can differ in length
            pieces.append(torch.nn.functional.pad(response, (0, budget - response.shape[1]), value=pad_id))
    response_ids, action_mask, ended = truncate_after_stop(torch.cat(pieces), list(settings.stop_token_ids), pad_id)
    longest = max(int(action_mask.sum(dim=1).max()), 1)
    return response_ids[:, :longest], action_mask[:, :longest], ended


@contextlib.contextmanager
def generating(model, accelerator):
    """The training model's transformers LM, ready for `generate`: full weights (ZeRO-3 / FSDP gathered once),
    eval mode, and the same autocast as the forwards that score the sampled tokens."""
    with eval_mode(accelerator.unwrap_model(model)), gathered_for_generation(model, accelerator) as lm, \
            accelerator.autocast():
        yield lm


def repeat_rows(items: list, times: int) -> list:
    """Each item `times` times on consecutive rows: a prompt's completions sit together."""
    return [item for item in items for _ in range(times)]


def hf_turn_generator(lm, settings: SamplingSettings, device):
    """A `TurnGenerator` over `generate` on `lm` (inside `generating`): contexts left-padded into one batch."""
    def generate_turn(contexts: list[list[int]], max_new_tokens: int):
        ids, mask = left_pad(contexts, settings.pad_token_id)
        return *generate_responses(lm, ids.to(device), mask.to(device), settings, max_new_tokens=max_new_tokens), None

    return generate_turn


class HFTurns:
    """Episode turns through transformers' `generate` on the training model (`EpisodeSampler`'s default)."""

    def __init__(self, model, accelerator, settings: SamplingSettings):
        self.model, self.accelerator, self.settings = model, accelerator, settings
        self.timing: dict[str, float] = {}  # no phases of its own: generate is all of time/generate

    @contextlib.contextmanager
    def turns(self):
        with generating(self.model, self.accelerator) as lm:
            yield hf_turn_generator(lm, self.settings, self.accelerator.device)


class HFSampler:
    """`Sampler` over transformers' `generate` on the training model. `share_prompts`: run a group's prompt
    once (off where the model is sharded, FSDP / DeepSpeed, which run that extra forward untested)."""

    def __init__(self, model, accelerator, tokenizer, settings: SamplingSettings, num_generations: int,
                 share_prompts: bool = True):
        self.model, self.accelerator, self.tokenizer, self.settings = model, accelerator, tokenizer, settings
        self.num_generations = num_generations
        self.group_size = num_generations if share_prompts else 1

    @torch.no_grad()
    def sample(self, batch: dict) -> Rollout:
        device, repeat = self.accelerator.device, self.num_generations
        prompt_ids = batch["prompt_ids"].repeat_interleave(repeat, 0).to(device)
        prompt_mask = batch["prompt_mask"].repeat_interleave(repeat, 0).to(device)
        with generating(self.model, self.accelerator) as lm:
            response_ids, action_mask, ended = generate_responses(
                lm, prompt_ids, prompt_mask, self.settings, group_size=self.group_size
            )
        return Rollout(
            prompt_ids, prompt_mask, response_ids, action_mask, ended,
            prompts=repeat_rows(batch["prompts"], repeat), prompt_messages=repeat_rows(batch["prompt_messages"], repeat),
            completions=decode_responses(self.tokenizer, response_ids, action_mask, ended),
            columns={name: repeat_rows(values, repeat) for name, values in batch["columns"].items()},
            group_size=self.group_size,
        )

