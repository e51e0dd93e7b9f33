"""A loss that blows up stops the run with a clear message and leaves the last checkpoint loadable."""

from __future__ import annotations

import pytest
import torch
from conftest import addition_prompts, ppo_config
from safetensors.torch import load_file

from llm_rl.training import checkpoint
from llm_rl.training.pipeline import run_ppo

EXPLODING = '''
CALLS = [0]

def explodes_on_second_update(prompts, completions, **_):
    CALLS[0] += 1
    # finite, so it passes reward validation, but its square overflows float32 in the value loss
    return [0.5] * len(completions) if CALLS[0] == 1 else [3e38] * len(completions)
'''


def test_overflowing_loss_stops_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path):
    (tmp_path / "boom.py").write_text(EXPLODING)
    out = tmp_path / "out"
    config = ppo_config(tiny_model_dir, addition_prompts(tmp_path), out, **{
        "reward_funcs": [f"{tmp_path / 'boom.py'}:explodes_on_second_update"], "batch_size": 4,
        "max_new_tokens": 3, "max_updates": 3, "save_steps": 1,
    })
    with pytest.raises(FloatingPointError, match=r"update 2: the (loss|gradient norm) is (inf|nan)"):
        run_ppo(config)
    # the checkpoint of update 1 is complete and its weights are finite; nothing of update 2 was saved
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]
    assert not list(out.glob(".tmp-*"))
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert checkpoint.read_state(out / "checkpoint-1")["update"] == 1
