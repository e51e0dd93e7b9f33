"""A user's workflow: safe reruns, one-line errors, held-out evaluation and sample logging from the config,
quiet and fast commands. In process, tiny model, CPU, offline (the TRL/OpenRLHF option names are checked
in tests/config/test_trl_option_names.py)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, ppo_config, read_jsonl

from llm_rl import cli
from llm_rl.config.errors import ConfigError
from llm_rl.config.sections import Config
from llm_rl.data.prompts import DataError
from llm_rl.reporting.plotting import curve_panels
from llm_rl.rewards.functions import RewardError
from llm_rl.tasks import arithmetic
from llm_rl.training import checkpoint
from llm_rl.training.callbacks import Evaluate
from llm_rl.training.pipeline import run_ppo

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every run builds its own Accelerator


@pytest.fixture
def data(tmp_path):
    """16 training and 4 held-out addition prompts (columns prompt, answer)."""
    train, heldout = arithmetic.make_splits(1, 16, 4, seed=0)
    return arithmetic.write_jsonl(train, tmp_path / "train.jsonl"), arithmetic.write_jsonl(heldout, tmp_path / "heldout.jsonl")


def config_for(tiny_model_dir, data, out: Path, **extra) -> Config:
    values = {
        "reward_funcs": ["llm_rl.tasks.arithmetic:reward"], "batch_size": 4, "max_new_tokens": 3,
        "max_updates": 2, "learning_rate": 1e-3, "seed": 0,
    }
    return ppo_config(tiny_model_dir, data[0], out, **{**values, **extra})


# ----------------------------------------------------------------------------- reruns and checkpoints
def test_overwrite_leaves_nothing_of_the_old_run(tiny_model_dir, data, tmp_path):
    out = tmp_path / "out"
    run_ppo(config_for(tiny_model_dir, data, out, save_steps=1))
    (out / "notes.txt").write_text("mine")  # not written by llm_rl: stays
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()

    lora = {"use_peft": True, "lora_r": 2, "lora_target_modules": ["c_attn"], "max_updates": 1}
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl \(2 rows\), checkpoint-1, checkpoint-2\)"):
        run_ppo(config_for(tiny_model_dir, data, out, **lora))
    run_ppo(config_for(tiny_model_dir, data, out, overwrite_output_dir=True, **lora))

    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in names and "adapter_model.safetensors" in names  # no stale full model
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]  # `latest` is this run's
    assert [row["update"] for row in read_jsonl(out / "metrics.jsonl")] == [1]
    assert (out / "notes.txt").read_text() == "mine"


FAILS_AT_FIRST_CALL = "def reward(prompts, completions, **_):\n    raise ZeroDivisionError('oops')\n"


def test_a_run_that_failed_before_its_first_update_does_not_block_the_rerun(tiny_model_dir, data, tmp_path):
    (tmp_path / "bad.py").write_text(FAILS_AT_FIRST_CALL)
    out = tmp_path / "out"
    with pytest.raises(RewardError, match="ZeroDivisionError"):
        run_ppo(config_for(tiny_model_dir, data, out, reward_funcs=[f"{tmp_path / 'bad.py'}:reward"]))
    assert (out / "metrics.jsonl").read_text() == ""  # what the failed run left
    _, history = run_ppo(config_for(tiny_model_dir, data, out))  # the fixed rerun, no flag needed
    assert len(history) == 2


def test_default_run_is_resumable(tiny_model_dir, data, tmp_path):
    assert Config().train.save_steps == 100 and Config().train.logging_steps == 10
    out = tmp_path / "out"
    run_ppo(config_for(tiny_model_dir, data, out))  # no save_steps given
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]  # the end is always saved


def test_no_shared_tensor_warning_per_checkpoint(tiny_model_dir, data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run_ppo(config_for(tiny_model_dir, data, tmp_path / "out", save_steps=1))
    assert "Removed shared tensor" not in caplog.text


# ----------------------------------------------------------------------------- errors a person can act on
def needs_answer_and_level(prompts, completions, answer, level):
    return [0.0] * len(completions)


def no_kwargs(prompts, completions):
    return [0.0] * len(completions)


@pytest.mark.parametrize("fn, problem", [
    ("needs_answer_and_level", "missing a required argument: 'level'"),
    ("no_kwargs", "unexpected keyword argument 'answer'"),
])
def test_reward_signature_is_checked_against_the_columns_at_load(tiny_model_dir, data, tmp_path, fn, problem):
    config = config_for(tiny_model_dir, data, tmp_path / "out", reward_funcs=[f"{__file__}:{fn}"])
    with pytest.raises(RewardError) as caught:
        run_ppo(config)
    assert problem in str(caught.value) and "['answer']" in str(caught.value)  # the dataset's columns
    assert not (tmp_path / "out").exists()  # found before anything was generated or written


@pytest.mark.parametrize("key, value", [
    ("model_name_or_path", "./no/such/model"), ("dataset_name", "data/missing.jsonl"),
    ("reward_model_name_or_path", "/no/such/reward_model"), ("eval_dataset_name", "~/held.jsonl"),
])
def test_a_missing_local_path_fails_at_once(tiny_model_dir, data, tmp_path, key, value):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"{key}: {value} does not exist"):
        run_ppo(config_for(tiny_model_dir, data, tmp_path / "out", **{key: value}))
    assert time.perf_counter() - start < 5  # no Hub retries


@pytest.mark.parametrize("content, name", [("", "empty.jsonl"), ("prompt,answer\n", "header.csv"), ("\n\n", "blank.jsonl")])
def test_empty_or_header_only_data_files_are_named(tiny_model_dir, data, tmp_path, content, name):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{tmp_path / name} (is empty|has no rows)"):
        run_ppo(config_for(tiny_model_dir, data, tmp_path / "out", dataset_name=str(tmp_path / name)))


def test_cli_prints_one_line_and_exits_2_traceback_with_debug(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.py").write_text(FAILS_AT_FIRST_CALL)
    args = ["ppo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data[0]),
            "--config", str(REPO / "recipes" / "configs" / "addition.yaml"),  # --config anywhere
            "--reward_funcs", f"{tmp_path / 'bad.py'}:reward", "--output_dir", str(tmp_path / "out"),
            "--batch_size", "4", "--max_updates", "1", "--max_new_tokens", "3", "--no_progress_bar"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("llm-rl:")]  # besides loading bars
    assert len(ours) == 1 and ours[0].startswith("llm-rl: reward error: reward 'reward' raised ZeroDivisionError: oops")
    assert "--debug" in ours[0] and "Traceback" not in err
    monkeypatch.setenv("LLM_RL_DEBUG", "1")
    with pytest.raises(RewardError):
        cli.main(args)
    monkeypatch.delenv("LLM_RL_DEBUG")
    with pytest.raises(RewardError):
        cli.main([*args, "--debug"])


def test_a_model_that_does_not_load_is_one_line_too(data, tmp_path, capsys):
    (tmp_path / "not_a_model").mkdir()
    args = ["ppo", "--model_name_or_path", str(tmp_path / "not_a_model"), "--dataset_name", str(data[0]),
            "--reward_funcs", "llm_rl.tasks.arithmetic:reward", "--output_dir", str(tmp_path / "out")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("llm-rl:")]
    assert len(ours) == 1 and str(tmp_path / "not_a_model") in ours[0] and "Traceback" not in err


# ----------------------------------------------------------------------------- what users see
def test_heldout_evaluation_and_sample_completions_from_the_config(tiny_model_dir, data, tmp_path, hub_card):
    (tmp_path / "length.py").write_text("def short(prompts, completions, **_):\n    return [-len(c) for c in completions]\n")
    out = tmp_path / "out"
    config = config_for(
        tiny_model_dir, data, out, eval_dataset_name=str(data[1]), eval_steps=1, eval_decoding=["greedy", "sampled"],
        eval_reward_funcs=["llm_rl.tasks.arithmetic:reward", f"{tmp_path / 'length.py'}:short"],
        log_completions_steps=2, log_completions_count=3,
    )
    trainer, history = run_ppo(config)
    for row in history:
        for decoding in ("greedy", "sampled"):
            assert {f"eval/{decoding}/{k}" for k in ("score", "reward/reward", "reward/short", "length", "eos_rate")} <= set(row)
            # the eval rewards replace the training one; with no weights given, the score is their sum
            parts = row[f"eval/{decoding}/reward/reward"] + row[f"eval/{decoding}/reward/short"]
            assert row[f"eval/{decoding}/score"] == pytest.approx(parts) and row[f"eval/{decoding}/reward/short"] < 0
    # rewards are named by function, not by path
    assert "reward/reward" in history[0] and not any(":" in k for k in history[0])
    assert ("eval/greedy/score", "held-out score (greedy)") in curve_panels(history)
    assert "## Held-out evaluation" in hub_card(out / "README.md").text

    rows = read_jsonl(out / "completions.jsonl")
    assert [r["update"] for r in rows] == [2, 2, 2]  # every log_completions_steps updates
    assert set(rows[0]) == {"update", "prompt", "completion", "reward/reward", "score", "advantage"}
    assert rows[0]["prompt"] in {row["prompt"] for row in read_jsonl(data[0])}


def test_evaluation_and_completions_reach_tensorboard(tiny_model_dir, data, tmp_path):
    pytest.importorskip("tensorboard")  # the `tensorboard` extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    run_ppo(config_for(tiny_model_dir, data, out, eval_dataset_name=str(data[1]), log_completions_steps=1,
                       report_to="tensorboard"))
    events = EventAccumulator(str(next((out / "llm_rl").rglob("events.out.tfevents.*")).parent)).Reload()
    assert "completions/text_summary" in events.Tags()["tensors"]
    assert "eval/greedy/score" in events.Tags()["scalars"]


def test_completions_table_goes_to_wandb_as_a_table():
    from types import SimpleNamespace

    from llm_rl.reporting.metrics import log_table

    calls = []
    wandb = SimpleNamespace(name="wandb", log_table=lambda name, columns, data, step: calls.append((name, columns, data, step)))
    log_table(SimpleNamespace(trackers=[wandb, SimpleNamespace(name="mlflow")]), "completions",
              [{"prompt": "1+2=", "completion": "3", "advantage": 0.5}], step=7)
    assert calls == [("completions", ["prompt", "completion", "advantage"], [["1+2=", "3", 0.5]], 7)]


def test_demo_style_eval_callback_still_runs(tiny_model_dir, data, tmp_path):
    calls = []
    config = config_for(tiny_model_dir, data, tmp_path / "out", eval_steps=1)
    _, history = run_ppo(config, callbacks=[Evaluate(lambda trainer: calls.append(trainer.update) or {"accuracy": 0.5})])
    assert calls == [1, 2] and all(row["eval/accuracy"] == 0.5 for row in history)


def test_version_and_a_help_that_needs_no_torch():
    assert cli.main(["--version"]) == 0
    code = "import sys, llm_rl.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr  # `llm-rl --help` and config errors load no ML library
    assert time.perf_counter() - start < 5
