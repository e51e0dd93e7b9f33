"""Multi-turn episodes: the policy talks with an environment for several turns.

An environment is any class with

    reset(row: dict) -> observation                     # the first user turn, from the dataset row
    step(response: str) -> (observation | None, reward: float, done: bool)

where an observation is text, or chat messages (a list of {"role", "content"}) when the data is chat.
One instance serves one episode. It is named in the config as "package.module:Class" or
"path/to/file.py:Class" (`environment`), like a reward function.

One sequence holds the whole episode: the first observation (left-padded, as a prompt), then bot
turns and observations. `action_mask` marks the bot's tokens: only they get log-probs in the loss,
KL, values, advantages and entropy; observations are context. Each turn's reward sits on the last
token of that turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional, Protocol, Union

import torch

from llm_rl.algorithms.ops import left_pad, right_pad
from llm_rl.config.errors import UserError
from llm_rl.config.specs import import_from_spec
from llm_rl.sampling.hf import HFTurns, hf_turn_generator, repeat_rows
from llm_rl.sampling.rollout import Rollout
from llm_rl.sampling.sampler import SamplingSettings, TurnEngine, TurnGenerator

Observation = Union[str, list]


class Environment(Protocol):
    def reset(self, row: dict) -> Observation: ...

    def step(self, response: str) -> tuple[Optional[Observation], float, bool]: ...


class EpisodeError(UserError):
    """An environment that does not keep the protocol; the message names it."""

    label = "environment error"


@dataclass
class Episodes:
    """A batch of finished episodes, aligned like a rollout (`llm_rl.sampling.rollout.Rollout`, same mask names)."""

    prompt_ids: torch.Tensor  # (batch, prompt_len) the first observation, left-padded
    prompt_mask: torch.Tensor  # (batch, prompt_len)
    response_ids: torch.Tensor  # (batch, len) bot turns and later observations, right-padded
    response_mask: torch.Tensor  # (batch, len) 1 on real tokens
    action_mask: torch.Tensor  # (batch, len) 1 on the bot's tokens
    turn_scores: torch.Tensor  # (batch, len) each turn's reward on that turn's last token
    turn_ends: torch.Tensor  # (batch, len) bool: last token of each bot turn
    ended: torch.Tensor  # (batch,) bool: the environment said done (else cut: bootstrap from V)
    num_turns: torch.Tensor  # (batch,) bot turns taken
    prompts: list  # first observations as text
    transcripts: list  # each episode's text after the first observation
    sampler_logprobs: Optional[torch.Tensor] = None  # (batch, len) the engine's log-probs on bot tokens, 0 elsewhere


class _Conversation:
    """One episode's tokens so far and how to append observations (plain text or chat template)."""

    def __init__(self, tokenizer, first: Observation, tools: Optional[list] = None):
        self.tokenizer, self.tools = tokenizer, tools  # tools: JSON schemas for the chat template, or None
        self.chat = isinstance(first, list)
        if self.chat:
            if tokenizer.chat_template is None:
                raise EpisodeError("the environment returns chat messages but the tokenizer has no chat_template")
            self.messages = list(first)
            self.prompt_text = tokenizer.apply_chat_template(self.messages, tools=tools, tokenize=False,
                                                             add_generation_prompt=True)
            self.prompt = tokenizer(self.prompt_text, add_special_tokens=False).input_ids
        else:
            self.prompt_text = str(first)
            self.prompt = tokenizer(self.prompt_text).input_ids
        self.tokens: list[int] = []  # after the prompt
        self.actions: list[int] = []
        self.sampler_logprobs: list[float] = []  # the engine's, on bot tokens (0 on observations)
        self.rewards: list[float] = []
        self.turn_ends: list[bool] = []
        self.turns = 0
        self.done = False
        self.cut = False

    def context(self) -> list[int]:
        return self.prompt + self.tokens

    def add_response(self, ids: list[int], text: str, reward: float, logprobs: Optional[list[float]] = None) -> None:
        self.tokens += ids
        self.actions += [1] * len(ids)
        self.sampler_logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.rewards += [0.0] * (len(ids) - 1) + [float(reward)]
        self.turn_ends += [False] * (len(ids) - 1) + [True]
        self.turns += 1
        if self.chat:
            self.response_ids, self.response_text = ids, text

    def add_observation(self, observation: Observation) -> None:
        ids = self._observation_ids(observation)
        self.tokens += ids
        self.actions += [0] * len(ids)
        self.sampler_logprobs += [0.0] * len(ids)
        self.rewards += [0.0] * len(ids)
        self.turn_ends += [False] * len(ids)

    def _observation_ids(self, observation: Observation) -> list[int]:
        if not self.chat:
            return self.tokenizer(str(observation), add_special_tokens=False).input_ids
        new = [{"role": "user", "content": observation}] if isinstance(observation, str) else list(observation)
        render = partial(self.tokenizer.apply_chat_template, tools=self.tools, tokenize=False)
        before = render(self.messages, add_generation_prompt=True)
        self.messages.append({"role": "assistant", "content": self.response_text})
        with_reply = render(self.messages)
        self.messages += new
        after = render(self.messages, add_generation_prompt=True)
        # the template's rendering of the reply may close it with more than the stop token the policy
        # emitted (Qwen: "<|im_end|>\n"); what the policy did not write belongs to the observation
        generated = self.tokenizer.decode(self.response_ids, skip_special_tokens=False)
        rendered_reply = with_reply[len(before):]
        leftover = rendered_reply[len(generated):] if rendered_reply.startswith(generated) else ""
        return self.tokenizer(leftover + after[len(with_reply):], add_special_tokens=False).input_ids


