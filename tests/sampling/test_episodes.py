"""Multi-turn episodes: the episode rollout on a tiny model with a scripted environment, and the trainer
with an environment (GAE over action tokens by hand is in tests/algorithms/test_action_gae.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import (
    RANK_REPORT_DRIVER,
    TWO_TURNS_ENV,
    REPO,
    build_trainer,
    explain,
    launch_two_processes,
    read_jsonl,
    sample_rollout,
    write_jsonl,
)

from llm_rl.sampling.sampler import SamplingSettings

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds its own Accelerator


class Echo:
    """Scripted user: rewards a reply by its length, answers "12" twice, then is done (or never, if patient)."""

    def __init__(self, turns_until_done: int = 2):
        self.turns_until_done = turns_until_done

    def reset(self, row):
        self.turn = 0
        return row["prompt"]

    def step(self, response):
        self.turn += 1
        return "12", float(len(response)), self.turn >= self.turns_until_done


def test_two_turn_episodes_on_a_tiny_model(tiny_lm, tiny_tokenizer):
    from llm_rl.sampling.episodes import run_episodes

    rows = [{"prompt": "1+2="}, {"prompt": "17+5="}, {"prompt": "123+45="}]
    envs = [Echo(2), Echo(2), Echo(99)]
    torch.manual_seed(0)
    ep = run_episodes(tiny_lm, tiny_tokenizer, envs, rows, SamplingSettings(max_new_tokens=3, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(1,), chunk_size=3, pad_token_id=tiny_tokenizer.pad_token_id), max_turns=2, max_episode_tokens=40)
    assert ep.num_turns.tolist() == [2, 2, 2]
    assert ep.ended.tolist() == [True, True, False]  # the patient user was cut by max_turns: bootstrap
    obs = tiny_tokenizer("12", add_special_tokens=False).input_ids
    for row in range(3):
        n = int(ep.response_mask[row].sum())
        tokens, actions = ep.response_ids[row, :n].tolist(), ep.action_mask[row, :n].tolist()
        turn_ends = ep.turn_ends[row, :n].nonzero().flatten().tolist()
        assert len(turn_ends) == 2
        first_len = turn_ends[0] + 1
        # reply 1 | observation "12" | reply 2 (| observation "12" when not done)
        assert actions[:first_len] == [1] * first_len
        assert tokens[first_len : first_len + 2] == obs and actions[first_len : first_len + 2] == [0, 0]
        assert actions[first_len + 2 : turn_ends[1] + 1] == [1] * (turn_ends[1] - first_len - 1)
        tail = n - turn_ends[1] - 1
        assert tail == (0 if ep.ended[row] else 2)
        # each turn's reward (its text length) sits on that turn's last token
        rewards = ep.turn_scores[row, :n]
        assert rewards.nonzero().flatten().tolist() == [t for t in turn_ends if rewards[t] != 0]
        # the context is exactly what the model saw: prompt ids (left-padded) then the region
    assert ep.prompts == ["1+2=", "17+5=", "123+45="]


def test_max_episode_tokens_cuts_and_finished_episodes_stop_generating(tiny_lm, tiny_tokenizer):
    from llm_rl.sampling.episodes import run_episodes

    calls = []
    generate = tiny_lm.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    tiny_lm.generate = counting_generate
    envs = [Echo(1), Echo(99)]
    ep = run_episodes(tiny_lm, tiny_tokenizer, envs, [{"prompt": "1+2="}, {"prompt": "3+4="}], SamplingSettings(max_new_tokens=3, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(1,), chunk_size=2, pad_token_id=tiny_tokenizer.pad_token_id), max_turns=5, max_episode_tokens=7)
    assert calls[0] == 2 and all(c == 1 for c in calls[1:])  # the finished episode left the batch
    assert ep.ended.tolist() == [True, False]
    assert int(ep.response_mask[1].sum()) >= 7 and ep.num_turns[1] < 5


def test_chat_episode_sequence_is_the_rendered_conversation(tiny_lm, tiny_tokenizer):
    """With chat data the observation tokens continue the chat template; what the template writes after a
    reply beyond the policy's stop token ("=" here) becomes part of the observation, never an action."""
    from llm_rl.sampling.episodes import run_episodes

    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}="
        "{% else %}+{% endif %}{% endfor %}"
    )

    class Chat:
        def reset(self, row):
            self.replies = []
            return [{"role": "user", "content": row["prompt"]}]

        def step(self, response):
            self.replies.append(response)
            return "45", 1.0, len(self.replies) == 2

    three = tiny_tokenizer.convert_tokens_to_ids("3")

    def reply_three(input_ids, **_):  # the policy answers "3" and stops: the sequence is then known exactly
        return torch.cat([input_ids, torch.tensor([[three, 1]] * input_ids.shape[0])], dim=1)

    tiny_lm.generate = reply_three
    env = Chat()
    ep = run_episodes(tiny_lm, tiny_tokenizer, [env], [{"prompt": "12"}], SamplingSettings(max_new_tokens=3, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(1,), chunk_size=1, pad_token_id=tiny_tokenizer.pad_token_id), max_turns=2, max_episode_tokens=30)
    n = int(ep.response_mask[0].sum())
    assert env.replies == ["3", "3"]
    prompt = ep.prompt_ids[0][ep.prompt_mask[0].bool()].tolist()
    messages = [{"role": "user", "content": "12"}, {"role": "assistant", "content": "3"},
                {"role": "user", "content": "45"}, {"role": "assistant", "content": "3"}]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)  # "12+3<eos>=45+3<eos>="
    expected = tiny_tokenizer(rendered, add_special_tokens=False).input_ids[:-1]  # the last "=" is never written
    assert prompt + ep.response_ids[0, :n].tolist() == expected
    # actions: "3<eos>" twice; "=45+" between them is the observation
    assert ep.action_mask[0, :n].tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    assert ep.turn_ends[0, :n].tolist() == [False, True, False, False, False, False, False, True]


