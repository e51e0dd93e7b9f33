"""A YAML written only in TRL's GRPOConfig names runs unchanged through `llm-rl grpo`."""

import yaml
from conftest import read_jsonl, run_cli, write_jsonl


def test_a_grpoconfig_yaml_runs_unchanged(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{a}+{b}=", "solution": str(a + b)}
                                                        for a in (1, 23, 456) for b in (7, 89)])
    (tmp_path / "rewards.py").write_text(
        "def ends_with_solution(completions, solution, **kwargs):\n"
        "    return [float(c.strip().endswith(s)) for c, s in zip(completions, solution)]\n\n"
        "def short(completion_ids, **kwargs):\n"
        "    return [-0.1 * len(ids) for ids in completion_ids]\n")
    config = {  # TRL's names only: GRPOConfig fields and the script's model / dataset / reward arguments
        "model_name_or_path": str(tiny_model_dir), "dataset_name": str(prompts),
        "reward_funcs": [f"{tmp_path / 'rewards.py'}:ends_with_solution", f"{tmp_path / 'rewards.py'}:short"],
        "reward_weights": [1.0, 0.5], "output_dir": str(tmp_path / "out"), "seed": 0,
        "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 4, "max_steps": 2,
        "learning_rate": 1e-3, "beta": 0.04, "epsilon_high": 0.28, "loss_type": "dr_grpo", "scale_rewards": "batch",
        "mask_truncated_completions": True, "logging_steps": 1, "save_steps": 2, "lr_scheduler_type": "constant",
        "bf16": False, "report_to": "none",
    }
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(config))
    proc = run_cli(["grpo", "--config", str(tmp_path / "grpo.yaml")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["update"] for r in rows] == [1, 2]
    assert all("reward/ends_with_solution" in r and "reward/short" in r for r in rows)
    assert rows[0]["response/length"] == 4.0 and rows[0]["response/eos_rate"] == 0.0  # no EOS in 4 tokens: all cut
    assert rows[0]["response/tokens"] == 0.0  # mask_truncated_completions: none of them is trained on
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "value_head.safetensors").exists()  # critic-free
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    flat = {k: v for section in saved.values() if isinstance(section, dict) for k, v in section.items()}
    assert flat["loss_agg"] == "token_sum_fixed" and flat["advantage_scale"] == "batch"
    assert flat["kl_coef"] == 0.04 and flat["clip_range_high"] == 0.28 and flat["mask_truncated_completions"] is True
