"""The block every PPO run prints at its start: what it runs on and what it is about to do."""

from __future__ import annotations

import pytest
from conftest import ppo_config, write_jsonl, write_sevens_reward

from llm_rl.training.pipeline import run_ppo

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_the_summary_is_printed_once_with_the_runs_values(tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{a}+{a}="} for a in range(6)])
    out = tmp_path / "run"
    config = ppo_config(tiny_model_dir, prompts, out, reward_funcs=[write_sevens_reward(tmp_path)], batch_size=2,
                        num_generations=2, advantage_estimator="grpo", max_new_tokens=3, max_updates=1,
                        use_peft=True, lora_r=4, lora_target_modules=["c_attn"])
    run_ppo(config)
    printed = capsys.readouterr().out
    assert printed.count("[llm_rl] ppo:") == 1
    block = printed[printed.index("[llm_rl] ppo:"):].splitlines()[:6]
    assert block == [
        "[llm_rl] ppo: 1 process (NO), device cpu, dtype float32, mixed precision no",
        f"  model: {tiny_model_dir} (LoRA r=4)",
        "  prompts: 6; 2 per process per update, 2 completions each",
        "  updates: 1",
        f"  output_dir: {out}",
        "  rollout engine: hf",
    ]
