"""`llm-rl grpo` end to end: a config written in TRL GRPOConfig's names only runs unchanged, in its own process."""

from __future__ import annotations

import math

import pytest
import yaml
from conftest import addition_prompts, explain, read_jsonl, run_cli, write_sevens_reward


@pytest.mark.parametrize("trl_values", [
    {},  # TRL's defaults: dapo, beta 0 (no reference), scale_rewards group
    {"beta": 0.04, "loss_type": "bnpo", "epsilon_high": 0.28, "scale_rewards": "batch",
     "mask_truncated_completions": True, "num_iterations": 2},
    {"loss_type": "dr_grpo", "scale_rewards": False, "steps_per_generation": 4},
], ids=["defaults", "kl-bnpo-masked", "dr_grpo"])
def test_a_grpo_config_in_trls_names_runs_unchanged(tmp_path, tiny_model_dir, trl_values):
    out = tmp_path / "out"
    config = {
        "model_name_or_path": str(tiny_model_dir), "dataset_name": str(addition_prompts(tmp_path)),
        "reward_funcs": [write_sevens_reward(tmp_path)], "output_dir": str(out), "seed": 0,
        "num_generations": 4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
        "max_completion_length": 4, "learning_rate": 1e-3, "disable_tqdm": True, **trl_values,
    }
    steps_per_update = (config.get("steps_per_generation", 2) // 2) * config.get("num_iterations", 1)
    config["max_steps"] = 2 * steps_per_update  # two updates
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = run_cli(["grpo", "--config", str(path)], tmp_path)
    assert proc.returncode == 0, explain(proc)

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["update"] for r in rows] == [1, 2] and all(math.isfinite(v) for r in rows for v in r.values())
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["ppo"]["advantage_estimator"] == "grpo" and not (out / "value_head.safetensors").exists()
    assert saved["ppo"]["kl_coef"] == config.get("beta", 0.0)
    assert ("kl/per_sequence" in rows[0]) == ("beta" in trl_values)  # beta 0: no reference model is run
    description = (out / "README.md").read_text().split("## Training configuration")[0]
    assert ("KL" in description) == ("beta" in trl_values)
    assert "[llm_rl] ppo: 1 process" in proc.stdout
