"""Exact resume: a run killed with SIGKILL right after a checkpoint and resumed ends where an
uninterrupted run ends, bit for bit (CPU, deterministic settings)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import addition_prompts, read_jsonl
from safetensors.torch import load_file

from llm_rl.training import checkpoint

UPDATES = 5
# 8 prompts, 4 per update: a pass over the data every 2 updates, so checkpoint-2 sits
# exactly on a pass boundary and checkpoint-3 in the middle of the second pass.
BASE_ARGS = [
    "--batch_size", "4", "--num_mini_batches", "2", "--ppo_epochs", "2", "--max_new_tokens", "4",
    "--learning_rate", "1e-3", "--max_updates", str(UPDATES), "--save_steps", "1", "--progress_bar", "false",
    "--reward_funcs", "llm_rl.tasks.arithmetic:reward", "--adaptive_kl", "true", "--kl_target", "0.5",
]
VOLATILE = ("time/", "tokens_per_second")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    data = addition_prompts(root, num_train=8)
    return root, ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), *BASE_ARGS]


def ppo(args, out: Path, extra=()):
    cmd = [sys.executable, "-m", "llm_rl.cli", "ppo", *args, "--output_dir", str(out), *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return cmd, env


def run(args, out: Path, extra=()):
    cmd, env = ppo(args, out, extra)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_after_checkpoint(args, out: Path, update: int) -> None:
    """Start a run, SIGKILL it once checkpoint-<update> is complete, and cut the folder back to
    that moment (later checkpoints and metrics may have been written before the kill landed)."""
    cmd, env = ppo(args, out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = checkpoint.checkpoint_dir(out, update)
    deadline = time.time() + 300
    while not (target / checkpoint.STATE_FILE).is_file():
        assert proc.poll() is None, f"run ended before checkpoint-{update}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for later in checkpoint.list_checkpoints(out):
        if int(later.name.split("-")[1]) > update:
            shutil.rmtree(later)
    for unfinished in out.glob(f".tmp-{checkpoint.PREFIX}*"):  # a later checkpoint was being written
        shutil.rmtree(unfinished)


def metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_jsonl(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, args = setup
    out = root / "straight"
    run(args, out)
    return out


@pytest.mark.parametrize("kill_at", [2, 3], ids=["pass-boundary", "mid-pass"])
def test_killed_and_resumed_run_matches_uninterrupted(setup, uninterrupted, kill_at):
    root, args = setup
    out = root / f"killed-{kill_at}"
    kill_after_checkpoint(args, out, kill_at)
    result = run(args, out, ["--resume_from_checkpoint", "latest"])
    assert f"resumed from {checkpoint.checkpoint_dir(out, kill_at)} at update {kill_at}" in result.stdout

    expected, got = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert torch.equal(
        load_file(uninterrupted / "value_head.safetensors")["weight"], load_file(out / "value_head.safetensors")["weight"]
    )
    # the per-update metrics after the resume point are the same numbers, and none is duplicated
    assert [r["update"] for r in metrics(out)] == list(range(1, UPDATES + 1))
    assert metrics(out) == metrics(uninterrupted)


def test_checkpoint_contents_and_rotation(setup):
    root, args = setup
    out = root / "rotation"
    run(args, out, ["--save_total_limit", "2"])
    kept = checkpoint.list_checkpoints(out)
    assert [p.name for p in kept] == [f"checkpoint-{UPDATES - 1}", f"checkpoint-{UPDATES}"]
    files = {p.name for p in kept[-1].iterdir()}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json"} <= files
    state = checkpoint.read_state(kept[-1])
    assert state["update"] == UPDATES and state["sampler"] == {"epoch": 2, "offset": 4}
    assert not list(out.glob(".tmp-*"))


def test_crash_while_writing_leaves_previous_checkpoint_latest(setup, tmp_path):
    root, args = setup
    out = tmp_path / "partial"
    kill_after_checkpoint(args, out, 2)
    # a checkpoint whose writing died half way: a temporary folder without trainer_state.json
    partial = checkpoint.temporary_dir(out, 3)
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    assert checkpoint.resolve_checkpoint("latest", out) == checkpoint.checkpoint_dir(out, 2)
    result = run(args, out, ["--resume_from_checkpoint", "latest"])
    assert "at update 2" in result.stdout


def test_output_dir_with_a_run_is_refused_without_resume(setup, uninterrupted):
    _, args = setup
    cmd, env = ppo(args, uninterrupted)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "resume_from_checkpoint" in result.stderr


LORA_ARGS = ["--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "c_attn", "c_fc"]


def test_lora_checkpoint_holds_only_what_trains_and_resumes_exactly(setup, tmp_path, tiny_model_dir):
    _, args = setup
    straight = tmp_path / "lora-straight"
    run([*args, *LORA_ARGS], straight)
    saved = load_file(checkpoint.checkpoint_dir(straight, UPDATES) / "model.safetensors")
    assert saved and all("lora_" in name or name.startswith("v_head.") for name in saved)  # no frozen base
    base = load_file(tiny_model_dir / "model.safetensors")
    assert sum(t.numel() for t in saved.values()) < sum(t.numel() for t in base.values()) / 4

    killed = tmp_path / "lora-killed"
    kill_after_checkpoint([*args, *LORA_ARGS], killed, 3)
    result = run([*args, *LORA_ARGS], killed, ["--resume_from_checkpoint", "latest"])
    assert "at update 3" in result.stdout
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        expected, got = load_file(straight / name), load_file(killed / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    assert metrics(killed) == metrics(straight)


@pytest.mark.parametrize("damaged", ["model.safetensors", checkpoint.STATE_FILE])
def test_a_corrupted_checkpoint_is_named_and_the_previous_one_offered(setup, uninterrupted, tmp_path, damaged):
    """The file named is the damaged one (a bad trainer_state.json used to be reported as random_states_0.pkl,
    which plain weights_only loading refuses), with the checkpoints there are."""
    _, args = setup
    out = tmp_path / "corrupted"
    shutil.copytree(uninterrupted, out)
    bad = checkpoint.checkpoint_dir(out, UPDATES) / damaged
    bad.write_bytes(bad.read_bytes()[:30])  # a disk that filled up while writing
    cmd, env = ppo(args, out, ["--resume_from_checkpoint", "latest"])
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"llm-rl: checkpoint error: {bad} is unreadable")
    assert f"--resume_from_checkpoint {checkpoint.checkpoint_dir(out, UPDATES - 1)}" in line
    earlier = [p.name for p in checkpoint.list_checkpoints(out)][:-1]
    assert f"(checkpoints in {out}: {', '.join(earlier)})" in line and earlier
