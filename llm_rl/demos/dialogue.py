"""`llm-rl demo --task dialogue`: a far-sighted and a myopic chatbot from the same start, on a CPU.

    warm start (asks or apologises half the time) -> PPO with gamma 0.9 -> PPO with gamma 0 -> compare

The scripted user and its rewards are in llm_rl/tasks/dialogue.py. Both PPO runs use the turn discount
(gamma once per bot turn), lam = 1 and no KL penalty, so the value head's targets are the sampled
discounted returns of the environment's rewards alone; the seed is the same. After training, the value head's V at the first bot token is compared with
the exact expected discounted return of the trained policy, computed by walking the tree of its replies
(`dialogue.exact_return`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed

from llm_rl.config.sections import Config
from llm_rl.demos.options import DIALOGUE_CONFIG, DialogueOptions
from llm_rl.tasks import arithmetic, dialogue
from llm_rl.training.callbacks import Evaluate

GAMMAS = (0.9, 0.0)


def ppo_config(options: DialogueOptions, gamma: float, warm_dir: Path, data_file: Path, out_dir: Path,
               overrides: Optional[list[str]] = None) -> Config:
    """The recipe (llm_rl/tasks/dialogue_ppo.yaml) with the command line's overrides, then this run's model,
    rows, gamma, seed and folder."""
    config = Config.from_yaml(DIALOGUE_CONFIG, overrides)
    config.set_values({"model_name_or_path": str(warm_dir), "dataset_name": str(data_file), "gamma": gamma,
                   "seed": options.seed, "output_dir": str(out_dir), "overwrite_output_dir": options.overwrite,
                   "progress_bar": False})
    if options.max_updates is not None:
        config.set_values({"max_updates": options.max_updates})
    return config


@torch.no_grad()
def value_vs_exact(policy, tokenizer, rows: list[dict], gamma: float) -> dict:
    """Mean over held-out rows of V at the first bot token and of the exact expected discounted return."""
    values, exact, dropped = [], [], 0.0
    for row in rows:
        prompt = tokenizer(dialogue.DebugUser().reset(row)).input_ids
        ids = torch.tensor([prompt + [tokenizer.eos_token_id]])
        _, v = policy(ids, torch.ones_like(ids), response_start=len(prompt))
        values.append(float(v[0, 0]))
        e, d = dialogue.exact_return(policy.pretrained_model, tokenizer, row, gamma)
        exact.append(e)
        dropped = max(dropped, d)
    v, e = sum(values) / len(rows), sum(exact) / len(rows)
    return {"value": v, "exact_return": e, "relative_error": abs(v - e) / max(abs(e), 1e-8),
            "max_row_relative_error": max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(values, exact)),
            "pruned_mass": dropped}


def run_dialogue_demo(options: DialogueOptions, overrides: Optional[list[str]] = None) -> dict:
    from llm_rl.demos.addition import quiet_libraries
    from llm_rl.training.pipeline import run_ppo

    quiet_libraries()
    start = time.perf_counter()
    out_dir = Path(options.output_dir)
    warm_dir, data_file = out_dir / "warm_start", out_dir / "data" / "train.jsonl"
    train, heldout = dialogue.make_rows(options.seed)
    heldout = heldout[: options.num_heldout]
    if (out_dir / "summary.json").exists() and not options.overwrite:
        raise SystemExit(f"{out_dir} already holds a run; pass --overwrite or another --output_dir")

    # 1. warm start: ask or apologise half the time each, and fix when given a trace
    set_seed(options.seed)
    tokenizer = dialogue.build_tokenizer()
    lm = arithmetic.build_model(tokenizer, n_layer=2, n_embd=64, n_head=2, n_positions=32)
    print(f"[demo] warm start: {options.warm_start_steps} supervised steps on transcripts that ask or apologise")
    dialogue.supervised_warm_start(lm, tokenizer, train, steps=options.warm_start_steps, seed=options.seed)
    lm.save_pretrained(warm_dir)
    tokenizer.save_pretrained(warm_dir)
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_text("".join(json.dumps(row) + "\n" for row in train))
    if options.prepare_only:
        print(f"[demo] warm-started policy in {warm_dir}, episode rows in {data_file}")
        return {}
    before = {"greedy": dialogue.behaviour(lm, tokenizer, heldout, greedy=True),
              "sampled": dialogue.behaviour(lm, tokenizer, heldout * 10, greedy=False)}
    print(f"[demo] before PPO: sampled ask {before['sampled']['ask_rate']:.2f} / apologise "
          f"{before['sampled']['polite_rate']:.2f}, fix after a trace {before['sampled']['fix_rate']:.2f}")

    # 2. the same start, trained far-sighted (gamma 0.9) and myopic (gamma 0)
    runs, curves = {}, {}
    for gamma in GAMMAS:
        run_dir = out_dir / f"gamma_{gamma}"
        config = ppo_config(options, gamma, warm_dir, data_file, run_dir, overrides)

        def held_out(trainer, gamma=gamma) -> dict:
            lm = trainer.accelerator.unwrap_model(trainer.model).pretrained_model
            sampled = dialogue.behaviour(lm, tokenizer, heldout * 5, greedy=False, gamma=gamma)
            return {**dialogue.behaviour(lm, tokenizer, heldout, greedy=True, gamma=gamma),
                    "sampled_ask_rate": sampled["ask_rate"], "sampled_return": sampled["return"]}

        trainer, history = run_ppo(config, callbacks=[Evaluate(held_out)])
        policy = trainer.accelerator.unwrap_model(trainer.model).eval()
        after = {"greedy": dialogue.behaviour(policy.pretrained_model, tokenizer, heldout, greedy=True, gamma=gamma),
                 "sampled": dialogue.behaviour(policy.pretrained_model, tokenizer, heldout * 10, greedy=False,
                                               gamma=gamma)}
        runs[str(gamma)] = {"after": after, "value": value_vs_exact(policy, tokenizer, heldout, gamma),
                            "updates": trainer.update}
        curves[gamma] = [(row["update"], row["eval/ask_rate"], row["eval/sampled_ask_rate"]) for row in history
                         if "eval/ask_rate" in row]
        print(f"[demo] gamma {gamma}: greedy ask {after['greedy']['ask_rate']:.2f} / apologise "
              f"{after['greedy']['polite_rate']:.2f}; V(first bot token) {runs[str(gamma)]['value']['value']:.3f} vs "
              f"exact return {runs[str(gamma)]['value']['exact_return']:.3f}")

    summary = {"before": before, "runs": runs, "seed": options.seed, "seconds": time.perf_counter() - start}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(curves, before, runs, out_dir / "dialogue.png")
    print(f"[demo] {summary['seconds']:.0f}s; summary.json and dialogue.png in {out_dir}")
    return summary


def plot(curves: dict, before: dict, runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for (gamma, points), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        updates = [0] + [u for u, _, _ in points]
        left.plot(updates, [before["greedy"]["ask_rate"]] + [g for _, g, _ in points], marker="o", color=color,
                  label=f"gamma {gamma}, greedy")
        left.plot(updates, [before["sampled"]["ask_rate"]] + [s for _, _, s in points], linestyle="--",
                  color=color, label=f"gamma {gamma}, sampled")
    left.set(xlabel="PPO update", ylabel="held-out episodes that ask for the trace", ylim=(-0.05, 1.05))
    left.legend()
    labels = [f"gamma {g}" for g in runs]
    x = range(len(labels))
    right.bar([i - 0.2 for i in x], [r["value"]["value"] for r in runs.values()], width=0.4, label="V(first bot token)")
    right.bar([i + 0.2 for i in x], [r["value"]["exact_return"] for r in runs.values()], width=0.4,
              label="exact expected return")
    right.set_xticks(list(x), labels)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
