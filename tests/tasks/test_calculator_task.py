"""The built-in tool task (TRL's environment_factory shape): its reward, its recipe run end to end with
`llm-rl ppo --config`, and a factory that nothing scores refused before training."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, build_trainer, explain, ppo_config, run_cli

from llm_rl.config.errors import ConfigError
from llm_rl.tasks import calculator

RECIPE = REPO / "recipes" / "configs" / "calculator_tools.yaml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return calculator.prepare(tmp_path_factory.mktemp("calculator"), num_rows=16)


def test_final_answer_and_reward_read_the_last_reply():
    transcript = '<tool_call>{"name": "add"}</tool_call><eos><|tool|>46<|assistant|>46<eos>'
    assert calculator.final_answer(transcript) == "46"
    assert calculator.final_answer("46<eos>") == "46"  # answered without the tool
    assert calculator.exact_sum(["p", "p"], [transcript, "45<eos>"], [46, 46]) == [1.0, 0.0]
    rows = calculator.make_rows(8)
    assert all(r["prompt"] == f"What is {r['a']}+{r['b']}?" and r["answer"] == r["a"] + r["b"] for r in rows)


def test_recipe_runs_two_updates_with_the_cli(prepared, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["ppo", "--config", str(RECIPE), "--model_name_or_path", str(prepared / "model"),
                    "--dataset_name", str(prepared / "train.jsonl"), "--output_dir", str(out), "--max_updates", "2"],
                   tmp_path)
    assert proc.returncode == 0, explain(proc)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["update"] for h in history] == [1, 2]
    assert {"reward/exact_sum", "episode/turns", "episode/done_rate"} <= set(history[-1])
    assert all(1 <= h["episode/turns"] <= 3 for h in history)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_factory_without_get_reward_needs_reward_funcs(prepared, tmp_path):
    config = ppo_config(prepared / "model", prepared / "train.jsonl", tmp_path / "out",
                        environment_factory="llm_rl.tasks.calculator:Calculator", max_prompt_length=512,
                        advantage_estimator="grpo", num_generations=2, batch_size=2, kl_coef=0.0)
    with pytest.raises(ConfigError) as caught:
        build_trainer(config, rewards=[])
    assert str(caught.value) == ("environment_factory Calculator has no get_reward() and no reward_funcs are set: "
                                 "nothing scores its episodes")


def test_a_broken_tool_class_is_one_line_before_the_model_loads(prepared, tmp_path):
    (tmp_path / "tools.py").write_text("class Lookup:\n    def reset(self, **row):\n        return None\n\n"
                                       "    def find(self, key):\n        return key\n")
    proc = run_cli(["ppo", "--config", str(RECIPE), "--model_name_or_path", str(prepared / "model"),
                    "--dataset_name", str(prepared / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
                    "--environment_factory", f"{tmp_path / 'tools.py'}:Lookup"], tmp_path)
    assert proc.returncode == 2, explain(proc)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("llm-rl: environment error: Lookup.find is a tool (a public method) but cannot be described "
                                "to the model: Cannot generate JSON schema for find because it has no docstring!")
    assert "Loading weights" not in proc.stderr + proc.stdout  # refused before the policy loads
