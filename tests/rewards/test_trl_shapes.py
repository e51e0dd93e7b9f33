"""Reward functions written the way TRL's documentation writes them run unchanged: called by keyword, chat
completions as message lists, dataset columns as keywords, completion_ids and trainer_state to those that
take them, None where a reward does not apply. llm_rl's first convention, positional, still works."""

import re

import pytest
import torch

from llm_rl.rewards.functions import RewardError, TrainerState, check_signature, compute_rewards

# --- the shapes of TRL's documented rewards (written here; the signatures are TRL's)


def think_format(completions, **kwargs):
    """1 when the reply opens with a <think>...</think> block (chat: completion[0]["content"])."""
    return [1.0 if re.match(r"^<think>.*?</think>", c[0]["content"], re.DOTALL) else 0.0 for c in completions]


def matches_solution(completions, solution, **kwargs):
    """A dataset column (`solution`) by keyword."""
    return [float(c[0]["content"].strip().endswith(s)) for c, s in zip(completions, solution)]


def overlong(completion_ids, **kwargs):
    """TRL's soft overlong punishment shape: only completion_ids; -1 per token over 3, capped at -2."""
    return [max(-2.0, -float(max(0, len(ids) - 3))) for ids in completion_ids]


def asked_math(prompts, completions, **kwargs):
    """Reads the prompt's messages; None for prompts that are not arithmetic (this reward does not apply)."""
    return [None if "+" not in p[-1]["content"] else 0.5 for p in prompts]


def warm_up_bonus(completions, trainer_state, **kwargs):
    """A bonus that fades with the update count (TRL's trainer_state.global_step)."""
    return [1.0 / (1 + trainer_state.global_step)] * len(completions)


def legacy(prompts, completions, answer):
    """llm_rl's first convention: the text prompt, the completion string, the column; no **kwargs."""
    return [float(c == a) for c, a in zip(completions, answer)]


def positional(p, c, **columns):
    """Positional parameters under other names: called positionally."""
    return [float(len(x)) for x in c]


CHAT = [[{"role": "user", "content": "1+2="}], [{"role": "user", "content": "Say hi"}]]
TEXTS = ["<user>1+2=<bot>", "<user>Say hi<bot>"]  # what a chat template rendered
REPLIES = ["<think>add</think>3", "hi"]
IDS = [[5, 6, 7, 8, 9], [10, 2]]


def test_chat_data_gets_trl_shapes_and_columns_by_keyword():
    rewards = [think_format, matches_solution, overlong, asked_math, warm_up_bonus]
    result = compute_rewards(rewards, [1.0, 2.0, 1.0, 1.0, 1.0], TEXTS, REPLIES, {"solution": ["3", "bye"]},
                             completion_ids=IDS, prompt_messages=CHAT, trainer_state=TrainerState(3, 10))
    per = {k: v.tolist() for k, v in result.per_reward.items()}
    assert per["think_format"] == [1.0, 0.0]
    assert per["matches_solution"] == [1.0, 0.0]
    assert per["overlong"] == [-2.0, 0.0]  # 5 tokens: 2 over; 2 tokens: none over
    assert per["asked_math"][0] == 0.5 and torch.isnan(torch.tensor(per["asked_math"][1]))
    assert per["warm_up_bonus"] == [0.25, 0.25]  # 1 / (1 + 3)
    # row 0: 1 + 2*1 - 2 + 0.5 + 0.25; row 1: 0 + 0 + 0 + (None: nothing) + 0.25, still valid
    assert result.sequence.tolist() == pytest.approx([1.75, 0.25])
    assert result.valid.tolist() == [True, True]
    assert result.means["asked_math"] == 0.5  # over the rows it applies to


