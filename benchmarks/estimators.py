"""Advantage estimators compared on the built-in addition task, for the same wall-clock budget.

    python benchmarks/estimators.py --budget_seconds 90 --seeds 0 1 --output_dir outputs/estimators

For each seed: one supervised warm start (shared by every estimator, so all start from the
same policy), then PPO with each estimator until the training time budget runs out
(evaluation time excluded), then held-out evaluation. `prefix_diff` needs a reward model
on the policy's tokenizer: a small one is trained here on addition preference pairs
(correct vs wrong sums), unless `--reward_model PATH` gives one. Writes `results.json`,
`results.md` (the table) and `reward_vs_time.png` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from llm_rl.config.variants import ADVANTAGE_ESTIMATORS

ESTIMATORS = list(ADVANTAGE_ESTIMATORS)

# What differs between estimators; everything else comes from llm_rl/tasks/addition_ppo.yaml.
# Group estimators see 64 prompts x 4 completions = 256 rows, as many as the others' 256 prompts.
OVERRIDES = {
    "gae": {},
    "grpo": {"advantage_estimator": "grpo", "batch_size": 64, "num_generations": 4},
    "rloo": {"advantage_estimator": "rloo", "batch_size": 64, "num_generations": 4},
    "reinforce_pp": {"advantage_estimator": "reinforce_pp"},
    "prefix_diff": {"advantage_estimator": "prefix_diff"},
}


def train_addition_reward_model(output_dir: Path, tokenizer_dir: Path, train, heldout, seed: int) -> Path:
    """A 2-layer GPT-2 classifier on the task tokenizer, trained on preference pairs (correct vs wrong
    sums) built from this seed's training problems only, evaluated on pairs of its held-out problems."""
    import datasets

    from llm_rl.config.reward_training import RewardTrainingConfig
    from llm_rl.tasks import addition_preferences, arithmetic
    from llm_rl.training.reward_trainer import train_reward_model

    rm_dir = output_dir / "reward_model"
    if not (rm_dir / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(seed)
        base = output_dir / "rm_base"
        arithmetic.build_model(tokenizer, n_layer=2, n_embd=128, n_head=4).save_pretrained(base)
        tokenizer.save_pretrained(base)
        files = {}
        for name, problems in (("train", train), ("test", heldout)):
            files[name] = output_dir / f"pairs_{name}.jsonl"
            pairs = addition_preferences.make_pairs(problems, 1, seed=seed + (name == "test"))
            datasets.Dataset.from_list(pairs).to_json(str(files[name]))
        config = RewardTrainingConfig(
            model_name_or_path=str(base), dataset_name=str(files["train"]), eval_split=str(files["test"]),
            output_dir=str(rm_dir), learning_rate=1e-3, batch_size=64, max_steps=400, eval_steps=400, seed=seed,
            overwrite_output_dir=True,
        )
        metrics = train_reward_model(config)
        print(f"[estimators] reward model: held-out pairwise accuracy {metrics['eval/accuracy']:.3f}", flush=True)
    return rm_dir


def run_one(estimator: str, seed: int, warm_dir: Path, data_file: Path, heldout, out_dir: Path,
            budget: float, reward_model: Path | None) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from llm_rl.config.sections import Config
    from llm_rl.data.prompts import load_prompts
    from llm_rl.demos.addition import DEMO_CONFIG, evaluate
    from llm_rl.models.loading import load_policy, load_tokenizer
    from llm_rl.rewards.loading import load_rewards
    from llm_rl.training.callbacks import Evaluate
    from llm_rl.training.ppo_trainer import PPOTrainer

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    config = Config.from_yaml(DEMO_CONFIG)
    values = {"model_name_or_path": str(warm_dir), "dataset_name": str(data_file), "seed": seed,
              "output_dir": str(out_dir), "overwrite_output_dir": True, "max_seconds": budget,
              "max_updates": 100_000, "progress_bar": False, "logging_steps": 10_000, "eval_steps": 10,
              **OVERRIDES[estimator]}
    if estimator == "prefix_diff":
        values.update({"reward_model_name_or_path": str(reward_model), "reward_funcs": []})
    config.set_values(values)
    config.validate()
    accelerator = Accelerator()
    tokenizer = load_tokenizer(str(warm_dir))
    def held_out(trainer):  # ground-truth exact match, whatever reward the estimator trains on
        return evaluate(trainer.accelerator.unwrap_model(trainer.model), trainer.reference, tokenizer, heldout,
                        config.sampling.temperature)

    trainer = PPOTrainer(config, load_policy(config, tokenizer), tokenizer, load_prompts(config, tokenizer),
                         load_rewards(config), accelerator=accelerator, callbacks=[Evaluate(held_out)])
    start = time.perf_counter()
    history = trainer.train()
    final = held_out(trainer)
    return {
        "estimator": estimator, "seed": seed, "accuracy": final["accuracy"], "reward": final["reward"],
        "kl": final["kl"], "updates": trainer.update, "train_seconds": history[-1]["time/elapsed"],
        "wall_seconds": time.perf_counter() - start,
        "curve": [(r["time/elapsed"], r["eval/reward"]) for r in history if "eval/reward" in r],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget_seconds", type=float, default=90.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--estimators", nargs="+", default=ESTIMATORS, choices=ESTIMATORS)
    parser.add_argument("--output_dir", default="outputs/estimators")
    parser.add_argument("--reward_model", default=None, help="reward model folder for prefix_diff")
    parser.add_argument("--warm_start_steps", type=int, default=600)
    args = parser.parse_args(argv)

    from llm_rl.demos.addition import build_warm_start, evaluate, quiet_libraries
    from llm_rl.models.value_head import CausalLMWithValueHead
    from llm_rl.tasks import arithmetic

    quiet_libraries()
    out = Path(args.output_dir)
    rows = []
    for seed in args.seeds:
        seed_dir = out / f"seed{seed}"
        train, heldout = arithmetic.make_splits(2, 10**4 - 500, 500, seed=seed)
        warm_dir, data_file = seed_dir / "warm_start", arithmetic.write_jsonl(train, seed_dir / "train.jsonl")
        build_warm_start(train, args.warm_start_steps, seed, warm_dir)
        from llm_rl.models.loading import load_tokenizer

        start_policy = CausalLMWithValueHead.from_pretrained(str(warm_dir), value_head=False)
        before = evaluate(start_policy, start_policy, load_tokenizer(str(warm_dir)), heldout)
        print(f"[estimators] seed {seed} warm start: accuracy {before['accuracy']:.3f} reward {before['reward']:.3f}")
        reward_model = Path(args.reward_model) if args.reward_model else None
        if "prefix_diff" in args.estimators and reward_model is None:
            reward_model = train_addition_reward_model(seed_dir, warm_dir, train, heldout, seed)
        for estimator in args.estimators:
            row = run_one(estimator, seed, warm_dir, data_file, heldout, seed_dir / estimator,
                          args.budget_seconds, reward_model)
            row["accuracy_before"] = before["accuracy"]
            rows.append(row)
            print(f"[estimators] seed {seed} {estimator:>12}: accuracy {row['accuracy_before']:.3f} -> "
                  f"{row['accuracy']:.3f}, reward {row['reward']:.3f}, KL {row['kl']:.3f}, "
                  f"{row['updates']} updates in {row['train_seconds']:.0f}s", flush=True)
    table = summarize(rows, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(table + "\n")
    plot(rows, out / "reward_vs_time.png")
    print(table)
    return 0


def summarize(rows: list[dict], args) -> str:
    lines = [f"Budget {args.budget_seconds:.0f} s of training per run, seeds {args.seeds}; held-out exact match "
             "(greedy), mean ground-truth reward and KL to the reference (sampled), means over seeds.", "",
             "| estimator | accuracy before | accuracy after | reward after | KL after | updates | train s |",
             "|---|---|---|---|---|---|---|"]
    for estimator in dict.fromkeys(r["estimator"] for r in rows):
        rs = [r for r in rows if r["estimator"] == estimator]

        def mean(key, rs=rs):
            return statistics.mean(r[key] for r in rs)

        lines.append(f"| {estimator} | {mean('accuracy_before'):.3f} | {mean('accuracy'):.3f} | {mean('reward'):.3f} | "
                     f"{mean('kl'):.3f} | {mean('updates'):.0f} | {mean('train_seconds'):.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, estimator in enumerate(dict.fromkeys(r["estimator"] for r in rows)):
        for j, r in enumerate(r for r in rows if r["estimator"] == estimator):
            if r["curve"]:
                t, v = zip(*r["curve"])
                ax.plot(t, v, color=f"C{i}", alpha=0.9 if j == 0 else 0.5, label=estimator if j == 0 else None)
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("held-out mean reward (sampled)")
    ax.set_title("addition: reward vs wall-clock per estimator", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