# ---------------------------------------------------------------- the trainer with an environment


@pytest.fixture(scope="module")
def episode_setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("episodes")
    (root / "users.py").write_text(TWO_TURNS_ENV)
    prompts = [f"{a}+{b}=" for a in (3, 45, 678, 9) for b in (1, 23)]
    write_jsonl(root / "rows.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(prompts)])
    return root, {
        "model_name_or_path": str(tiny_model_dir), "dataset_name": str(root / "rows.jsonl"),
        "environment": f"{root / 'users.py'}:TwoTurns", "max_turns": 3, "max_episode_tokens": 12,
        "max_new_tokens": 3, "batch_size": 4, "num_mini_batches": 2, "learning_rate": 1e-3, "max_updates": 3,
        "gamma": 0.9, "seed": 0, "progress_bar": False, "save_steps": 1, "logging_steps": 1,
    }


def make_trainer(values: dict, out, **overrides):
    from llm_rl.config.sections import Config

    return build_trainer(Config.from_dict({**values, "output_dir": str(out), **overrides}))


def test_observation_tokens_get_no_advantage_kl_or_loss(episode_setup, tmp_path):
    _, values = episode_setup
    trainer = make_trainer(values, tmp_path / "run", kl_coef=0.5)
    trainer.fused = False  # the rollout takes the old policy's log-probs and values itself
    rollout = sample_rollout(trainer, [0, 1, 2, 3])
    targets = trainer.targets(rollout, trainer.scorer.score(rollout))
    observation = rollout.response_mask.bool() & ~rollout.action_mask.bool()
    assert observation.any() and rollout.action_mask.any()
    for name, tensor in [("kl", targets.kl), ("advantages", targets.advantages), ("returns", targets.returns),
                         ("logprobs", rollout.logprobs), ("values", rollout.values),
                         ("rewards", targets.token_rewards)]:
        assert tensor[observation].abs().max() == 0, name
    # the loss does not see what sits at observation positions
    trainer.model.train()
    normalizer = trainer.global_count(targets.loss_mask)
    first = trainer.loss_and_backward(rollout, targets, trainer.forward(rollout), normalizer)

    def spoiled(batch, names):
        return dataclasses.replace(batch, **{n: getattr(batch, n).masked_fill(observation, 1e3) for n in names})

    rollout = spoiled(rollout, ("logprobs", "values", "ref_logprobs"))
    targets = spoiled(targets, ("advantages", "returns"))
    second = trainer.loss_and_backward(rollout, targets, trainer.forward(rollout), normalizer)
    for key in ("loss/policy", "loss/value", "loss/total", "entropy"):
        assert first[key].item() == pytest.approx(second[key].item(), abs=1e-7), key


@pytest.mark.parametrize("use_peft", [False, True])
def test_multi_turn_ppo_runs_and_logs_episodes(episode_setup, tmp_path, use_peft):
    _, values = episode_setup
    history = make_trainer(values, tmp_path / "run", use_peft=use_peft).train()
    assert len(history) == 3
    for row in history:
        assert row["episode/turns"] == pytest.approx(2.0) or row["episode/done_rate"] < 1
        for key in ("episode/return", "episode/turn_reward", "loss/policy", "loss/value", "kl/per_token"):
            assert torch.isfinite(torch.tensor(row[key])), key
    # whole episodes are logged every logging_steps (here 1) to completions.jsonl
    logged = read_jsonl(tmp_path / "run" / "completions.jsonl")
    assert logged and "7" in logged[0]["completion"] and "reward/environment" in logged[0]
    if not use_peft:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    else:
        assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_critic_free_estimators_take_the_discounted_episode_return(episode_setup, tmp_path, estimator):
    _, values = episode_setup
    trainer = make_trainer(values, tmp_path / "run", advantage_estimator=estimator, num_generations=2, kl_coef=0.0,
                           whiten_advantages=False)
    rollout = sample_rollout(trainer, [0, 1])
    advantages = trainer.targets(rollout, trainer.scorer.score(rollout)).advantages
    mask = rollout.action_mask.bool()
    # the discounted episode return by hand: turn k's reward times 0.9 ** k
    turn_of = rollout.turn_ends.long().cumsum(1) - rollout.turn_ends.long()
    episode_return = (rollout.turn_scores * 0.9 ** turn_of.float()).sum(1)
    if estimator == "grpo":
        from llm_rl.algorithms.advantages import grpo_advantages

        expected = grpo_advantages(episode_return, 2)
        for row in range(4):
            assert torch.allclose(advantages[row][mask[row]], expected[row].expand(int(mask[row].sum())))
    else:  # every bot token: its turn's discounted return to go, whitened over the batch's bot tokens
        from llm_rl.algorithms.ops import masked_whiten

        to_go = torch.zeros_like(rollout.turn_scores)
        for row in range(4):
            rewards = rollout.turn_scores[row][rollout.turn_ends[row]].tolist()  # one per turn, in order
            for t in mask[row].nonzero().flatten().tolist():
                k = int(turn_of[row, t])
                to_go[row, t] = sum(r * 0.9 ** (j - k) for j, r in enumerate(rewards) if j >= k)
        torch.testing.assert_close(advantages, masked_whiten(to_go, rollout.action_mask) * mask)


def test_resume_in_the_middle_of_a_multi_turn_run(episode_setup, tmp_path):
    import shutil

    from safetensors.torch import load_file

    _, values = episode_setup
    make_trainer(values, tmp_path / "straight").train()
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)
    shutil.rmtree(resumed / "checkpoint-3")
    (resumed / "model.safetensors").unlink()
    make_trainer(values, resumed, resume_from_checkpoint=str(resumed / "checkpoint-2")).train()
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    head_a = load_file(tmp_path / "straight" / "value_head.safetensors")
    head_b = load_file(resumed / "value_head.safetensors")
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)


