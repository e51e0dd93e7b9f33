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
from conftest import explain, read_jsonl, run_cli, write_jsonl, write_sevens_reward


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
