"""The `llm-rl` command end to end, each run in its own process (`python -m llm_rl.cli ...`).

These check the pipeline's outputs (exit codes, files, printed table), never how much
the model learned in a couple of updates.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO, explain, offline_env, read_jsonl, run_cli, write_jsonl, write_sevens_reward


@pytest.fixture
def ppo_yaml(tmp_path, tiny_model_dir) -> Path:
    """The tiny saved model, a jsonl of prompts, a reward module and the YAML naming them."""
    prompts = [f"{a}+{b}=" for a in (1, 23, 456, 7) for b in (8, 90, 5)]
    config = {
        "model": {"model_name_or_path": str(tiny_model_dir)},
        "data": {"dataset_name": str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts]))},
        "sampling": {"max_new_tokens": 4},
        "reward": {"reward_funcs": [write_sevens_reward(tmp_path)]},
        "ppo": {"batch_size": 4, "learning_rate": 1e-3},
        "train": {"max_updates": 10, "seed": 0, "progress_bar": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_ppo_command(ppo_yaml, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["ppo", "--config", str(ppo_yaml), "--max_updates", "2", "--output_dir", str(out)], tmp_path)
    assert proc.returncode == 0, explain(proc)

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["update"] for r in rows] == [1, 2]  # the command line's max_updates beat the YAML's 10
    assert all(math.isfinite(v) for r in rows for v in r.values())
    for name in ("config.json", "model.safetensors", "value_head.safetensors", "config.yaml",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not [p for pattern in ("*.bin", "*.pt") for p in out.glob(pattern)]  # the model: safetensors only
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_updates"] == 2 and saved["train"]["output_dir"] == str(out)
    assert "update 2" in proc.stdout  # the summary line of the last update


@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_misspelled_key_exits_2_with_the_closest_name(ppo_yaml, tmp_path, where):
    args = ["ppo", "--config", str(ppo_yaml), "--output_dir", str(tmp_path / "out")]
    if where == "command line":
        args += ["--learning_rat", "1e-4"]
    else:
        config = yaml.safe_load(ppo_yaml.read_text())
        config["ppo"]["clip_rnage"] = 0.1
        ppo_yaml.write_text(yaml.safe_dump(config))
    proc = run_cli(args, tmp_path, timeout=120)
    assert proc.returncode == 2, explain(proc)
    wrong, right = ("learning_rat", "learning_rate") if where == "command line" else ("clip_rnage", "clip_range")
    assert wrong in proc.stderr and right in proc.stderr, explain(proc)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_demo_command(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(
        ["demo", "--max_updates", "2", "--warm_start_steps", "20", "--output_dir", str(out), "--seed", "0",
         # extra keys go to the PPO config: a smaller batch keeps the test short
         "--batch_size", "16", "--ppo_epochs", "1"],
        tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, explain(proc)

    summary = json.loads((out / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "reward_before", "reward_after", "kl_after", "seconds", "seed"):
        assert key in summary, key
        assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), (key, summary[key])
    assert summary["seed"] == 0
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["update"] for r in rows] == [1, 2]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the before/after table on stdout
    header = next((line for line in proc.stdout.splitlines() if "before" in line and "after" in line), None)
    assert header is not None, explain(proc)
    assert "held-out exact match" in proc.stdout and "mean reward" in proc.stdout

    # the trained policy is a plain transformers checkpoint: load it in a process without llm_rl
    check = textwrap.dedent(f"""
        import sys
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        ids = tokenizer("12+34=", return_tensors="pt").input_ids
        assert torch.isfinite(model(input_ids=ids).logits).all()
        assert "llm_rl" not in sys.modules
        print("loaded", type(model).__name__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    loaded = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, explain(loaded)
    assert "loaded GPT2LMHeadModel" in loaded.stdout


def test_dialogue_demo_command(tmp_path):
    out = tmp_path / "dialogue"
    proc = run_cli(["demo", "--task", "dialogue", "--max_updates", "2", "--num_heldout", "2", "--output_dir", str(out)],
                   tmp_path, timeout=600)
    assert proc.returncode == 0, explain(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"0.9", "0.0"}
    for run in summary["runs"].values():
        assert run["updates"] == 2
        value = run["value"]
        assert math.isfinite(value["value"]) and 0 <= value["exact_return"] <= 1.75 and value["pruned_mass"] < 0.05
        assert 0 <= run["after"]["greedy"]["ask_rate"] <= 1
    assert 0.2 < summary["before"]["sampled"]["ask_rate"] < 0.8  # the warm start picks either behaviour
    assert (out / "dialogue.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gamma 0.9" in proc.stdout and "exact return" in proc.stdout


# ---------------------------------------------------------------- errors before the heavy imports
# `python -c` runs the CLI entry on bad input, then reports which heavy libraries that imported.
HEAVY_IMPORTS_AFTER = textwrap.dedent("""
    import sys
    from llm_rl.cli import main
    code = "SystemExit"  # argparse's --help and its errors exit
    try:
        code = main(sys.argv[1:])
    finally:
        print("exit", code, "heavy:", sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules))
        print("architectures:", sorted(m for m in sys.modules if m.startswith("transformers.models.")
                                       and not m.startswith("transformers.models.auto")))
""")


def run_entry(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HEAVY_IMPORTS_AFTER, *args], cwd=REPO, env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["ppo", "grpo", "reward train", "reward train --help", "reward score --help",
                                  "demo", "demo dialogue", "demo --help", "ppo --help", "grpo --help"])
def test_config_errors_and_help_come_before_torch_is_imported(tmp_path, case):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: /nonexistent\nper_device_train_batch_size: 4\nppo:\n  use_peft: true\n")
    args = {
        "ppo": ["ppo", "--config", str(bad), "--learningrate", "1"],
        "grpo": ["grpo", "--config", str(bad), "--learningrate", "1", "--loss_type", "cispo"],
        "reward train": ["reward", "train", "--config", str(bad)],
        "demo": ["demo", "--output_dir", str(tmp_path / "demo"), "--bogus_key", "1"],
        "demo dialogue": ["demo", "--task", "dialogue", "--output_dir", str(tmp_path / "demo"), "--bogus_key", "1"],
    }.get(case, case.split())
    result = run_entry(args, tmp_path)
    out = result.stdout + result.stderr
    assert "heavy: []" in out, explain(result)
    if "--help" not in case:
        assert "exit 2" in out and "llm-rl: config error:" in result.stderr, explain(result)


def test_every_bad_key_is_listed_in_one_run(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("per_device_train_batch_size: 4\nmax_completion_length: 32\nppo:\n  use_peft: true\n  lora_r: 8\n")
    proc = run_cli(["ppo", "--config", str(bad), "--learningrate", "1e-5"], tmp_path, timeout=120)
    assert proc.returncode == 2, explain(proc)
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"llm-rl: config error: 5 unknown keys in {bad} and the command line:"
    assert "Did you mean batch_size?" in lines[1] and "Did you mean max_new_tokens?" in lines[2]
    assert "'use_peft' belongs in section 'model'" in lines[3] and "'lora_r' belongs in section 'model'" in lines[4]
    assert "Did you mean: learning_rate?" in lines[5] and len(lines) == 6
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["ppo", "reward train"])
def test_an_output_folder_holding_a_run_is_refused_before_the_model_is_looked_at(tmp_path, command):
    """The model path does not exist: the folder check has to come first for its message to be the one shown."""
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"update": 3}')
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: /nonexistent/model\ndataset_name: {data}\noutput_dir: {out}\n")
    result = run_entry([*command.split(), "--config", str(config)], tmp_path)
    assert "exit 2" in result.stdout, explain(result)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"llm-rl: config error: {out} already holds a run (checkpoint-3)"), explain(result)
    assert "/nonexistent/model" not in result.stderr
    assert "architectures: []" in result.stdout  # no model class was even imported


