"""The run skeleton (llm_rl.training.run) as reward-model training uses it: exact resume, the output-folder
policy, and the pairwise loss at its home in llm_rl.algorithms.losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_jsonl, reset_accelerate_state, write_addition_pairs
from safetensors.torch import load_file

from llm_rl.config.errors import ConfigError
from llm_rl.config.reward_training import RewardTrainingConfig
from llm_rl.training import checkpoint
from llm_rl.training.reward_trainer import RewardTrainer, train_reward_model


# ---------------------------------------------------------------- the loss
def test_pairwise_loss_by_hand_from_losses():
    import llm_rl
    from llm_rl.algorithms import losses

    assert llm_rl.pairwise_loss is losses.pairwise_loss  # the public name
    # gaps 2 - 1 = 1 and 0 - 3 = -3, margin 0.5: -log sigmoid(0.5) = 0.4740770, -log sigmoid(-3.5) = 3.5297504;
    # sums 3 and 3 -> mean square 9, times 0.1
    loss, stats = losses.pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0]), 0.5, center_coef=0.1)
    assert float(loss) == pytest.approx((0.4740770 + 3.5297504) / 2 + 0.9, abs=1e-6)
    assert float(stats["accuracy"]) == 0.5 and float(stats["margin"]) == -1.0


# ---------------------------------------------------------------- a reward run
def reward_config(tiny_model_dir, tmp_path: Path, out: Path, **overrides) -> RewardTrainingConfig:
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():
        write_addition_pairs(pairs, 40)
    # 30 training pairs, 4 per batch, 2 batches per step: 8 batches, 4 optimizer steps per epoch
    values = {
        "model_name_or_path": str(tiny_model_dir), "dataset_name": str(pairs), "eval_fraction": 0.25,
        "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "lr_scheduler_type": "linear",
        "warmup_steps": 1, "max_steps": 6, "save_steps": 3, "logging_steps": 2, "eval_steps": 2, "max_length": 16,
        "progress_bar": False, "output_dir": str(out), **overrides,
    }
    config = RewardTrainingConfig()
    config.set_values(values)
    return config


def test_resumed_reward_run_ends_where_an_uninterrupted_one_ends(tiny_model_dir, tmp_path, monkeypatch,
                                                                 fresh_accelerate_state):
    """Crash right after checkpoint-3 (mid-epoch), resume: the same weights and metrics rows, bit for bit
    (dropout is on, so the RNG states come back too; steps 4-6 cross into the second epoch)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_reward_model(reward_config(tiny_model_dir, tmp_path, straight))
    reset_accelerate_state()

    save = RewardTrainer.save_checkpoint

    def save_then_crash(self):
        path = save(self)
        if self.step == 3:
            raise KeyboardInterrupt("killed after checkpoint-3")
        return path

    monkeypatch.setattr(RewardTrainer, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(reward_config(tiny_model_dir, tmp_path, resumed))
    monkeypatch.undo()
    reset_accelerate_state()
    assert [p.name for p in checkpoint.list_checkpoints(resumed)] == ["checkpoint-3"]
    with pytest.raises(ConfigError, match="already holds a run.*resume_from_checkpoint: latest"):
        RewardTrainer(reward_config(tiny_model_dir, tmp_path, resumed))
    reset_accelerate_state()

    final = train_reward_model(reward_config(tiny_model_dir, tmp_path, resumed, resume_from_checkpoint="latest"))
    rows = read_jsonl(resumed / "metrics.jsonl")
    assert rows == read_jsonl(straight / "metrics.jsonl")
    assert [row["step"] for row in rows] == [2, 3, 4, 6]  # every logging_steps, and at each checkpoint
    assert final["step"] == 6 and "eval/accuracy" in final
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.read_state(resumed / "checkpoint-6") == {"step": 6}


def test_reward_run_refuses_a_folder_holding_another_run(tiny_model_dir, tmp_path, fresh_accelerate_state):
    out = tmp_path / "rm"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 0.5}) + "\n")
    (out / "model.safetensors").write_text("an earlier run's model")
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl \(1 rows\)\).*overwrite_output_dir"):
        RewardTrainer(reward_config(tiny_model_dir, tmp_path, out))
    with pytest.raises(ConfigError, match="latest found no checkpoint"):
        RewardTrainer(reward_config(tiny_model_dir, tmp_path, out, resume_from_checkpoint="latest"))
    assert (out / "model.safetensors").read_text() == "an earlier run's model"  # nothing was touched

    # overwrite_output_dir removes what llm_rl wrote, and the new run starts from an empty metrics.jsonl
    (out / "notes.txt").write_text("mine")
    train_reward_model(reward_config(tiny_model_dir, tmp_path, out, overwrite_output_dir=True, max_steps=2))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [2] and (out / "notes.txt").read_text() == "mine"
    assert yaml.safe_load((out / "reward_config.yaml").read_text())["overwrite_output_dir"] is True


# ---------------------------------------------------------------- FSDP and DeepSpeed need GPUs
FSDP_LINE = ("FSDP needs GPUs: accelerate's FSDP cannot run on CPU (sync_module_states is not supported on cpu, "
             "and without it accelerate falls back to DDP); use accelerate_configs/cpu.yaml (DDP over gloo, "
             "--num_processes N) on this machine")
DEEPSPEED_LINE = ("DeepSpeed needs GPUs: llm_rl runs accelerate's DeepSpeed engine on GPUs only (not tried on CPU); "
                  "use accelerate_configs/cpu.yaml (DDP over gloo, --num_processes N) on this machine")


@pytest.mark.parametrize("env, distributed_type, has_gpu, expected", [
    ({"ACCELERATE_USE_FSDP": "true"}, None, False, FSDP_LINE),  # what `accelerate launch` with fsdp.yaml sets
    ({"ACCELERATE_USE_FSDP": "true"}, "MULTI_CPU", False, FSDP_LINE),  # fsdp_sync_module_states false: DDP
    ({}, "FSDP", False, FSDP_LINE),  # an Accelerator built in code
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, None, False, DEEPSPEED_LINE),
    ({}, "DEEPSPEED", False, DEEPSPEED_LINE),
    ({"ACCELERATE_USE_FSDP": "true"}, None, True, None),  # on GPUs: accelerate's business
    ({"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_CPU": "true"}, "MULTI_CPU", False, None),  # cpu.yaml
    ({}, None, False, None),
])
def test_fsdp_and_deepspeed_without_a_gpu_are_refused_in_one_line(env, distributed_type, has_gpu, expected):
    from accelerate.utils import DistributedType

    from llm_rl.training.run import sharding_refusal

    kind = DistributedType(distributed_type) if distributed_type else None
    assert sharding_refusal(env, kind, has_gpu) == expected


@pytest.mark.skipif(torch.accelerator.is_available(), reason="FSDP is allowed on GPUs")
def test_a_reward_run_under_fsdp_on_the_cpu_stops_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch,
                                                                          fresh_accelerate_state):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as raised:
        RewardTrainer(reward_config(tiny_model_dir, tmp_path, out))
    assert str(raised.value) == FSDP_LINE
    assert not out.exists()
