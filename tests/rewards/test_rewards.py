"""Reward functions (loading, calling, checking what they return) and the reward model as a reward."""

import math

import pytest
import torch
from conftest import length_reward

from llm_rl.rewards.functions import (
    RewardError,
    compute_rewards,
    load_reward_function,
    reward_name,
    validate_rewards,
)
from llm_rl.rewards.model import RewardModel

# ----------------------------------------------------------------- compute_scores


def exact_match(prompts, completions, answer, **_):
    return [float(c == a) for c, a in zip(completions, answer)]


def test_compute_scores_weighted_sum_with_columns():
    prompts = ["1+2=", "7+8=", "3+4="]
    completions = ["3", "16", "7"]
    columns = {"answer": ["3", "15", "7"]}
    result = compute_rewards([length_reward, exact_match], [0.5, 2.0], prompts, completions, columns)
    # length: [1, 2, 1]; exact: [1, 0, 1] -> 0.5 * length + 2 * exact
    assert result.sequence.tolist() == [2.5, 1.0, 2.5]
    assert result.sequence.dtype == torch.float32
    assert result.means == pytest.approx({"length_reward": 4 / 3, "exact_match": 2 / 3})
    assert result.valid.all() and result.tokens is None

    result = compute_rewards([length_reward, exact_match], None, prompts, completions, columns)
    assert result.sequence.tolist() == [2.0, 2.0, 2.0]


def test_compute_scores_accepts_tensor_output():
    def tensor_reward(prompts, completions, **_):
        return torch.tensor([0.25, -1.0])

    result = compute_rewards([tensor_reward], [2.0], ["a", "b"], ["x", "y"], {})
    assert result.sequence.tolist() == [0.5, -2.0]


def bad_reward(output):
    def fn(prompts, completions, **_):
        return output

    fn.__name__ = "my_bad_reward"
    return fn


@pytest.mark.parametrize(
    "output, fragment",
    [
        ([1.0, math.nan, 0.0], "NaN"),
        ([1.0, 0.0, math.inf], "inf"),
        ([1.0, 2.0], "2 scores for 3"),
        (["good", "bad", "ugly"], "row 0 = 'good' of type str"),
        ([1.0, "1.0", 0.0], "row 1 = '1.0' of type str; return one float (or None) per completion"),  # never 1.0
        ([1.0, [0.5], 0.0], "mixes per-sequence floats and per-token lists"),
        (None, "one float per completion"),
        (3.0, "one float per completion"),
    ],
)
def test_bad_reward_outputs_raise_naming_the_reward(output, fragment):
    fn = bad_reward(output)
    with pytest.raises(RewardError, match="my_bad_reward") as e:
        compute_rewards([length_reward, fn], None, ["p"] * 3, ["a", "b", "c"], {})
    assert fragment in str(e.value)
    with pytest.raises(RewardError, match="my_bad_reward"):
        validate_rewards(output, 3, "my_bad_reward")


def test_nan_rows_are_listed():
    with pytest.raises(RewardError, match=r"rows \[1, 3\]"):
        validate_rewards([0.0, float("nan"), 1.0, float("-inf")], 4, "r")


def test_reward_that_raises_is_named():
    def crashing_reward(prompts, completions, **_):
        raise KeyError("answer")

    with pytest.raises(RewardError, match="crashing_reward") as e:
        compute_rewards([crashing_reward], None, ["p"], ["c"], {})
    assert "KeyError" in str(e.value) and "answer" in str(e.value)


def test_missing_column_is_reported():
    with pytest.raises(RewardError, match="exact_match"):
        compute_rewards([exact_match], None, ["p"], ["c"], {})  # no 'answer' column


# ----------------------------------------------------------------- load_reward_function


def test_load_reward_function_from_module():
    fn = load_reward_function("llm_rl.tasks.arithmetic:reward")
    assert fn(["1+2="], ["3"], answer=["3"]) == [1.0]
    assert reward_name(fn) == "reward"  # metrics name it reward/reward, not by its module path


