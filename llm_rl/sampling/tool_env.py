"""Tool-calling environments the TRL way (`environment_factory`), played as llm_rl episodes.

The user's class is TRL's shape: one instance per episode; its public methods (not starting with "_", other
than `reset` and `get_reward`) are the tools, described to the model by their type hints and Google-style
docstrings (`transformers.utils.get_json_schema`); `reset(**row)` gets the dataset row's columns as keywords
and returns text appended to the prompt's last message, or None; `get_reward()`, when defined, scores the
finished episode.

`ToolEnvironment` wraps one such instance into the `Environment` protocol of `llm_rl.sampling.episodes`:
reset(row) gives the first observation as chat messages and `chat_tools` the schemas the chat template
renders; step(response) runs the response's tool calls, written as `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` (Hermes / Qwen style), and answers with one `tool`-role message per call. A response
without a tool call ends the episode, and so does the max_turns-th response (TRL stops calling tools after
max_tool_calling_iterations rounds; max_turns = that + 1). Tool results are observations: never in the loss.

A bad call (unknown tool, unreadable JSON, wrong arguments, a tool that raises) becomes an error text in its
tool message and the episode goes on, so the model sees what went wrong. TRL does the same for unknown
tools, wrong arguments and raising tools; a call whose JSON it cannot parse ends its episode instead.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from typing import Optional

from llm_rl.config.specs import import_from_spec
from llm_rl.sampling.episodes import EpisodeError, call_environment

NOT_TOOLS = ("reset", "get_reward")
TOOL_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
CALL_FORMAT = '<tool_call>{"name": <tool name>, "arguments": {<argument>: <value>, ...}}</tool_call>'


@dataclass(frozen=True)
class ToolCall:
    """One call parsed from a response: the tool's name and arguments, or why it could not be read."""

    name: Optional[str]
    arguments: dict
    error: Optional[str] = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` block of `text`, in order; a block that is cut off (no closing tag)
    or whose JSON is not {"name": str, "arguments": object} gives a ToolCall with an error."""
    calls = []
    for match in TOOL_CALL.finditer(text):
        body, closed = match.group(1).strip(), bool(match.group(2))
        if not closed:
            calls.append(ToolCall(None, {}, "the tool call has no closing </tool_call>"))
            continue
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(None, {}, f"the tool call is not valid JSON ({e.msg}); write {CALL_FORMAT}"))
            continue
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            calls.append(ToolCall(None, {}, f"a tool call is {CALL_FORMAT}"))
            continue
        calls.append(ToolCall(call["name"], arguments))
    return calls


def tool_methods(environment) -> dict:
    """The tools of an environment instance: its public bound methods other than reset and get_reward."""
    return {name: method for name, method in inspect.getmembers(environment, predicate=inspect.ismethod)
            if not name.startswith("_") and name not in NOT_TOOLS}


def tool_schemas(environment) -> list[dict]:
    """Each tool's JSON schema for the chat template's `tools=`, from its type hints and docstring."""
    from transformers.utils import get_json_schema

    schemas = []
    for name, method in tool_methods(environment).items():
        if inspect.iscoroutinefunction(method):
            raise EpisodeError(f"{type(environment).__name__}.{name} is async: tools are called synchronously here "
                               "(TRL also awaits async ones); make it a plain method")
        try:
            schemas.append(get_json_schema(method))
        except Exception as e:  # DocstringParsingException, TypeHintParsingException: the user's method
            raise EpisodeError(
                f"{type(environment).__name__}.{name} is a tool (a public method) but cannot be described to the "
                f"model: {e}; give it type hints and a Google-style docstring with an Args: line per argument, or "
                "start its name with '_'"
            ) from e
    return schemas


def call_tool(methods: dict, call: ToolCall) -> dict:
    """The `tool`-role message answering one call: the tool's result as text, or an error text."""
    if call.error is not None:
        return {"role": "tool", "name": "error", "content": json.dumps({"error": call.error})}
    if call.name not in methods:
        known = ", ".join(methods) or "none"
        return {"role": "tool", "name": call.name,
                "content": json.dumps({"error": f"unknown tool {call.name!r}; the tools are: {known}"})}
    try:
        result = methods[call.name](**call.arguments)
    except Exception as e:  # the model's arguments or the user's tool: the model is told, the run goes on
        result = {"error": f"{type(e).__name__}: {e}"}
        return {"role": "tool", "name": call.name, "content": json.dumps(result)}
    return {"role": "tool", "name": call.name, "content": str(result)}


PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_7f3a", "description": "A probe.",
                                               "parameters": {"type": "object", "properties": {}}}}
PROBE_RESULT = "probe_result_9c2e"


def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template writes `tools=` into the prompt (else the tools go in a system message).
    EpisodeError when there is no template, or it cannot show a `tool`-role message to the model."""
    if tokenizer.chat_template is None:
        raise EpisodeError("environment_factory episodes are chat conversations but the tokenizer has no "
                           "chat_template; give it one that renders 'tool'-role messages")
    user = [{"role": "user", "content": "hi"}]
    reply = [{"role": "assistant", "content": "call"}, {"role": "tool", "name": "probe", "content": PROBE_RESULT}]
    try:
        with_tools = tokenizer.apply_chat_template(user, tools=[PROBE_TOOL], tokenize=False)
        with_result = tokenizer.apply_chat_template(user + reply, tokenize=False)
    except Exception as e:  # a template that raises on a role it does not know (jinja's raise_exception)
        raise EpisodeError(f"the tokenizer's chat_template cannot render a tool-calling conversation "
                           f"({type(e).__name__}: {e}); use one that renders 'tool'-role messages") from e
    if PROBE_RESULT not in with_result:
        raise EpisodeError("the tokenizer's chat_template drops 'tool'-role messages: tool results would never "
                           "reach the model; use a template that renders them")
    return PROBE_TOOL["function"]["name"] in with_tools


def tools_system_message(schemas: list[dict]) -> str:
    """The tools described in words, for a chat template that ignores `tools=`."""
    return (f"You can call these tools. To call one, write {CALL_FORMAT} and wait for its result.\n"
            f"Tools: {json.dumps(schemas)}")


def first_messages(row: dict, prompt_column: str) -> list[dict]:
    """The episode's prompt as chat messages: the row's prompt column, a string or a list of messages."""
    if prompt_column not in row:
        raise EpisodeError(f"the dataset row has no {prompt_column!r} column (prompt_column; its columns: "
                           f"{list(row)}): environment_factory episodes start from that prompt")
    prompt = row[prompt_column]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   for m in prompt):
        return [dict(m) for m in prompt]
    raise EpisodeError(f"column {prompt_column!r} must hold a string or chat messages with text content, got "
                       f"{prompt!r:.80}")


class ToolEnvironmentFactory:
    """The environment_factory class, readied once: its tools' schemas, whether it scores (get_reward), how the
    chat template shows the tools. Called, it builds one `ToolEnvironment` around a fresh instance."""

    def __init__(self, environment_class: type, tokenizer, *, max_turns: int, prompt_column: str):
        self.environment_class, self.__name__ = environment_class, environment_class.__name__
        self.max_turns, self.prompt_column = max_turns, prompt_column
        probe = call_environment(environment_class, "__init__")
        self.schemas = tool_schemas(probe)
        self.has_reward = callable(getattr(probe, "get_reward", None))
        if inspect.iscoroutinefunction(getattr(probe, "get_reward", None)):
            raise EpisodeError(f"{self.__name__}.get_reward is async: it is called synchronously here; make it a "
                               "plain method")
        renders = template_renders_tools(tokenizer)
        self.chat_tools = (self.schemas or None) if renders else None  # None, not []: no tool boilerplate
        self.system = None if renders or not self.schemas else tools_system_message(self.schemas)

    def __call__(self) -> ToolEnvironment:
        return ToolEnvironment(call_environment(self.environment_class, "__init__"), self)


class ToolEnvironment:
    """One TRL-style environment instance under llm_rl's `Environment` protocol (see the module's docstring)."""

    def __init__(self, environment, factory: ToolEnvironmentFactory):
        self.environment, self.factory = environment, factory  # `environment`: reward functions' environments=
        self.methods = tool_methods(environment)
        self.chat_tools = factory.chat_tools
        self.turns = 0

    def reset(self, row: dict) -> list[dict]:
        messages = first_messages(row, self.factory.prompt_column)
        extra = call_environment(self.environment, "reset", **row)
        if extra is not None and not isinstance(extra, str):
            raise EpisodeError(f"{type(self.environment).__name__}.reset must return a string (appended to the "
                               f"prompt's last message) or None, got {extra!r:.80}")
        if extra:
            messages[-1] = {**messages[-1], "content": messages[-1]["content"] + extra}
        system = self.factory.system
        if system is not None:
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + system}
            else:
                messages.insert(0, {"role": "system", "content": system})
        return messages

    def step(self, response: str) -> tuple[Optional[list[dict]], float, bool]:
        """The tool messages answering the response's calls; done (with get_reward()'s score, else 0: the
        reward functions score the episode) when it makes none or is the last turn allowed."""
        self.turns += 1
        calls = parse_tool_calls(response)
        if not calls or self.turns >= self.factory.max_turns:
            reward = call_environment(self.environment, "get_reward") if self.factory.has_reward else 0.0
            return None, reward, True
        return [call_tool(self.methods, call) for call in calls], 0.0, False


def load_tool_environment(spec: str, tokenizer, *, max_turns: int, prompt_column: str) -> ToolEnvironmentFactory:
    """'package.module:Class' or 'path/to/file.py:Class' of a TRL-style environment -> its factory."""
    environment_class = import_from_spec(spec, "environment_factory", EpisodeError)
    if not callable(getattr(environment_class, "reset", None)):
        raise EpisodeError(f"environment_factory {spec!r} has no reset method: it needs reset(**row) -> str or "
                           "None, and its public methods are the tools")
    return ToolEnvironmentFactory(environment_class, tokenizer, max_turns=max_turns, prompt_column=prompt_column)