def test_two_processes_play_episodes_and_agree(episode_setup, tmp_path):
    import json

    import yaml

    root, values = episode_setup
    (tmp_path / "driver.py").write_text(RANK_REPORT_DRIVER)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**values, "save_steps": 0, "max_updates": 2}))
    proc = launch_two_processes(str(tmp_path / "driver.py"),
                                [str(tmp_path / "run.yaml"), "--output_dir", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, explain(proc)
    reports = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert reports[0]["digest"] == reports[1]["digest"]
    assert reports[0]["history"][-1]["episode/return"] == reports[1]["history"][-1]["episode/return"]


def test_readme_example_environment_keeps_the_protocol():
    """The README's example environment is real code: it loads and plays an episode by the protocol."""
    import re

    from llm_rl.sampling.episodes import checked_step

    readme = (REPO / "README.md").read_text()
    source = re.search(r"```python\n(# my_env\.py.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(source, "README.md:my_env.py", "exec"), namespace)
    env = namespace["Support"]()
    assert "E42" in env.reset({"code": "E42", "answer": "line 7"})
    assert checked_step(env, "Sorry! Could you send the trace?") == ("Here it is: line 7", pytest.approx(0.3), False)
    assert checked_step(env, "It is line 7.") == (None, 1.0, True)


@pytest.mark.parametrize("bad, message", [
    ("nan", "non-finite reward"), ("none", "no observation but done=False"), ("pair", "must return"),
    ("long", "over max_prompt_length=8"),
])
def test_environment_mistakes_are_named(tiny_lm, tiny_tokenizer, bad, message):
    from llm_rl.sampling.episodes import EpisodeError, run_episodes

    class Broken:
        def reset(self, row):
            return "1+2=" * (5 if bad == "long" else 1)

        def step(self, response):
            return {"nan": ("1", float("nan"), False), "none": (None, 1.0, False), "pair": ("1", 1.0)}[bad]

    with pytest.raises(EpisodeError, match=message):
        run_episodes(tiny_lm, tiny_tokenizer, [Broken()], [{}], SamplingSettings(max_new_tokens=2, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(1,), chunk_size=1, pad_token_id=tiny_tokenizer.pad_token_id), max_turns=2, max_episode_tokens=20, max_prompt_length=8)


@pytest.mark.parametrize("where, message", [
    ("init", r"^Flaky\(\) raised RuntimeError: no connection$"),
    ("reset", r"^Flaky\.reset raised KeyError: 'code'$"),
    ("step", r"^Flaky\.step raised ZeroDivisionError: division by zero for the reply '.*'$"),
])
def test_an_exception_in_the_users_environment_names_the_class_and_method(tiny_lm, tiny_tokenizer, where, message):
    from llm_rl.sampling.episodes import EpisodeError, EpisodeSampler

    class Flaky:
        def __init__(self):
            if where == "init":
                raise RuntimeError("no connection")

        def reset(self, row):
            return row["code"] if where == "reset" else "1+2="

        def step(self, response):
            return "1", 1 / 0, False

    from accelerate import Accelerator

    settings = SamplingSettings(max_new_tokens=2, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(1,),
                                chunk_size=1, pad_token_id=tiny_tokenizer.pad_token_id)
    from llm_rl.models.value_head import CausalLMWithValueHead

    policy = CausalLMWithValueHead(tiny_lm)
    sampler = EpisodeSampler(policy, Accelerator(cpu=True), tiny_tokenizer, settings, Flaky, 1, max_turns=2,
                             max_episode_tokens=20, max_prompt_length=8)
    with pytest.raises(EpisodeError, match=message) as caught:
        sampler.sample({"rows": [{}]})
    assert caught.value.__cause__ is not None  # --debug shows the user's traceback