def test_load_reward_function_from_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    fn = load_reward_function(f"{path}:length")
    assert fn(["p", "q"], ["abc", ""]) == [3.0, 0.0]
    assert reward_name(fn) == "length"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_such_module_xyz_123:f", "no_such_module_xyz_123"),
        ("llm_rl.tasks.arithmetic:no_such_function", "no_such_function"),
        ("llm_rl.tasks.arithmetic:PAD", "PAD"),  # exists but is not callable
        ("llm_rl.tasks.arithmetic", "module:function"),
        ("llm_rl.tasks.arithmetic:", "module:function"),
    ],
)
def test_load_reward_function_errors(spec, fragment):
    with pytest.raises(RewardError, match=fragment):
        load_reward_function(spec)


def test_load_reward_function_missing_file_or_attribute(tmp_path):
    with pytest.raises(RewardError, match="not found"):
        load_reward_function(f"{tmp_path / 'missing.py'}:f")
    path = tmp_path / "rewards_file.py"
    path.write_text("def other(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(RewardError, match="'wanted'"):
        load_reward_function(f"{path}:wanted")


# ----------------------------------------------------------------- RewardModel


def save_reward_model(path, with_pad: bool):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from llm_rl.tasks.arithmetic import build_tokenizer

    tokenizer = build_tokenizer()
    if not with_pad:
        tokenizer.pad_token = None
        assert tokenizer.pad_token is None
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=1,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2ForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    return save_reward_model(root / "with_pad", True), save_reward_model(root / "no_pad", False)


PROMPTS = ["1+2=", "12+34=", "123+4567=", "9+9="]
COMPLETIONS = ["3", "46", "4690", "18"]


@pytest.mark.parametrize("which", ["with_pad", "no_pad"])
def test_reward_model_scores_are_padding_independent(reward_model_dirs, which):
    path = reward_model_dirs[0] if which == "with_pad" else reward_model_dirs[1]
    rm = RewardModel.from_pretrained(str(path), batch_size=8)
    assert rm.tokenizer.pad_token is not None
    batched = rm(PROMPTS, COMPLETIONS)
    assert len(batched) == 4 and all(isinstance(s, float) for s in batched)
    alone = [rm([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 4) for s in batched)) == 4  # different texts, different scores
    # several mini-batches give the same numbers
    rm.batch_size = 3
    assert rm(PROMPTS, COMPLETIONS) == pytest.approx(batched, abs=1e-5)


def test_reward_model_same_scores_with_or_without_pad_token(reward_model_dirs):
    with_pad = RewardModel.from_pretrained(str(reward_model_dirs[0]))
    no_pad = RewardModel.from_pretrained(str(reward_model_dirs[1]))
    assert no_pad(PROMPTS, COMPLETIONS) == pytest.approx(with_pad(PROMPTS, COMPLETIONS), abs=1e-5)


def test_reward_model_scores_whole_text(reward_model_dirs):
    """The score is read at the last real token: a different completion changes it."""
    rm = RewardModel.from_pretrained(str(reward_model_dirs[0]))
    assert rm(["1+2="], ["3"])[0] != pytest.approx(rm(["1+2="], ["4"])[0], abs=1e-6)


def test_reward_model_in_compute_rewards(reward_model_dirs):
    rm = RewardModel.from_pretrained(str(reward_model_dirs[0]))
    result = compute_rewards([rm], [2.0], PROMPTS, COMPLETIONS, {"answer": ["3", "46", "4690", "18"]})
    assert result.sequence.tolist() == pytest.approx([2.0 * s for s in rm(PROMPTS, COMPLETIONS)], abs=1e-5)
    assert list(result.means) == [reward_name(rm)]


def test_reward_model_needs_one_label(reward_model_dirs):
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=15, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=2, pad_token_id=0)
    with pytest.raises(RewardError, match="num_labels=1"):
        RewardModel(GPT2ForSequenceClassification(config), AutoTokenizer.from_pretrained(reward_model_dirs[0]))


def test_reward_model_truncation_keeps_the_completion(reward_model_dirs):
    """An over-long text must lose the start of its prompt, never the completion being scored."""
    full = RewardModel.from_pretrained(str(reward_model_dirs[0]))
    capped = RewardModel.from_pretrained(str(reward_model_dirs[0]), max_length=6)
    # "123+4567=" + "1" is 10 tokens; its last 6 are "4567=1"
    assert capped(["123+4567="], ["1"]) == pytest.approx(full(["4567="], ["1"]), abs=1e-5)
    assert capped(["123+4567="], ["1"])[0] != pytest.approx(capped(["123+4567="], ["2"])[0], abs=1e-6)
