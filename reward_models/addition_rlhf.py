"""RLHF end to end on the built-in addition task: a learned reward model, PPO against it, ground truth.

    python reward_models/addition_rlhf.py --output_dir outputs/addition_rlhf

Four steps, each through the normal entry points (each is skipped when its output already exists):
  1. warm-started policy and prompts, as `llm-rl demo --prepare_only --output_dir OUT/demo`
  2. reward model from preference pairs, as
     `llm-rl reward train --config reward_models/configs/addition_rm.yaml` (starting from the policy)
  3. PPO against that reward model only, as `llm-rl ppo --config reward_models/configs/addition_ppo_rm.yaml`
  4. the exact-match ground truth, which PPO never sees, on the 500 held-out problems before and after
     (`llm_rl.demos.addition.evaluate`), plus the kinds of mistakes the policy makes and how the RM ranks each kind.
Everything lands in OUT/summary.json. Options: --seed, --rm_steps, --max_updates (see --help).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from llm_rl.tasks import addition_preferences, arithmetic
from llm_rl.training.callbacks import Evaluate

REPO = Path(__file__).resolve().parents[1]
RM_CONFIG = REPO / "reward_models" / "configs" / "addition_rm.yaml"
PPO_CONFIG = REPO / "reward_models" / "configs" / "addition_ppo_rm.yaml"


def prepare_policy(out: Path, seed: int) -> Path:
    from llm_rl.demos.addition import DemoOptions, run_demo

    if not (out / "demo" / "warm_start" / "model.safetensors").is_file():
        run_demo(DemoOptions(output_dir=str(out / "demo"), seed=seed, prepare_only=True, overwrite=True))
    return out / "demo" / "warm_start"


def train_rm(out: Path, warm_start: Path, seed: int, steps: int | None) -> Path:
    from llm_rl.config.reward_training import RewardTrainingConfig
    from llm_rl.training.reward_trainer import train_reward_model

    rm_dir = out / "reward_model"
    if not (rm_dir / "eval_results.json").is_file():
        overrides = ["--model_name_or_path", str(warm_start), "--output_dir", str(rm_dir), "--seed", str(seed),
                     "--overwrite_output_dir", "true", "--progress_bar", "false"]
        if steps is not None:
            overrides += ["--max_steps", str(steps)]
        train_reward_model(RewardTrainingConfig.from_yaml(RM_CONFIG, overrides))
    return rm_dir


def rm_accuracy_by_mistake(rm_dir: Path) -> dict:
    """Held-out pairwise accuracy of the reward model, overall and per kind of rejected answer."""
    from llm_rl.rewards.model import RewardModel

    reward = RewardModel.from_pretrained(str(rm_dir))
    pairs = addition_preferences.load_splits()["test"]
    chosen = reward(pairs["prompt"], pairs["chosen"])
    rejected = reward(pairs["prompt"], pairs["rejected"])
    right = [c > r for c, r in zip(chosen, rejected)]
    out = {"all": sum(right) / len(right)}
    for kind in addition_preferences.MISTAKES:
        rows = [ok for ok, k in zip(right, pairs["mistake"]) if k == kind]
        out[kind] = sum(rows) / len(rows)
    return out


@torch.no_grad()
def mistakes_of(policy, tokenizer, problems) -> dict:
    """Greedy answers sorted into: correct, off by one, off by 10^k (carry-like), other, not a number."""
    texts, _ = arithmetic.complete(policy.pretrained_model, tokenizer, problems, greedy=True)
    kinds = Counter()
    for problem, text in zip(problems, texts):
        total = problem.a + problem.b
        if not text.isdigit():
            kinds["not a number"] += 1
        elif int(text) == total:
            kinds["correct"] += 1
        elif abs(int(text) - total) == 1:
            kinds["off_by_one"] += 1
        elif abs(int(text) - total) in (10, 100, 1000):
            kinds["off_by_10^k"] += 1
        else:
            kinds["other"] += 1
    return {k: v / len(problems) for k, v in sorted(kinds.items())}


def run_ppo_against_rm(out: Path, warm_start: Path, rm_dir: Path, seed: int, max_updates: int | None) -> dict:
    from llm_rl.config.sections import Config
    from llm_rl.demos.addition import evaluate, quiet_libraries
    from llm_rl.models.loading import load_policy, load_tokenizer
    from llm_rl.models.value_head import CausalLMWithValueHead
    from llm_rl.training.pipeline import run_ppo

    quiet_libraries()
    overrides = ["--model_name_or_path", str(warm_start), "--dataset_name", str(out / "demo" / "data" / "train.jsonl"),
                 "--reward_model_name_or_path", str(rm_dir), "--output_dir", str(out / "ppo"), "--seed", str(seed),
                 "--overwrite_output_dir", "true", "--progress_bar", "false"]
    if max_updates is not None:
        overrides += ["--max_updates", str(max_updates)]
    config = Config.from_yaml(PPO_CONFIG, overrides)
    _, heldout = arithmetic.make_splits(2, 10**4 - 500, 500, seed=seed)  # the demo's held-out problems

    tokenizer = load_tokenizer(str(warm_start))
    policy = load_policy(config, tokenizer)
    reference = CausalLMWithValueHead.from_pretrained(str(warm_start), value_head=False)
    before = evaluate(policy, reference, tokenizer, heldout, config.sampling.temperature)
    before["mistakes"] = mistakes_of(policy, tokenizer, heldout)
    print(f"[rlhf] before PPO: {before}")

    def held_out(trainer) -> dict:
        model = trainer.accelerator.unwrap_model(trainer.model)
        return evaluate(model, trainer.ref_model, tokenizer, heldout, config.sampling.temperature)

    start = time.perf_counter()
    trainer, history = run_ppo(config, callbacks=[Evaluate(held_out)])
    policy = trainer.accelerator.unwrap_model(trainer.model)
    after = held_out(trainer)
    after["mistakes"] = mistakes_of(policy, tokenizer, heldout)
    print(f"[rlhf] after PPO: {after}")
    return {
        "before": before,
        "after": after,
        "rm_score_first_update": history[0].get("score/mean"),
        "rm_score_last_update": history[-1].get("score/mean"),
        "updates": len(history),
        "seconds_ppo": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/addition_rlhf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rm_steps", type=int, default=None, help="reward-model optimizer steps (default: the config's)")
    parser.add_argument("--max_updates", type=int, default=None, help="PPO updates (default: the config's)")
    args = parser.parse_args()
    out = Path(args.output_dir)
    start = time.perf_counter()
    warm_start = prepare_policy(out, args.seed)
    rm_dir = train_rm(out, warm_start, args.seed, args.rm_steps)
    rm = rm_accuracy_by_mistake(rm_dir)
    print(f"[rlhf] reward model held-out pairwise accuracy: {rm}")
    ppo = run_ppo_against_rm(out, warm_start, rm_dir, args.seed, args.max_updates)
    summary = {"reward_model_heldout_accuracy": rm, **ppo, "seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    b, a = ppo["before"], ppo["after"]
    print(f"{'':34}{'before':>10}{'after':>10}")
    print(f"{'held-out exact match (greedy)':34}{b['accuracy']:>10.3f}{a['accuracy']:>10.3f}")
    print(f"{'exact match (sampled, T=1)':34}{b['reward']:>10.3f}{a['reward']:>10.3f}")
    print(f"{'KL to reference (per sequence)':34}{b['kl']:>10.3f}{a['kl']:>10.3f}")
    print(f"[rlhf] summary in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
