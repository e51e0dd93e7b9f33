"""TRL-style tool environments (`environment_factory`) under llm_rl's episode protocol: tool calls parsed
from hand-written replies, the methods called, their results as `tool` messages (observations: never
actions), bad calls answered with an error text, the chat template given the tools or a system message."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from llm_rl.algorithms.ops import right_pad
from llm_rl.sampling.episodes import EpisodeError, play_episodes
from llm_rl.sampling.sampler import SamplingSettings
from llm_rl.sampling.tool_env import (
    ToolCall,
    ToolEnvironmentFactory,
    load_tool_environment,
    parse_tool_calls,
    tools_system_message,
)
from llm_rl.tasks.calculator import CHAT_TEMPLATE, Calculator, build_tokenizer, exact_sum

ROW = {"prompt": "What is 12+34?", "a": 12, "b": 34, "answer": 46}
ADD = '<tool_call>{"name": "add", "arguments": {"a": 12, "b": 34}}</tool_call>'


def error_of(message: dict) -> str:
    return json.loads(message["content"])["error"]


class Scored(Calculator):
    """Calculator that owns its reward (TRL's get_reward) and appends a hint to the prompt in reset."""

    def reset(self, **row):
        super().reset(**row)
        self.target = row["a"] + row["b"]
        return " Use the tool."

    def get_reward(self) -> float:
        return 0.5 if any(a + b == self.target for a, b in self.calls) else 0.0

    def fail(self, x: int) -> int:
        """A tool that breaks.

        Args:
            x: Anything.
        """
        raise RuntimeError("disk full")


@pytest.fixture
def tokenizer():
    return build_tokenizer()


def factory(tokenizer, cls=Scored, max_turns: int = 3) -> ToolEnvironmentFactory:
    return ToolEnvironmentFactory(cls, tokenizer, max_turns=max_turns, prompt_column="prompt")


def test_tool_calls_are_parsed_from_the_reply():
    assert parse_tool_calls("46") == []
    assert parse_tool_calls(f"Let me add. {ADD}") == [ToolCall("add", {"a": 12, "b": 34})]
    two = parse_tool_calls(ADD + '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>')
    assert two == [ToolCall("add", {"a": 12, "b": 34}), ToolCall("add", {"a": 1, "b": 2})]  # arguments as a string
    assert parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>')[0].error.startswith(
        "the tool call is not valid JSON")
    assert parse_tool_calls('<tool_call>{"name": "add", "arg')[0].error == "the tool call has no closing </tool_call>"
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[0].error.startswith("a tool call is ")


def test_step_calls_the_method_and_answers_with_tool_messages(tokenizer):
    env = factory(tokenizer)()
    messages = env.reset(ROW)
    assert messages == [{"role": "user", "content": "What is 12+34? Use the tool."}]  # reset's text appended
    observation, reward, done = env.step(f"{ADD}{ADD.replace('34', '5')}")
    assert observation == [{"role": "tool", "name": "add", "content": "46"},
                           {"role": "tool", "name": "add", "content": "17"}]
    assert (reward, done) == (0.0, False) and env.environment.calls == [(12, 34), (12, 5)]
    assert env.step("46") == (None, 0.5, True)  # no tool call: done, scored by get_reward()


def test_bad_calls_become_error_text_and_the_episode_goes_on(tokenizer):
    env = factory(tokenizer, max_turns=9)()
    env.reset(ROW)
    replies = {
        '<tool_call>{"name": "mul", "arguments": {"a": 1, "b": 2}}</tool_call>':
            "unknown tool 'mul'; the tools are: add, fail",
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>':
            "TypeError: Calculator.add() missing 1 required positional argument: 'b'",
        '<tool_call>{"name": "add", "arguments": {"a": 1, "c": 2}}</tool_call>':
            "TypeError: Calculator.add() got an unexpected keyword argument 'c'",
        '<tool_call>{"name": "fail", "arguments": {"x": 1}}</tool_call>': "RuntimeError: disk full",
        "<tool_call>{name: add}</tool_call>": "the tool call is not valid JSON (Expecting property name enclosed "
                                                "in double quotes); write " '<tool_call>{"name": <tool name>, '
                                                '"arguments": {<argument>: <value>, ...}}</tool_call>',
    }
    for reply, error in replies.items():
        observation, reward, done = env.step(reply)
        assert (reward, done) == (0.0, False)
        assert len(observation) == 1 and observation[0]["role"] == "tool" and error_of(observation[0]) == error
    assert env.environment.calls == []