@pytest.mark.parametrize("command", ["ppo", "reward train"])
def test_push_to_hub_offline_is_one_line_before_the_model_is_looked_at(tmp_path, tiny_model_dir, command):
    """HF_HUB_OFFLINE=1 (offline_env): the push cannot happen, and the run says so before it loads anything."""
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'out'}\n")
    result = run_entry([*command.split(), "--config", str(config), "--push_to_hub", "true", "--hub_model_id", "me/x"],
                       tmp_path)
    assert "exit 2" in result.stdout, explain(result)
    assert result.stderr.strip().splitlines() == [
        "llm-rl: hub error: push_to_hub to 'me/x': HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, "
        "or set push_to_hub: false and upload the output folder later with `hf upload` "
        "(--debug or LLM_RL_DEBUG=1 shows the traceback)"], explain(result)
    assert "architectures: []" in result.stdout  # no model class was even imported
    assert not (tmp_path / "out").exists()


def test_an_environment_exception_is_one_line_naming_the_class_and_method(tmp_path, tiny_model_dir):
    env_file = tmp_path / "my_env.py"
    env_file.write_text(textwrap.dedent("""
        class Support:
            def reset(self, row):
                return row["prompt"]

            def step(self, response):
                return None, {"score": 1}["reward"], True
    """))
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"{a}+1="} for a in range(4)])
    proc = run_cli(["ppo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
                    "--environment", f"{env_file}:Support", "--batch_size", "2", "--max_new_tokens", "2",
                    "--max_updates", "1", "--output_dir", str(tmp_path / "out"), "--progress_bar", "false"], tmp_path)
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("llm-rl: environment error: Support.step raised KeyError: 'reward' for the reply "), line


def test_ctrl_c_says_where_the_last_checkpoint_is_and_exits_130(ppo_yaml, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    command = [sys.executable, "-m", "llm_rl.cli", "ppo", "--config", str(ppo_yaml), "--max_updates", "10000",
               "--save_steps", "1", "--output_dir", str(out)]
    proc = subprocess.Popen(command, cwd=REPO, env=offline_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-2" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    latest = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert line == (f"llm-rl: interrupted; the last checkpoint is {latest}; resume with the same command and "
                    "--resume_from_checkpoint latest"), line
