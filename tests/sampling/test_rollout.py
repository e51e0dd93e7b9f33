import pytest
import torch

from llm_rl.models.forward import forward_logprobs
from llm_rl.models.value_head import CausalLMWithValueHead
from llm_rl.sampling.hf import generate_responses
from llm_rl.sampling.rollout import Rollout, logprobs_and_values, truncate_after_stop
from llm_rl.sampling.sampler import SamplingSettings

PAD, EOS = 0, 1
PROMPTS = [[4, 13, 5, 14], [4, 5, 13, 6, 7, 14], [4, 5, 6, 13, 7, 8, 9, 10, 14]]  # 1+2=  12+34=  123+4567=


# ----------------------------------------------------------------- truncate_after_stop


def run_truncate(rows, stop=(EOS,), pad=PAD):
    return truncate_after_stop(torch.tensor(rows), list(stop), pad)


def test_truncate_stop_in_the_middle():
    ids, mask, ended = run_truncate([[5, 6, 1, 7, 8]])
    assert ids.tolist() == [[5, 6, 1, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0]]  # the stop token itself is kept
    assert ended.tolist() == [True]


def test_truncate_stop_at_position_zero():
    ids, mask, ended = run_truncate([[1, 6, 7]])
    assert ids.tolist() == [[1, 0, 0]]
    assert mask.tolist() == [[1, 0, 0]]
    assert ended.tolist() == [True]


def test_truncate_no_stop():
    ids, mask, ended = run_truncate([[5, 6, 7]])
    assert ids.tolist() == [[5, 6, 7]]
    assert mask.tolist() == [[1, 1, 1]]
    assert ended.tolist() == [False]


def test_truncate_stop_twice_only_first_counts():
    ids, mask, ended = run_truncate([[5, 1, 6, 1, 7]])
    assert ids.tolist() == [[5, 1, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0, 0]]
    assert ended.tolist() == [True]


def test_truncate_two_stop_ids_and_batch():
    rows = [
        [5, 9, 6, 1, 7],  # second stop id (9) first
        [5, 6, 1, 9, 7],  # EOS first
        [5, 6, 7, 8, 3],  # neither
        [9, 9, 9, 9, 9],
    ]
    ids, mask, ended = run_truncate(rows, stop=(EOS, 9), pad=2)
    assert ids.tolist() == [[5, 9, 2, 2, 2], [5, 6, 1, 2, 2], [5, 6, 7, 8, 3], [9, 2, 2, 2, 2]]
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, True, False, True]
    assert ended.dtype == torch.bool


# ----------------------------------------------------------------- generate_responses


def generate(lm, prompts, pad_helpers, group_size=1, **kw):
    left_pad, _ = pad_helpers
    ids, mask = left_pad(prompts, PAD)
    args = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=[EOS], pad_token_id=PAD)
    args.update(kw)
    args.setdefault("chunk_size", len(prompts))
    settings = SamplingSettings(**{**args, "stop_token_ids": tuple(args["stop_token_ids"])})
    return generate_responses(lm, ids, mask, settings, group_size=group_size)


def first_stop_length(tokens, stops):
    for i, t in enumerate(tokens):
        if t in stops:
            return i + 1, True
    return len(tokens), False


def test_generate_greedy_batch_equals_each_prompt_alone(tiny_lm, pad_helpers):
    # Free-running greedy continuation of each prompt alone, unpadded, no stop token.
    alone = [generate(tiny_lm, [p], pad_helpers, do_sample=False, stop_token_ids=[99])[0][0].tolist() for p in PROMPTS]
    assert all(len(a) == 8 for a in alone)
    stop = alone[2][-1]  # a token the longest prompt's continuation does emit
    expected = [first_stop_length(a, {stop}) for a in alone]

    # Left-padded batch, two chunks of different widths.
    ids, mask, ended = generate(tiny_lm, PROMPTS, pad_helpers, do_sample=False, stop_token_ids=[stop], chunk_size=2)
    longest = max(n for n, _ in expected)
    assert ids.shape == mask.shape == (3, longest)
    for row, (n, stopped) in enumerate(expected):
        assert ids[row, :n].tolist() == alone[row][:n]
        assert ids[row, n:].tolist() == [PAD] * (longest - n)
        assert mask[row].tolist() == [1] * n + [0] * (longest - n)
        assert bool(ended[row]) is stopped