def test_the_last_turn_allowed_ends_the_episode_with_its_reward(tokenizer):
    env = factory(tokenizer, max_turns=2)()
    env.reset(ROW)
    assert env.step(ADD)[2] is False
    assert env.step(ADD) == (None, 0.5, True)  # TRL: no more tool rounds; this call is not run
    assert env.environment.calls == [(12, 34)]


def test_tools_go_to_the_template_or_else_into_a_system_message(tokenizer):
    made = factory(tokenizer, cls=Calculator)
    assert [s["function"]["name"] for s in made.chat_tools] == ["add"] and made.system is None and not made.has_reward
    rendered = tokenizer.apply_chat_template(made().reset(ROW), tools=made.chat_tools, tokenize=False)
    assert rendered.startswith('<|system|>{"type": "function", "function": {"name": "add", "description": "Add two')
    tokenizer.chat_template = CHAT_TEMPLATE.split("{% for m in messages %}", 1)[1].join(["{% for m in messages %}", ""])
    ignoring = factory(tokenizer, cls=Calculator)
    assert ignoring.chat_tools is None
    assert ignoring().reset({**ROW, "prompt": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "What is 1+2?"}]}) == [
        {"role": "system", "content": "Be brief.\n\n" + tools_system_message(made.schemas)},
        {"role": "user", "content": "What is 1+2?"}]


@pytest.mark.parametrize("template, message", [
    (None, "environment_factory episodes are chat conversations but the tokenizer has no chat_template; give it "
           "one that renders 'tool'-role messages"),
    ("{% for m in messages %}{% if m['role'] != 'tool' %}{{ m['content'] }}{% endif %}{% endfor %}",
     "the tokenizer's chat_template drops 'tool'-role messages: tool results would never reach the model; use a "
     "template that renders them"),
    ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
     "{{ m['content'] }}{% endfor %}",
     "the tokenizer's chat_template cannot render a tool-calling conversation (TemplateError: no tool role); use "
     "one that renders 'tool'-role messages"),
])
def test_a_template_that_cannot_show_tool_results_is_named(tokenizer, template, message):
    tokenizer.chat_template = template
    with pytest.raises(EpisodeError) as caught:
        factory(tokenizer)
    assert str(caught.value) == message


def test_environment_class_mistakes_are_named(tokenizer, tmp_path):
    class Undocumented:
        def reset(self, **row):
            return None

        def lookup(self, key):
            return key

    with pytest.raises(EpisodeError, match=r"^Undocumented.lookup is a tool \(a public method\) but cannot be "
                                           r"described to the model: .*start its name with '_'$"):
        factory(tokenizer, cls=Undocumented)
    (tmp_path / "envs.py").write_text("class NoReset:\n    def add(self, a: int) -> int:\n        return a\n")
    with pytest.raises(EpisodeError, match=r"has no reset method: it needs reset\(\*\*row\) -> str or None"):
        load_tool_environment(f"{tmp_path / 'envs.py'}:NoReset", tokenizer, max_turns=2, prompt_column="prompt")

    class Waiting(Calculator):
        async def fetch(self, url: str) -> str:
            """Fetch a page.

            Args:
                url: The address.
            """
            return url

    with pytest.raises(EpisodeError, match=r"^Waiting.fetch is async: tools are called synchronously here"):
        factory(tokenizer, cls=Waiting)

    class Judged(Calculator):
        async def get_reward(self) -> float:
            return 1.0

    with pytest.raises(EpisodeError, match=r"^Judged.get_reward is async: it is called synchronously here"):
        factory(tokenizer, cls=Judged)

    class Chatty(Calculator):
        def reset(self, **row):
            return ["not", "text"]

    with pytest.raises(EpisodeError, match=r"^Chatty.reset must return a string \(appended to the prompt's last "
                                           r"message\) or None, got \['not', 'text'\]$"):
        factory(tokenizer, cls=Chatty)().reset(ROW)
    with pytest.raises(EpisodeError, match=r"^the dataset row has no 'prompt' column \(prompt_column; its columns: "
                                           r"\['question'\]\)"):
        factory(tokenizer)().reset({"question": "1+2?"})


