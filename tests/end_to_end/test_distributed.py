"""Two processes on the CPU (gloo) under `accelerate launch`: the recipe and a driver script
(how they are launched: `launch_two_processes` in tests/conftest.py).

Checked: both ranks end with bit-identical parameters, logged metrics are means over
both ranks (the reward is the rank: 0 and 1, so the mean score is 0.5 exactly), and
only rank 0 prints and writes files.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import (
    RANK_REPORT_DRIVER,
    REPO,
    explain,
    free_port,
    launch_two_processes,
    offline_env,
    read_jsonl,
    write_jsonl,
)

UPDATES = 2

REWARD_SOURCE = '''
import os
import time

# Rank 1 gets to the trainer a little after rank 0, as a process on a busier machine
# would: nothing in a run may depend on which rank arrives first.
if os.environ.get("RANK") == "1":
    time.sleep(2.0)


def rank_score(prompts, completions, **columns):
    """Every completion of rank r scores r: the global mean over 2 ranks is 0.5."""
    return [float(os.environ["RANK"])] * len(completions)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ddp")
    (root / "rank_reward.py").write_text(REWARD_SOURCE)
    prompts = [f"{a}+{b}=" for a in (3, 45, 678, 9) for b in (1, 23, 456, 7)]
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts])
    config = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(root / "prompts.jsonl"),
        "reward_funcs": [f"{root / 'rank_reward.py'}:rank_score"],
        "batch_size": 4,
        "max_new_tokens": 4,
        "learning_rate": 1e-3,
        "max_updates": UPDATES,
        "seed": 0,
        "progress_bar": False,
        "logging_steps": 1,
    }
    (root / "ddp.yaml").write_text(yaml.safe_dump(config))
    (root / "driver.py").write_text(RANK_REPORT_DRIVER)
    return root


def test_ranks_end_with_identical_parameters(setup):
    proc = launch_two_processes(str(setup / "driver.py"),
                                [str(setup / "ddp.yaml"), "--output_dir", str(setup / "driver_out")], setup)
    assert proc.returncode == 0, explain(proc)
    reports = [json.loads((setup / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["num_processes"] == 2 and r["distributed_type"].endswith("MULTI_CPU") for r in reports)
    assert reports[0]["digest"] == reports[1]["digest"], [
        name for name, s in reports[0]["sums"].items() if s != reports[1]["sums"][name]
    ]
    # and training moved them: the value head starts at zero
    assert any(s != 0.0 for name, s in reports[0]["sums"].items() if name.startswith("v_head."))
    # every rank returns the same (global) metrics
    assert reports[0]["history"][-1]["score/mean"] == reports[1]["history"][-1]["score/mean"] == 0.5


def test_recipe_logs_global_means_and_only_rank0_writes(setup):
    out = setup / "recipe_out"
    proc = launch_two_processes("recipes/ppo.py", ["--config", str(setup / "ddp.yaml"), "--output_dir", str(out)],
                                setup)
    assert proc.returncode == 0, explain(proc)

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["update"] for r in rows] == list(range(1, UPDATES + 1))  # N lines, not 2N
    for row in rows:
        assert row["score/mean"] == 0.5  # rank 0 scores 0, rank 1 scores 1
        # 4 prompts per process and per update, counted over both processes
        assert row["response/tokens"] >= 2 * 4

    # only rank 0 prints its summary lines
    for update in range(1, UPDATES + 1):
        assert (proc.stdout + proc.stderr).count(f"update {update} |") == 1, explain(proc)
    for name in ("config.json", "model.safetensors", "value_head.safetensors", "config.yaml", "tokenizer.json"):
        assert (out / name).is_file(), name

    # the reward function's own mean is a global mean too
    key = "reward/rank_score"
    assert [row.get(key) for row in rows] == [0.5] * UPDATES, [{k: v for k, v in r.items() if "reward" in k}
                                                                for r in rows]


# ---------------------------------------------------------------- refused before any model loads, on every rank
def launch_with(config_file: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/<config_file> --num_processes 2 -m llm_rl.cli ARGS`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config_file}",
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               "-m", "llm_rl.cli", *args]
    return subprocess.run(command, cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="FSDP is allowed on GPUs")
def test_fsdp_yaml_on_the_cpu_is_refused_in_one_line(setup, tmp_path):
    out = tmp_path / "out"
    proc = launch_with("fsdp.yaml", ["ppo", "--config", str(setup / "ddp.yaml"), "--output_dir", str(out)], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("llm-rl:")]
    assert proc.returncode != 0 and lines == [
        "llm-rl: config error: FSDP needs GPUs: accelerate's FSDP cannot run on CPU (sync_module_states is not "
        "supported on cpu, and without it accelerate falls back to DDP); use accelerate_configs/cpu.yaml "
        "(DDP over gloo, --num_processes N) on this machine"] * 2, explain(proc)  # each rank says it
    assert "sync_module_states=True" not in proc.stderr and not out.exists()


def test_a_push_that_cannot_happen_stops_two_ranks_with_rank_0s_line(setup, tmp_path):
    """Rank 0 alone asks the Hub (no collective to wait in); its exit ends rank 1 through the launcher."""
    out = tmp_path / "out"
    proc = launch_with("cpu.yaml", ["ppo", "--config", str(setup / "ddp.yaml"), "--output_dir", str(out),
                                    "--push_to_hub", "true", "--hub_model_id", "me/x"], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("llm-rl:")]
    assert proc.returncode != 0 and len(lines) == 1, explain(proc)
    assert lines[0].startswith("llm-rl: hub error: push_to_hub to 'me/x': HF_HUB_OFFLINE is set")
    assert not out.exists()