def check_consistent_with_truncation(ids, mask, ended, stops, max_new_tokens):
    lengths = mask.sum(dim=1)
    assert ids.shape == mask.shape
    assert ids.shape[1] == int(lengths.max())  # trimmed to the longest response
    for row in range(ids.shape[0]):
        n = int(lengths[row])
        tokens = ids[row].tolist()
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert tokens[n:] == [PAD] * (ids.shape[1] - n)
        assert not any(t in stops for t in tokens[: n - 1])  # no stop before the last kept token
        assert bool(ended[row]) == (n > 0 and tokens[n - 1] in stops)
        if not ended[row]:
            assert n == max_new_tokens  # a response that never stopped ran to the limit


def test_generate_sampling_masks_consistent(tiny_lm, pad_helpers):
    stops = [3, 4, 5, 6, 7]
    torch.manual_seed(0)
    ids, mask, ended = generate(
        tiny_lm, PROMPTS * 3, pad_helpers, max_new_tokens=10, stop_token_ids=stops, chunk_size=4
    )
    assert ids.shape[0] == 9
    check_consistent_with_truncation(ids, mask, ended, set(stops), 10)


def test_generate_trims_to_longest_response(tiny_lm, pad_helpers):
    every_token = list(range(tiny_lm.config.vocab_size))  # the first sampled token always stops
    ids, mask, ended = generate(tiny_lm, PROMPTS, pad_helpers, max_new_tokens=6, stop_token_ids=every_token)
    assert ids.shape == mask.shape == (3, 1)
    assert mask.tolist() == [[1], [1], [1]]
    assert ended.tolist() == [True, True, True]


# ----------------------------------------------------------------- log-probs


RESPONSES = [[6, 1], [7, 9, 1], [7, 9, 12, 3]]  # valid response tokens per row (right-padded to 4)


def manual_logprobs(lm, prompt, response, temperature):
    logits = lm(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp[torch.arange(len(response)), torch.tensor(response)].float()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@torch.no_grad()
def test_forward_logprobs_match_manual_log_softmax(tiny_lm, pad_helpers, temperature):
    left_pad, right_pad = pad_helpers
    policy = CausalLMWithValueHead(tiny_lm).eval()
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    response_ids, response_mask = right_pad(RESPONSES, 4, PAD)
    assert policy.chunked_logprobs  # the default path: from the lm head's input, in chunks
    logprobs, values, entropy = forward_logprobs(
        policy, prompt_ids, prompt_mask, response_ids, response_mask, temperature
    )
    assert logprobs.shape == values.shape == entropy.shape == (3, 4)
    for row, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        torch.testing.assert_close(
            logprobs[row, : len(r)], manual_logprobs(tiny_lm, p, r, temperature), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@torch.no_grad()
def test_logprobs_and_values_match_manual_and_zero_on_padding(tiny_lm, pad_helpers, temperature):
    left_pad, right_pad = pad_helpers
    policy = CausalLMWithValueHead(tiny_lm).eval()
    with torch.no_grad():
        policy.v_head.weight.normal_(std=1.0)
        policy.v_head.bias.fill_(0.3)
    prompt_ids, prompt_mask = left_pad(PROMPTS, PAD)
    response_ids, response_mask = right_pad(RESPONSES, 4, PAD)
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, ended=torch.tensor([True, True, False]))

    logprobs, values = logprobs_and_values(policy, rollout, temperature, chunk_size=2)
    assert logprobs.shape == values.shape == (3, 4)
    assert logprobs.dtype == values.dtype == torch.float32
    pad_positions = response_mask == 0
    assert pad_positions.sum() == 3
    assert torch.equal(logprobs[pad_positions], torch.zeros(3))
    assert torch.equal(values[pad_positions], torch.zeros(3))
    assert (values[~pad_positions] != 0).all()
    for row, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        torch.testing.assert_close(
            logprobs[row, : len(r)], manual_logprobs(tiny_lm, p, r, temperature), atol=1e-5, rtol=0
        )

    # one chunk gives the same numbers as chunks of two rows
    logprobs_1, values_1 = logprobs_and_values(policy, rollout, temperature, chunk_size=3)
    torch.testing.assert_close(logprobs_1, logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(values_1, values, atol=1e-6, rtol=0)

    ref_logprobs, ref_values = logprobs_and_values(policy, rollout, temperature, chunk_size=2, reference=True)
    assert ref_values is None
    torch.testing.assert_close(ref_logprobs, logprobs, atol=1e-6, rtol=0)