# ------------------------------------------------------------------ through the real episode code
class ScriptedTurns:
    """A `TurnGenerator` that answers from a script of the context: the real engine seam fed known text, so
    the episode's tokens and masks are known exactly (a random model would never write a tool call)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.contexts = tokenizer, script, []

    def __call__(self, contexts, max_new_tokens):
        self.contexts += [self.tokenizer.decode(c) for c in contexts]
        replies = [self.tokenizer(self.script(self.contexts[-len(contexts) + i]), add_special_tokens=False).input_ids
                   + [self.tokenizer.eos_token_id] for i in range(len(contexts))]
        width = max(map(len, replies))
        ids = right_pad(replies, width, self.tokenizer.pad_token_id, torch.long)
        mask = right_pad([[1] * len(r) for r in replies], width, 0, torch.long)
        return ids, mask, torch.ones(len(replies), dtype=torch.bool), None


def call_then_answer(context: str) -> str:
    """Call add on the first turn; after the tool's result, answer with it."""
    return context.rsplit("<|tool|>", 1)[1].split("<|assistant|>")[0] if "<|tool|>" in context else ADD


def settings(tokenizer) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0,
                            stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
                            chunk_size=2)


def test_tool_results_are_observations_in_the_episode_sequence(tokenizer):
    made = factory(tokenizer)
    envs = [made(), made()]
    rows = [ROW, {"prompt": "What is 5+6?", "a": 5, "b": 6, "answer": 11}]
    ep = play_episodes(ScriptedTurns(tokenizer, call_then_answer), tokenizer, envs, rows, settings(tokenizer),
                       max_turns=3, max_episode_tokens=200)
    assert ep.ended.tolist() == [True, True] and ep.num_turns.tolist() == [2, 2]
    assert [e.environment.calls for e in envs] == [[(12, 34)], [(12, 34)]]  # the script always adds 12 and 34
    messages = envs[0].reset(ROW) + [{"role": "assistant", "content": ADD},
                                     {"role": "tool", "name": "add", "content": "46"},
                                     {"role": "assistant", "content": "46"}]
    rendered = tokenizer.apply_chat_template(messages, tools=made.chat_tools, tokenize=False)
    n = int(ep.response_mask[0].sum())
    prompt = ep.prompt_ids[0][ep.prompt_mask[0].bool()].tolist()
    assert prompt + ep.response_ids[0, :n].tolist() == tokenizer(rendered, add_special_tokens=False).input_ids
    call = len(tokenizer(ADD, add_special_tokens=False).input_ids) + 1  # the call and its EOS
    tool = len(tokenizer("<|tool|>46<|assistant|>", add_special_tokens=False).input_ids)
    assert ep.action_mask[0, :n].tolist() == [1] * call + [0] * tool + [1] * 3  # "46<eos>"
    assert ep.turn_scores[0, :n].nonzero().flatten().tolist() == [n - 1]  # get_reward() on the last token
    assert float(ep.turn_scores[0, n - 1]) == 0.5
    assert ep.transcripts[0].endswith("<|tool|>46<|assistant|>46<eos>")


