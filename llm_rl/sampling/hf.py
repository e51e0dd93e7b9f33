"""TODO docstring"""

from __future__ import annotations

import contextlib

import torch

from llm_rl.models.value_head import can_share_prompts, shared_prompt_cache
from llm_rl.sampling.rollout import truncate_after_stop


def sampling_config(
    *, max_new_tokens: int, temperature: float, top_k: int, top_p: float, stop_token_ids: list[int],
    pad_token_id: int, do_sample: bool = True,
):
    """The `GenerationConfig` of a rollout, built from the run's sampling keys only.

    Every logits processor is set explicitly to its neutral value: a checkpoint's saved
    `generation_config.json` (repetition_penalty, no_repeat_ngram_size, bad_words_ids,
    min_length, suppress_tokens, top_k=50, ...) would otherwise change the distribution
    tokens are sampled from, while PPO scores them under `softmax(logits / temperature)`.
    """
    from transformers import GenerationConfig

    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
    return GenerationConfig(
        do_sample=do_sample,
        max_new_tokens=max_new_tokens,
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
        eos_token_id=stop_token_ids,
        pad_token_id=pad_token_id,
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
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stop_token_ids: list[int],
    pad_token_id: int,
    chunk_size: int,
    do_sample: bool = True,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or decode greedily) with the KV cache in chunks of `chunk_size` prompts.

    `group_size` > 1: the rows come in consecutive groups of `group_size` copies of one prompt
    (num_generations). Each distinct prompt then goes through the model once: the KV cache of all its
    tokens but the last is computed for one copy and repeated for the others, and `generate` goes on from
    there. Same distribution, a 1/group_size share of the prompt's forward cost.

    Returns (response_ids, response_mask, ended), trimmed to the longest response.
    """
    config = sampling_config(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, do_sample=do_sample,
    )
    share = group_size > 1 and chunk_size % group_size == 0 and prompt_ids.shape[1] > 1 and can_share_prompts(lm)
    pieces = []
    with generation_settings(lm, config):
        for start in range(0, prompt_ids.shape[0], chunk_size):
            ids, mask = prompt_ids[start : start + chunk_size], prompt_mask[start : start + chunk_size]
            # every prompt token but the last, once per group: generate runs the last one and onwards
            cache = {"past_key_values": shared_prompt_cache(lm, ids[:, :-1], mask[:, :-1], group_size)} if share else {}
            out = lm.generate(input_ids=ids, attention_mask=mask, generation_config=config, **cache)
            response = out[:, ids.shape[1] :]
            # generate stops when every row is done, so chunks can differ in length
            pad = max_new_tokens - response.shape[1]
            pieces.append(torch.nn.functional.pad(response, (0, pad), value=pad_token_id))
    response_ids, response_mask, ended = truncate_after_stop(torch.cat(pieces), stop_token_ids, pad_token_id)
    longest = max(int(response_mask.sum(dim=1).max()), 1)
    return response_ids[:, :longest], response_mask[:, :longest], ended