def call_environment(environment, method: str, *args, **kwargs):
    """`environment.<method>(*args, **kwargs)` (or, for "__init__", the class `environment` called): an exception
    raised by the user's code becomes one EpisodeError line naming the class and the method (--debug
    shows its traceback, which is the error's cause)."""
    is_class = method == "__init__"
    name = environment.__name__ if is_class else type(environment).__name__
    try:
        return environment(*args, **kwargs) if is_class else getattr(environment, method)(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:  # the user's code: any exception is theirs to fix
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        where = f"{name}()" if is_class else f"{name}.{method}"
        argument = f" for the reply {args[0][:80]!r}" if method == "step" else ""
        raise EpisodeError(f"{where} raised {detail}{argument}") from e


def checked_step(environment, response: str) -> tuple[Optional[Observation], float, bool]:
    """environment.step(response), with its output checked: a clear error instead of a NaN in the loss."""
    name = type(environment).__name__
    out = call_environment(environment, "step", response)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise EpisodeError(f"{name}.step must return (observation or None, reward, done), got {out!r}")
    observation, reward, done = out
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise EpisodeError(f"{name}.step returned reward {reward!r}; it must be a float") from None
    if not math.isfinite(reward):
        raise EpisodeError(f"{name}.step returned a non-finite reward ({reward}) for the reply {response!r}")
    if not done and observation is None:
        raise EpisodeError(f"{name}.step returned no observation but done=False; return the user's next turn")
    return observation, reward, bool(done)


def run_episodes(lm, tokenizer, environments: list, rows: list[dict], settings: SamplingSettings, *,
                 device=None, **limits) -> Episodes:
    """`play_episodes` with each turn sampled by `generate` on the transformers model `lm`."""
    return play_episodes(hf_turn_generator(lm, settings, device), tokenizer, environments, rows, settings,
                         device=device, **limits)


@torch.no_grad()
def play_episodes(
    generate_turn: TurnGenerator,
    tokenizer,
    environments: list,
    rows: list[dict],
    settings: SamplingSettings,
    *,
    max_turns: int,
    max_episode_tokens: int,
    device=None,
    max_prompt_length: Optional[int] = None,
) -> Episodes:
    """Play one episode per environment, all turns of all episodes batched: each turn, the episodes
    still running generate together (one `generate_turn` call), then each environment answers."""
    # an environment may carry tool schemas for the chat template (`llm_rl.sampling.tool_env.ToolEnvironment`)
    episodes = [_Conversation(tokenizer, call_environment(env, "reset", row), getattr(env, "chat_tools", None))
                for env, row in zip(environments, rows)]
    for env, ep in zip(environments, episodes):
        if max_prompt_length is not None and len(ep.prompt) > max_prompt_length:
            raise EpisodeError(
                f"{type(getattr(env, 'environment', env)).__name__}.reset gave a first observation of "
                f"{len(ep.prompt)} tokens{' (with its tools)' if getattr(env, 'chat_tools', None) else ''}, over "
                f"max_prompt_length={max_prompt_length}: raise max_prompt_length or shorten it"
            )
    with_logprobs = False
    for _ in range(max_turns):
        running = [i for i, ep in enumerate(episodes) if not ep.done and not ep.cut]
        if not running:
            break
        with_logprobs = play_turn(generate_turn, tokenizer, [episodes[i] for i in running],
                                  [environments[i] for i in running], settings, max_episode_tokens)
    return stack_episodes(episodes, tokenizer, device, with_sampler_logprobs=with_logprobs)


def play_turn(generate_turn: TurnGenerator, tokenizer, episodes: list[_Conversation], environments: list,
              settings: SamplingSettings, max_episode_tokens: int) -> bool:
    """One bot turn of each running episode, generated together, then each environment's answer.
    Returns whether the engine gave its log-probs of the sampled tokens."""
    budget = min(settings.max_new_tokens, max(max_episode_tokens - len(ep.tokens) for ep in episodes))
    response_ids, action_mask, ended, logprobs = generate_turn([ep.context() for ep in episodes], budget)
    lengths = action_mask.sum(dim=1).tolist()
    for row, (ep, env) in enumerate(zip(episodes, environments)):
        keep = min(lengths[row], max(max_episode_tokens - len(ep.tokens), 1))
        reply = response_ids[row, :keep].tolist()
        stopped = bool(ended[row]) and reply[-1] in settings.stop_token_ids
        text = tokenizer.decode(reply[:-1] if stopped else reply, skip_special_tokens=True)
        observation, reward, done = checked_step(env, text)
        ep.add_response(reply, text, reward, None if logprobs is None else logprobs[row, :keep].tolist())
        if done:
            ep.done = True
            continue
        ep.add_observation(observation)
        ep.cut = len(ep.tokens) >= max_episode_tokens
    return logprobs is not None


def stack_episodes(episodes: list[_Conversation], tokenizer, device, with_sampler_logprobs: bool = False) -> Episodes:
    """Finished conversations as one batch: the first observations left-padded, the rest right-padded."""
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([ep.prompt for ep in episodes], pad)
    width = max(max(len(ep.tokens) for ep in episodes), 1)
    logprobs = (right_pad([ep.sampler_logprobs for ep in episodes], width, 0.0, torch.float32)
                if with_sampler_logprobs else None)
    return Episodes(
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        response_ids=right_pad([ep.tokens for ep in episodes], width, pad, torch.long).to(device),
        response_mask=right_pad([[1] * len(ep.tokens) for ep in episodes], width, 0, torch.long).to(device),
        action_mask=right_pad([ep.actions for ep in episodes], width, 0, torch.long).to(device),
        turn_scores=right_pad([ep.rewards for ep in episodes], width, 0.0, torch.float32).to(device),
        turn_ends=right_pad([ep.turn_ends for ep in episodes], width, False, torch.bool).to(device),
        ended=torch.tensor([ep.done for ep in episodes], device=device),
        num_turns=torch.tensor([ep.turns for ep in episodes], device=device),
        prompts=[ep.prompt_text for ep in episodes],
        transcripts=[tokenizer.decode(ep.tokens, skip_special_tokens=False) for ep in episodes],
        sampler_logprobs=logprobs.to(device) if logprobs is not None else None,
    )


class EpisodeSampler:
    """`Sampler` of multi-turn episodes: one `environment_class()` per episode (num_generations per dataset
    row), every turn of all episodes batched through one call of the `TurnEngine`: `generate` on the training
    model by default (`HFTurns`), or a vLLM engine (`llm_rl.sampling.vllm.VLLMEngine`). The rows of one
    dataset row do not share a prompt the forwards could run once (an environment may start its copies
    differently)."""

    def __init__(self, model, accelerator, tokenizer, settings: SamplingSettings, environment_class: type,
                 num_generations: int, *, max_turns: int, max_episode_tokens: int, max_prompt_length: int,
                 engine: Optional[TurnEngine] = None):
        self.accelerator, self.tokenizer, self.settings = accelerator, tokenizer, settings
        self.environment_class, self.num_generations = environment_class, num_generations
        self.engine = engine or HFTurns(model, accelerator, settings)
        self.limits = dict(max_turns=max_turns, max_episode_tokens=max_episode_tokens,
                           max_prompt_length=max_prompt_length)

    @property
    def timing(self) -> dict[str, float]:
        return self.engine.timing

    @torch.no_grad()
    def sample(self, batch: dict) -> Rollout:
        rows = repeat_rows(batch["rows"], self.num_generations)
        environments = [call_environment(self.environment_class, "__init__") for _ in rows]
        with self.engine.turns() as generate_turn:
            episodes = play_episodes(generate_turn, self.tokenizer, environments, rows, self.settings,
                                     device=self.accelerator.device, **self.limits)
        return Rollout(
            episodes.prompt_ids, episodes.prompt_mask, episodes.response_ids, episodes.action_mask, episodes.ended,
            response_mask=episodes.response_mask, turn_ends=episodes.turn_ends, num_turns=episodes.num_turns,
            turn_scores=episodes.turn_scores, prompts=episodes.prompts, completions=episodes.transcripts,
            sampler_logprobs=episodes.sampler_logprobs, columns=episode_columns(rows, environments),
        )


def episode_columns(rows: list[dict], environments: list) -> dict:
    """What reward functions get as keywords beside prompts and completions: each dataset column, one value per
    episode, and `environments` (TRL's name): the instance that played it, the user's own object under an adapter."""
    columns = {c: [row.get(c) for row in rows] for c in rows[0]} if rows else {}
    return {**columns, "environments": [getattr(env, "environment", env) for env in environments]}


def load_environment(spec: str) -> type:
    """'package.module:Class' or 'path/to/file.py:Class' -> the class; checked for reset and step."""
    cls = import_from_spec(spec, "environment", EpisodeError)
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise EpisodeError(f"environment {spec!r} has no {' or '.join(missing)} method: it needs reset(row) -> "
                           "observation and step(response) -> (observation or None, reward, done)")
    return cls