def test_an_episode_through_hf_generate_with_the_real_template(tokenizer):
    """run_episodes samples with `generate` (here scripted on a tiny model: the replies are known) through the
    chat template with tools; the reward function reads the final answer and the environments."""
    from llm_rl.sampling.episodes import run_episodes
    from llm_rl.tasks.arithmetic import build_model

    torch.manual_seed(0)
    lm = build_model(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=512).eval()
    replies = iter([ADD, "46"])

    def scripted_generate(input_ids, **_):
        reply = tokenizer(next(replies), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return torch.cat([input_ids, torch.tensor([reply] * input_ids.shape[0])], dim=1)

    lm.generate = scripted_generate
    env = factory(tokenizer, cls=Calculator)()
    ep = run_episodes(lm, tokenizer, [env], [ROW], settings(tokenizer), max_turns=3, max_episode_tokens=200)
    assert ep.ended.tolist() == [True] and env.environment.calls == [(12, 34)]
    assert ep.prompts[0].startswith('<|system|>{"type": "function"')
    assert exact_sum(ep.prompts, ep.transcripts, [46], environments=[env.environment]) == [1.0]
    assert exact_sum(ep.prompts, ep.transcripts, [47]) == [0.0]


class ScriptedEngine:
    """A `TurnEngine` over `ScriptedTurns`, as `EpisodeSampler` takes one."""

    timing: dict = {}

    def __init__(self, generate_turn):
        self.generate_turn = generate_turn

    @contextmanager
    def turns(self):
        yield self.generate_turn


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_episode_score_is_get_reward_plus_the_reward_functions_given_the_environments(tokenizer):
    """TRL adds get_reward() (weight 1) to the reward functions, which get the episodes' instances as
    environments=: here 0.5 (the tool was called with the row's numbers) + 1.0 (46 is the sum) on row 0, and
    0.0 + 0.0 on row 1 (5+6, but the script adds 12 and 34 and answers 46)."""
    from accelerate import Accelerator

    from llm_rl.config.sections import Config
    from llm_rl.rewards.scoring import EnvironmentScorer, RewardScorer
    from llm_rl.sampling.episodes import EpisodeSampler

    seen = {}

    def exact_sum_noting_environments(prompts, completions, answer, environments, **kwargs):
        seen["environments"], seen["columns"] = environments, sorted(kwargs)
        return exact_sum(prompts, completions, answer)

    made = factory(tokenizer)
    sampler = EpisodeSampler(None, Accelerator(cpu=True), tokenizer, settings(tokenizer), made, 1, max_turns=3,
                             max_episode_tokens=200, max_prompt_length=1024,
                             engine=ScriptedEngine(ScriptedTurns(tokenizer, call_then_answer)))
    rollout = sampler.sample({"rows": [ROW, {"prompt": "What is 5+6?", "a": 5, "b": 6, "answer": 11}]})
    config = Config()
    scorer = EnvironmentScorer(RewardScorer([exact_sum_noting_environments], config.reward, config.sampling, "cpu"))
    scores = scorer.score(rollout)
    assert [type(e) for e in seen["environments"]] == [Scored, Scored]
    assert seen["columns"] == ["a", "b", "completion_ids", "prompt", "prompt_messages"]  # the row's columns too
    assert scores.per_reward["exact_sum_noting_environments"].tolist() == [1.0, 0.0]
    assert scores.per_reward["environment"].tolist() == [0.5, 0.0]
    last = rollout.action_mask.sum(dim=1) - 1  # the last bot token: where both scores sit
    total = (scores.tokens + torch.nn.functional.one_hot(last, scores.tokens.shape[1]) * scores.sequence[:, None])
    assert total.sum(dim=1).tolist() == [1.5, 0.0]


def test_a_first_observation_over_max_prompt_length_names_the_users_class(tokenizer):
    with pytest.raises(EpisodeError) as caught:
        play_episodes(ScriptedTurns(tokenizer, call_then_answer), tokenizer, [factory(tokenizer)()], [ROW],
                      settings(tokenizer), max_turns=3, max_episode_tokens=200, max_prompt_length=100)
    assert str(caught.value) == ("Scored.reset gave a first observation of 626 tokens (with its tools), over "
                                 "max_prompt_length=100: raise max_prompt_length or shorten it")


def test_readme_example_runs_as_written(tokenizer):
    """The README's environment_factory class is real code: its tools answer, its mistakes become error
    text, and get_reward() scores the episode."""
    import re

    from conftest import REPO

    source = re.search(r"```python\n(# my_tools\.py.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(source, "README.md:my_tools.py", "exec"), namespace)
    env = factory(tokenizer, cls=namespace["Shop"], max_turns=4)()
    assert [s["function"]["name"] for s in env.factory.schemas] == ["buy", "price"]
    row = {"prompt": "Buy as many apples as you can.", "item": "apple", "budget": 10}
    assert env.reset(row) == [{"role": "user", "content": "Buy as many apples as you can. You have 10 coins."}]

    def call(name, **arguments):
        return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'

    assert env.step(call("price", item="apple"))[0][0]["content"] == "3"
    too_many = env.step(call("buy", item="apple", count=4))[0][0]
    assert error_of(too_many) == "ValueError: 4 of apple cost 12, over the budget"
    assert env.step(call("buy", item="apple", count=3))[0][0]["content"] == "bought 3, 1 coins left"
    assert env.step("I bought 3 apples.") == (None, 3.0, True)