def test_plain_text_data_gets_strings():
    seen = {}

    def record(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, keys=sorted(kwargs))
        return [0.0] * len(completions)

    compute_rewards([record], None, ["1+2="], ["3"], {"answer": ["3"]}, completion_ids=[[4]],
                    prompt_messages=[None], trainer_state=TrainerState(0, 1))
    assert seen == {"prompts": ["1+2="], "completions": ["3"],
                    "keys": ["answer", "completion_ids", "prompt_messages", "trainer_state"]}


def test_a_completion_no_reward_applies_to_is_invalid_with_a_warning():
    def only_first(completions, **kwargs):
        return [1.0] + [None] * (len(completions) - 1)

    with pytest.warns(RuntimeWarning, match="2 of 3 completions got None from every reward"):
        result = compute_rewards([only_first], None, ["a", "b", "c"], ["x", "y", "z"], {})
    assert result.valid.tolist() == [True, False, False]
    assert result.sequence.tolist() == [1.0, 0.0, 0.0]


def test_the_first_llm_rl_conventions_still_work():
    result = compute_rewards([legacy, positional], None, ["1+2="], ["3"], {"answer": ["3"]})
    assert result.sequence.tolist() == [2.0]  # exact match 1 + length 1
    check_signature(legacy, ["answer"])
    check_signature(positional, ["answer"])


def test_a_reward_missing_a_column_is_refused_at_load():
    with pytest.raises(RewardError, match=r"matches_solution.*missing a required argument: 'solution'"):
        check_signature(matches_solution, ["answer"])
    check_signature(matches_solution, ["solution"])
    check_signature(overlong, [])  # completion_ids alone: given to it
    check_signature(warm_up_bonus, [])


def test_a_reward_model_reads_text_whatever_the_data():
    seen = {}

    class TextReader:
        reads_text = True

        def __call__(self, prompts, completions, prompt_messages=None, **_):
            seen.update(prompts=prompts, completions=completions, messages=prompt_messages)
            return [1.0] * len(completions)

    compute_rewards([TextReader()], None, TEXTS, REPLIES, {}, prompt_messages=CHAT)
    assert seen == {"prompts": TEXTS, "completions": REPLIES, "messages": CHAT}


def test_a_trl_reward_trains_on_chat_data(tiny_model_dir, tmp_path):
    """One PPO update on chat prompts with a `f(completions, **kwargs)` reward: it gets TRL's shapes, the
    dataset column and trainer_state, and its score is the run's."""
    import shutil

    from conftest import build_trainer, ppo_config, write_jsonl
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}="
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}"}], "solution": str(a + b)} for a, b in [(1, 2), (3, 4)]]
    seen = []

    def length_of_reply(completions, solution, trainer_state, **kwargs):
        seen.append((completions, kwargs["prompts"], solution, trainer_state))
        return [float(len(c[0]["content"])) for c in completions]

    config = ppo_config(model_dir, write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "out", batch_size=2,
                        max_new_tokens=3, max_updates=1, seed=0)
    history = build_trainer(config, rewards=[length_of_reply]).train()
    completions, prompts, solution, state = seen[0]
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)
    assert sorted(p[0]["content"] for p in prompts) == ["1+2", "3+4"] and sorted(solution) == ["3", "7"]
    assert state == TrainerState(global_step=0, max_steps=1)
    lengths = [len(c[0]["content"]) for c in completions]
    assert history[0]["score/mean"] == pytest.approx(sum(lengths) / 2)


def test_a_reward_the_columns_cannot_call_stops_the_run_before_the_policy_loads(tiny_model_dir, tmp_path):
    from conftest import run_cli, write_jsonl

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2=", "answer": "3"}])
    (tmp_path / "r.py").write_text("def needs_solution(completions, solution, **kwargs):\n    return [0.0]\n")
    proc = run_cli(["ppo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(prompts),
                    "--reward_funcs", f"{tmp_path / 'r.py'}:needs_solution", "--output_dir", str(tmp_path / "o")],
                   tmp_path)
    assert proc.returncode == 2
    assert "missing a required argument: 'solution'" in proc.stderr and "Loading weights" not in proc.stderr
