"""`llm-rl demo`: PPO teaches a tiny language model addition, on a CPU, in minutes, offline.

    warm start (supervised, short) -> evaluate -> PPO -> evaluate -> table, summary.json, curves.png

The tokenizer and model are built here, saved to OUTPUT_DIR/warm_start and loaded back
through the same `from_pretrained` path a user's Hub model takes; the prompts are
written to OUTPUT_DIR/data/train.jsonl and read through `datasets` like any user file.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed

from llm_rl.algorithms.kl import kl_penalty
from llm_rl.config.errors import ConfigError
from llm_rl.config.variants import default_kl_estimator
from llm_rl.demos.options import DEMO_CONFIG, DemoOptions, demo_config  # noqa: F401 (DEMO_CONFIG: public here)
from llm_rl.models.value_head import CausalLMWithValueHead
from llm_rl.sampling.rollout import logprobs_and_values
from llm_rl.tasks import arithmetic
from llm_rl.training import output_dir as run_dir
from llm_rl.training.callbacks import Evaluate
from llm_rl.training.run import new_accelerator


def build_warm_start(train: Sequence[arithmetic.Problem], max_steps: int, seed: int, folder: Path,
                     target_accuracy: float = 1.0) -> list[float]:
    """Tokenizer + tiny GPT-2, supervised warm start; saved to `folder` (safetensors). Returns the losses."""
    set_seed(seed)
    tokenizer = arithmetic.build_tokenizer()
    lm = arithmetic.build_model(tokenizer)
    losses = arithmetic.supervised_warm_start(lm, tokenizer, train, max_steps, target_accuracy, seed=seed)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return losses


@torch.no_grad()
def evaluate(policy: CausalLMWithValueHead, reference, tokenizer,
             problems: Sequence[arithmetic.Problem], temperature: float = 1.0) -> dict:
    """Held-out exact match and response length (greedy); on sampled responses, mean reward and
    KL to the reference (k1, summed per sequence).

    `reference`: a model, or a callable returning a context manager that yields one (a LoRA
    policy's reference is the policy itself with the adapter disabled, only inside that context).
    """
    reference_context = reference if callable(reference) and not isinstance(reference, torch.nn.Module) else (
        lambda: contextlib.nullcontext(reference))
    answers = [p.answer for p in problems]
    texts, greedy = arithmetic.complete(policy.pretrained_model, tokenizer, problems, greedy=True)
    out = {"accuracy": sum(arithmetic.reward(None, texts, answers)) / len(problems),
           "length": float(greedy.action_mask.sum(1).float().mean())}
    texts, sampled = arithmetic.complete(policy.pretrained_model, tokenizer, problems, greedy=False,
                                         temperature=temperature)
    out["reward"] = sum(arithmetic.reward(None, texts, answers)) / len(problems)
    logprobs, _ = logprobs_and_values(policy, sampled, temperature, chunk_size=len(problems))
    with reference_context() as ref:
        ref_logprobs, _ = logprobs_and_values(ref, sampled, temperature, chunk_size=len(problems), reference=True)
    out["kl"] = float((kl_penalty(logprobs, ref_logprobs, default_kl_estimator("reward")) * sampled.action_mask).sum(1).mean())
    return out


def run_demo(options: DemoOptions, overrides: Optional[list[str]] = None) -> dict:
    from llm_rl.data.prompts import load_prompts
    from llm_rl.models.loading import load_policy, load_tokenizer
    from llm_rl.rewards.loading import load_rewards
    from llm_rl.training.ppo_trainer import PPOTrainer

    quiet_libraries()
    start = time.perf_counter()
    out_dir = Path(options.output_dir)
    config = demo_config(options, overrides)
    accelerator = new_accelerator(gradient_accumulation_steps=config.ppo.gradient_accumulation_steps)
    warm_dir = Path(config.model.model_name_or_path)
    resuming = config.train.resume_from_checkpoint is not None and (warm_dir / "config.json").is_file()

    # 1. warm start on the main process (not again when resuming); the others wait and load the result
    train, heldout = arithmetic.make_splits(options.num_digits, 10 ** (2 * options.num_digits) - options.num_heldout,
                                            options.num_heldout, seed=options.seed)
    if accelerator.is_main_process and not resuming:
        warm_start(options, train, out_dir, Path(config.data.dataset_name))
    accelerator.wait_for_everyone()
    t_warm = time.perf_counter() - start
    if options.prepare_only:
        if accelerator.is_main_process:
            print(f"[demo] warm-started policy in {warm_dir}, prompts in {config.data.dataset_name}")
        return {}

    # 2. load it back like a user's model, and evaluate before RL (once: a resumed run reads it back)
    set_seed(options.seed)
    tokenizer = load_tokenizer(str(warm_dir))
    policy = load_policy(config, tokenizer).to(accelerator.device)
    reference = CausalLMWithValueHead.from_pretrained(str(warm_dir), value_head=False).to(accelerator.device)
    before = evaluate_once(out_dir / "eval_before.json", resuming, accelerator.is_main_process,
                           lambda: evaluate(policy, reference, tokenizer, heldout, config.sampling.temperature))

    # 3. PPO against the exact-match reward, held-out accuracy tracked during training
    def held_out(trainer: PPOTrainer) -> dict:
        return evaluate(trainer.accelerator.unwrap_model(trainer.model), trainer.reference, tokenizer, heldout,
                        config.sampling.temperature)

    trainer = PPOTrainer(config, policy, tokenizer, load_prompts(config, tokenizer), load_rewards(config),
                         ref_model=reference, accelerator=accelerator, callbacks=[Evaluate(held_out)])
    history = trainer.train()
    last = history[-1] if history else {}
    after = {k.removeprefix("eval/"): v for k, v in last.items() if k.startswith("eval/")} or held_out(trainer)

    # 4. the before/after table
    seconds = time.perf_counter() - start
    summary = {
        **{f"{key}_{when}": values[key] for key in ("accuracy", "reward", "kl", "length")
           for when, values in (("before", before), ("after", after))},
        "updates": trainer.update, "warm_start_steps": int((out_dir / "warm_start_steps.txt").read_text()),
        "seconds_warm_start": t_warm, "seconds": seconds, "seed": options.seed,
    }
    if accelerator.is_main_process:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(results_table(before, after))
        print(f"[demo] {seconds:.0f}s; policy, summary.json, metrics.jsonl and curves.png in {out_dir}")
    return summary


def warm_start(options: DemoOptions, train: Sequence[arithmetic.Problem], out_dir: Path, data_file: Path) -> None:
    """Main process: the supervised warm start saved to OUTPUT_DIR/warm_start, and the training prompts."""
    if run_dir.completed_work(out_dir) and not options.overwrite:
        raise ConfigError(f"{out_dir} already holds a run; pass --resume_from_checkpoint latest, --overwrite, "
                          "or another --output_dir")
    print(f"[demo] warm start: supervised steps on {options.num_digits}-digit addition until "
          f"{options.warm_start_accuracy:.0%} exact match on training problems (at most {options.warm_start_steps})")
    losses = build_warm_start(train, options.warm_start_steps, options.seed, out_dir / "warm_start",
                              options.warm_start_accuracy)
    (out_dir / "warm_start_steps.txt").write_text(f"{len(losses)}\n")
    arithmetic.write_jsonl(train, data_file)


def evaluate_once(path: Path, resuming: bool, is_main: bool, measure) -> dict:
    """The held-out numbers before RL: read back from `path` when resuming, else measured and written."""
    before = json.loads(path.read_text()) if resuming and path.is_file() else measure()
    if is_main:
        path.write_text(json.dumps(before) + "\n")
        print(f"[demo] before PPO: {fmt(before)}")
    return before


def quiet_libraries() -> None:
    """The demo prints its own progress; silence per-file loading bars of transformers and datasets."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def results_table(before: dict, after: dict) -> str:
    rows = [("held-out exact match (greedy)", "accuracy"), ("mean reward (sampled)", "reward"),
            ("KL to reference (per sequence)", "kl"), ("response length (tokens)", "length")]
    lines = [f"{'':32}{'before':>10}{'after':>10}"]
    lines += [f"{label:32}{before[key]:>10.3f}{after[key]:>10.3f}" for label, key in rows]
    return "\n".join(lines)
