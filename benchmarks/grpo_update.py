#!/usr/bin/env python
"""Seconds per critic-free (GRPO) update of llm_rl against TRL 1.16's GRPOTrainer.

    python benchmarks/grpo_update.py --trl-python /work/venv-trl116/bin/python      # both sides, 6 and 48 tokens
    python benchmarks/grpo_update.py --trl-python ... --threads 1 --rounds 3           # on a shared machine
    python benchmarks/grpo_update.py --sides ours --tokens 6 --updates 2 --warmup 0    # smoke run, no TRL

TRL 1.16 and TRL 1.12 (which `ppo_update.py --compare trl` needs) cannot share one environment, so each
side runs in its own subprocess and TRL's side may run under another interpreter (`--trl-python`, default:
this one); that interpreter needs `pip install trl==1.16.0 psutil` (or `pip install -e .[bench-grpo]`).
Nothing of llm_rl is imported on TRL's side.

Both sides train the same tiny character-level GPT-2 (4 layers x 128, 4 heads, 0.80M parameters) on the same
addition prompts ("357+468="), 32 prompts x 8 completions = 256 completions per update, with the same
Python reward function on the completion text, one epoch over one minibatch, lr 1e-4, no KL. The model
has no logit for EOS (the tokenizer's special tokens lie outside its vocabulary), so every completion is
exactly `max_new_tokens` long on both sides and both train on the same number of tokens.

The last line printed is one JSON object; see benchmarks/README.md for what is measured and every setting.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:  # run as `python benchmarks/grpo_update.py` (script folder on sys.path) or imported as benchmarks.grpo_update
    from benchmarks import ppo_update as shared
except ImportError:
    import ppo_update as shared  # the timing, memory and worker helpers both benchmarks use

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TRL_VERSION = "1.16."
TRL_INSTALL = ("  python -m venv /work/venv-trl116\n"
               "  /work/venv-trl116/bin/pip install torch==2.13.0           # the CPU build\n"
               "  /work/venv-trl116/bin/pip install -e '.[bench-grpo]'      # from the repository root: trl==1.16.0, psutil")

# ---------------------------------------------------------------------------------- what both sides get
CHARS = "0123456789+="  # token ids 0..11; <pad>, <eos>, <unk> get 12, 13, 14 (outside the model's vocabulary)
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
MODEL = dict(n_layer=4, n_embd=128, n_head=4, n_positions=64)
BAR_SHORT, BAR_LONG = 1.5, 1.2  # issue 15: TRL seconds / llm_rl seconds per update (means) at <= 8 and 48 tokens
NUM_PROMPTS = 512  # operands 100..999: every prompt is exactly 8 characters, so no prompt padding on either side

SETTINGS = dict(
    batch_prompts=32, num_generations=8,  # 256 completions per update
    epochs=1, minibatches=1, gradient_accumulation_steps=1,
    learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
    adam_betas=(0.9, 0.999), adam_eps=1e-8, max_grad_norm=1.0,
    clip_range=0.2, kl_coef=0.0, ent_coef=0.0, loss_agg="token_mean (TRL: dapo)",
    advantages="group mean / group std (TRL: scale_rewards group)",
    temperature=1.0, top_k=0, top_p=1.0, dropout="off (llm_rl always; TRL disable_dropout=True)",
    dtype="float32", device="cpu", seed=42, checkpoints="none in the timed updates", logging_steps=10,
)


def char_match(prompts, completions, answer, **_) -> list[float]:
    """Share of the answer's characters the completion has at the same position (dense, in [0, 1])."""
    return [sum(x == y for x, y in zip(c, a)) / max(len(a), len(c), 1) for c, a in zip(completions, answer)]


class Reward:
    """`char_match`, also reading the peak RSS at every call: the same point of every update on both sides
    (after generation, before training), without wrapping any method of either trainer."""

    __name__ = __reward_name__ = "char_match"

    def __init__(self):
        self.peak_mb: list[float] = []

    def __call__(self, prompts, completions, answer, **_):
        self.peak_mb.append(shared.peak_rss_mb())
        return char_match(prompts, completions, answer)


class GcLog:
    """Every garbage collection (start relative to `origin`, seconds, generation), through gc.callbacks."""

    def __init__(self):
        self.origin, self.events, self._t0 = time.perf_counter(), [], 0.0
        gc.callbacks.append(self)

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.events.append((self._t0 - self.origin, time.perf_counter() - self._t0, info["generation"]))

    def per_interval(self, bounds: list[float]) -> list[dict]:
        """gc seconds and gen-2 count in each [bounds[i], bounds[i+1]) (times relative to `origin`)."""
        out = []
        for lo, hi in zip(bounds, bounds[1:]):
            inside = [e for e in self.events if lo <= e[0] < hi]
            out.append({"seconds": sum(e[1] for e in inside), "gen2": sum(e[2] == 2 for e in inside),
                        "gen2_seconds": sum(e[1] for e in inside if e[2] == 2)})
        return out


# ---------------------------------------------------------------------------------- assets
def build_tokenizer():
    """One token per character; the special tokens come after the characters, outside the model's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(CHARS)}
    vocab.update({PAD: len(CHARS), EOS: len(CHARS) + 1, UNK: len(CHARS) + 2})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left")


def build_assets(root: Path, seed: int) -> dict:
    import random

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = GPT2Config(vocab_size=len(CHARS), bos_token_id=None, eos_token_id=None, pad_token_id=None, **MODEL)
    policy = GPT2LMHeadModel(config)
    policy.generation_config.eos_token_id = policy.generation_config.bos_token_id = None
    path = root / "policy"
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    rng = random.Random(seed)
    data = root / "prompts.jsonl"
    with open(data, "w") as f:
        for _ in range(NUM_PROMPTS):
            a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return {"policy": str(path), "data": str(data), "policy_params": sum(p.numel() for p in policy.parameters())}


# ---------------------------------------------------------------------------------- ours
def run_ours(a: argparse.Namespace, assets: dict) -> dict:
    shared.silence()
    import torch
    from accelerate import Accelerator

    from llm_rl.config.sections import Config
    from llm_rl.data.prompts import load_prompts
    from llm_rl.models.loading import load_tokenizer
    from llm_rl.models.value_head import CausalLMWithValueHead
    from llm_rl.training.ppo_trainer import PPOTrainer

    s, total = SETTINGS, a.warmup + a.updates
    config = Config.from_dict({
        "model": {"model_name_or_path": assets["policy"], "torch_dtype": s["dtype"], "gradient_checkpointing": False},
        "data": {"dataset_name": assets["data"], "prompt_column": "prompt", "max_prompt_length": 512},
        "sampling": {"max_new_tokens": a._tokens, "temperature": s["temperature"], "top_k": s["top_k"],
                     "top_p": s["top_p"], "stop_token": None, "missing_eos_penalty": None,
                     "generation_batch_size": None},
        "reward": {"whiten_rewards": False},
        "ppo": {"advantage_estimator": "grpo", "num_generations": s["num_generations"],
                "batch_size": s["batch_prompts"], "ppo_epochs": s["epochs"], "num_mini_batches": s["minibatches"],
                "gradient_accumulation_steps": s["gradient_accumulation_steps"], "learning_rate": s["learning_rate"],
                "lr_scheduler_type": s["lr_scheduler_type"], "warmup_steps": s["warmup_steps"],
                "weight_decay": s["weight_decay"], "max_grad_norm": s["max_grad_norm"], "clip_range": s["clip_range"],
                "ent_coef": s["ent_coef"], "kl_coef": s["kl_coef"], "adaptive_kl": False, "loss_agg": "token_mean"},
        "train": {"output_dir": str(Path(a.workdir) / f"ours_{a._tokens}_{a._round}"), "overwrite_output_dir": True,
                  "seed": s["seed"] + a._round, "max_updates": total, "logging_steps": s["logging_steps"],
                  "save_steps": 0, "eval_steps": 0, "report_to": "none", "progress_bar": False},
    })
    # as pipeline.run_ppo, except the policy: load_policy would grow the embeddings to the tokenizer's 15 tokens,
    # which would make EOS samplable (and responses shorter than max_new_tokens)
    tokenizer = load_tokenizer(assets["policy"])
    policy = CausalLMWithValueHead.from_pretrained(assets["policy"], value_head=False, torch_dtype=s["dtype"])
    reward = Reward()
    trainer = PPOTrainer(config, policy, tokenizer, load_prompts(config, tokenizer), [reward],
                         accelerator=Accelerator(cpu=True, mixed_precision="no"))
    shared.touch(trainer.model, trainer.ref_model)
    rss_setup = shared.rss_now_mb()
    gc_log = GcLog()
    t_start = time.perf_counter()
    history = trainer.train()
    elapsed = [h["time/elapsed"] for h in history]  # since train() began, before this update's log/save
    cycle = [e1 - e0 for e0, e1 in zip([0.0] + elapsed, elapsed)]  # one full loop iteration each
    # the update boundaries on gc_log's clock (train() starts within microseconds of t_start)
    bounds = [t_start - gc_log.origin + e for e in [0.0] + elapsed]
    timed = slice(a.warmup, total)
    hist = history[timed]
    tokens = [int(round(h["response/tokens"])) for h in hist]
    expected = s["batch_prompts"] * s["num_generations"] * a._tokens
    if any(t != expected for t in tokens):
        raise AssertionError(f"ours trained on {tokens} tokens per update, expected {expected}")

    def phase(key):
        return [h.get(key, 0.0) for h in hist]

    return {
        "side": "ours", "seconds": cycle[timed], "inner_seconds": phase("time/update"),
        "phases": {"generate": phase("time/generate"), "reference": phase("time/forward"),
                   "reward": phase("time/reward"), "train": phase("time/train"),
                   "rest": [c - h["time/generate"] - h["time/forward"] - h["time/reward"] - h["time/train"]
                            for c, h in zip(cycle[timed], hist)]},
        "gc": gc_log.per_interval(bounds)[timed],
        "tokens_per_update": tokens, "score": [h["score/mean"] for h in hist],
        "rss_after_setup_mb": rss_setup, "peak_rss_mb": reward.peak_mb[-1], "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------- TRL 1.16
def run_trl(a: argparse.Namespace, assets: dict) -> dict:
    shared.silence()
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if not trl.__version__.startswith(TRL_VERSION):
        raise SystemExit(f"TRL side: found trl {trl.__version__}, need {TRL_VERSION}x; install it apart:\n{TRL_INSTALL}")
    s, total = SETTINGS, a.warmup + a.updates
    completions = s["batch_prompts"] * s["num_generations"]
    tokenizer = AutoTokenizer.from_pretrained(assets["policy"])
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.float32)
    train = datasets.load_dataset("json", data_files=assets["data"], split="train")
    args = GRPOConfig(
        output_dir=str(Path(a.workdir) / f"trl_{a._tokens}_{a._round}"),
        # one update = one generation batch of 32 prompts x 8 = 256 completions, one optimizer step on all of them
        per_device_train_batch_size=completions, gradient_accumulation_steps=s["gradient_accumulation_steps"],
        num_generations=s["num_generations"], steps_per_generation=1, num_iterations=s["epochs"],
        max_steps=total, shuffle_dataset=True, dataloader_num_workers=0, remove_unused_columns=False,
        # sampling: plain model.generate, fixed length (the model has no EOS logit)
        max_completion_length=a._tokens, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
        min_p=None, repetition_penalty=1.0, generation_kwargs=None, cache_implementation=None,
        use_vllm=False, use_transformers_continuous_batching=False, pad_to_multiple_of=None,
        # loss: token-level PPO clip, normalised by the batch's token count (= llm_rl's token_mean), no KL
        loss_type="dapo", beta=s["kl_coef"], epsilon=s["clip_range"], epsilon_high=None, delta=None,
        importance_sampling_level="token", scale_rewards="group", mask_truncated_completions=False,
        top_entropy_quantile=1.0, entropy_coef=s["ent_coef"], use_adaptive_entropy=False, disable_dropout=True,
        # optimisation (TRL's own defaults: lr 1e-6, linear schedule, fused AdamW)
        learning_rate=s["learning_rate"], lr_scheduler_type=s["lr_scheduler_type"], warmup_steps=s["warmup_steps"],
        weight_decay=s["weight_decay"], optim=a.trl_optim, adam_beta1=s["adam_betas"][0],
        adam_beta2=s["adam_betas"][1], adam_epsilon=s["adam_eps"], max_grad_norm=s["max_grad_norm"],
        # precision, device, memory (TRL's defaults: bf16 True, gradient checkpointing True)
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, torch_compile=False,
        use_liger_kernel=False, cast_lm_head_to_fp32=False,
        # logging as TRL's default (metrics every 10 steps, to no tracker), no saving, evaluation or samples
        logging_strategy="steps", logging_steps=s["logging_steps"], report_to="none", log_completions=False,
        save_strategy="no", eval_strategy="no", disable_tqdm=True, push_to_hub=False, seed=s["seed"] + a._round,
    )
    reward = Reward()
    marks = {"begin": [], "end": [], "rollout": [], "generate": [], "reward": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks["begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks["end"].append(time.perf_counter())

    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=train,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)

    def observe(name, key):  # time one of TRL's phases; calls the original
        original = getattr(trainer, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            marks[key].append(time.perf_counter() - t0)
            return out

        setattr(trainer, name, timed)

    observe("_generate_and_score_completions", "rollout")  # tokenize, generate, decode, rewards, advantages
    observe("_generate_single_turn", "generate")  # model.generate and the EOS mask
    observe("_calculate_rewards", "reward")
    shared.touch(trainer.model)
    rss_setup = shared.rss_now_mb()
    gc_log = GcLog()
    t_start = time.perf_counter()
    trainer.train()
    if len(marks["end"]) != total:
        raise AssertionError(f"TRL ran {len(marks['end'])} updates, expected {total}")
    ends = [t_start] + marks["end"]
    cycle = [e1 - e0 for e0, e1 in zip(ends, ends[1:])]
    inner = [e - b for b, e in zip(marks["begin"], marks["end"])]
    timed = slice(a.warmup, total)
    # rows TRL trains on: completion_mask covers every token when no EOS is sampled
    return {
        "side": "trl", "seconds": cycle[timed], "inner_seconds": inner[timed],
        "phases": {"generate": marks["generate"][timed],
                   "rollout_other": [r - g - w for r, g, w in zip(marks["rollout"], marks["generate"],
                                                                     marks["reward"])][timed],
                   "reward": marks["reward"][timed],
                   "train": [i - r for i, r in zip(inner, marks["rollout"])][timed],
                   "rest": [c - i for c, i in zip(cycle, inner)][timed]},
        "gc": gc_log.per_interval([x - gc_log.origin for x in ends])[timed],
        "tokens_per_update": [completions * a._tokens] * a.updates,
        "rss_after_setup_mb": rss_setup, "peak_rss_mb": reward.peak_mb[-1], "threads": torch.get_num_threads(),
        "trl_version": trl.__version__,
    }


# ---------------------------------------------------------------------------------- driver
def spawn(side: str, tokens: int, a: argparse.Namespace, assets_file: Path, round_: int) -> dict:
    result_file = Path(a.workdir) / f"result_{side}_{tokens}_{round_}.json"
    python = a.trl_python if side == "trl" else a.ours_python
    cmd = [python, str(Path(__file__).resolve()), "--_worker", side, "--_assets", str(assets_file),
           "--_result", str(result_file), "--_round", str(round_), "--_tokens", str(tokens),
           "--updates", str(a.updates), "--warmup", str(a.warmup), "--workdir", a.workdir,
           "--threads", str(a.threads), "--trl-optim", a.trl_optim]
    return shared.run_worker(cmd, result_file, f"the {side} worker ({tokens} tokens)")


def worker_main(a: argparse.Namespace) -> None:
    shared.set_threads(a.threads)
    assets = json.loads(Path(a._assets).read_text())
    result = {"ours": run_ours, "trl": run_trl}[a._worker](a, assets)
    Path(a._result).write_text(json.dumps(result))


def check_trl_python(python: str) -> str:
    probe = "import trl, psutil; print(trl.__version__)"
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=shared.quiet_env())
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version.startswith(TRL_VERSION):
        found = f"trl {version}" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(
            f"TRL's side needs trl {TRL_VERSION}x and psutil in {python} ({found}). TRL 1.16 cannot share an "
            f"environment with TRL 1.12 (ppo_update.py): make one for it, e.g.\n{TRL_INSTALL}\n"
            "then pass --trl-python /work/venv-trl116/bin/python"
        )
    return version


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "p99": quantile(xs, 0.99),
            "max": max(xs), "min": min(xs), "n": len(xs)}


def summarize(rounds: list[dict]) -> dict:
    pool = [x for r in rounds for x in r["seconds"]]
    gcs = [g for r in rounds for g in r["gc"]]
    slowest = sorted(zip(pool, gcs), key=lambda p: -p[0])[: max(1, len(pool) // 100)]
    return {
        "seconds": stats(pool),
        "inner": stats([x for r in rounds for x in r["inner_seconds"]]),
        "phases": {k: {"median": statistics.median(v), "mean": statistics.fmean(v)}
                   for k in rounds[0]["phases"] for v in [[x for r in rounds for x in r["phases"][k]]]},
        "per_round_mean": [statistics.fmean(r["seconds"]) for r in rounds],
        "gc_seconds_per_update": statistics.fmean(g["seconds"] for g in gcs),
        "gc_gen2_per_update": statistics.fmean(g["gen2"] for g in gcs),
        "slowest": [{"seconds": t, "gc_seconds": g["seconds"], "gen2": g["gen2"]} for t, g in slowest],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
        "rss_after_setup_mb": max(r["rss_after_setup_mb"] for r in rounds),
        "peak_growth_mb": max(r["peak_rss_mb"] - r["rss_after_setup_mb"] for r in rounds),
        "tokens_per_update": rounds[0]["tokens_per_update"][0], "threads": rounds[0]["threads"],
    }


def print_table(tokens: int, ours: dict | None, trl: dict | None) -> None:
    def row(*cells, widths=(30, 16, 16, 9)):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    def pair(stat_o, stat_t, key, fmt="{:.3f}"):
        o = fmt.format(stat_o[key]) if stat_o else "-"
        t = fmt.format(stat_t[key]) if stat_t else "-"
        ratio = f"{stat_t[key] / stat_o[key]:.2f}x" if stat_o and stat_t and stat_o[key] else ""
        return o, t, ratio

    any_side = ours or trl
    print(f"\n{tokens} new tokens: 256 completions x {tokens} = {any_side['tokens_per_update']} tokens per update, "
          f"{any_side['threads']} torch threads, {any_side['seconds']['n']} timed updates per side")
    print(row("seconds per update", "llm_rl", "TRL 1.16", "TRL/ours"))
    print(row("-" * 30, "-" * 16, "-" * 16, "-" * 9))
    for key in ("mean", "median", "p99", "max", "min"):
        print(row(f"  {key}", *pair(ours and ours["seconds"], trl and trl["seconds"], key)))
    print(row("  mean w/o logging & loop", *pair(ours and ours["inner"], trl and trl["inner"], "mean")))
    print(row("phases (median; mean)", "", "", ""))

    def ph(side, k):
        return f"{side['phases'][k]['median']:.3f}; {side['phases'][k]['mean']:.3f}" if side and k in side["phases"] else "-"

    for label, ko, kt in [("  generate", "generate", "generate"), ("  reference forward", "reference", None),
                          ("  reward", "reward", "reward"), ("  rollout other (TRL)", None, "rollout_other"),
                          ("  train (fwd, bwd, AdamW)", "train", "train"), ("  rest (log, loop)", "rest", "rest")]:
        print(row(label, ph(ours, ko) if ko else "-", ph(trl, kt) if kt else "-"))
    for label, key, fmt in [("gc seconds / update", "gc_seconds_per_update", "{:.4f}"),
                            ("gen-2 collections / update", "gc_gen2_per_update", "{:.2f}"),
                            ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"), ("RSS after setup (MB)", "rss_after_setup_mb", "{:.0f}"),
                            ("peak - after setup (MB)", "peak_growth_mb", "{:.0f}")]:
        print(row(label, fmt.format(ours[key]) if ours else "-", fmt.format(trl[key]) if trl else "-"))
    for name, side in (("llm_rl", ours), ("TRL", trl)):
        if side:
            print(f"  slowest 1% {name}: " + ", ".join(f"{s['seconds']:.3f}s (gc {s['gc_seconds']:.3f}s, "
                                                        f"{s['gen2']} gen-2)" for s in side["slowest"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[6, 48], help="max_new_tokens settings (default 6 48)")
    p.add_argument("--sides", nargs="+", choices=["ours", "trl"], default=["ours", "trl"])
    p.add_argument("--updates", type=int, default=20, help="timed updates per side, setting and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    p.add_argument("--rounds", type=int, default=2, help="run every side this many times, interleaved")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each worker (0: torch default)")
    p.add_argument("--trl-python", "--trl_python", dest="trl_python", default=sys.executable,
                   help="interpreter for TRL's side; it needs trl 1.16.x (default: this one)")
    p.add_argument("--ours-python", "--ours_python", dest="ours_python", default=sys.executable,
                   help="interpreter for llm_rl's side (default: this one); llm_rl comes from this checkout")
    p.add_argument("--trl-optim", "--trl_optim", dest="trl_optim", default="adamw_torch",
                   choices=["adamw_torch", "adamw_torch_fused"],
                   help="TRL's optimizer: adamw_torch = llm_rl's torch.optim.AdamW (default); TRL's own default is fused")
    p.add_argument("--workdir", default=None, help="folder for the model, data and outputs (default: a temp folder)")
    p.add_argument("--_worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--_assets", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_round", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_tokens", type=int, default=6, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        worker_main(a)
        return
    if a.updates < 1 or a.warmup < 0 or a.rounds < 1 or min(a.tokens) < 1:
        p.error("--updates >= 1, --warmup >= 0, --rounds >= 1, --tokens >= 1")
    if max(a.tokens) + 8 > MODEL["n_positions"]:
        p.error(f"--tokens: at most {MODEL['n_positions'] - 8} (the model's positions)")
    trl_version = check_trl_python(a.trl_python) if "trl" in a.sides else None

    tmp = shared.open_workdir(a, "grpo_bench_")
    load_before = os.getloadavg()
    assets = build_assets(Path(a.workdir) / "assets", SETTINGS["seed"])
    assets_file = Path(a.workdir) / "assets.json"
    assets_file.write_text(json.dumps(assets))

    results = {(side, n): [] for n in a.tokens for side in a.sides}
    for round_ in range(a.rounds):
        for n in a.tokens:
            order = a.sides if round_ % 2 == 0 else a.sides[::-1]  # alternate who runs first
            for side in order:
                print(f"[bench] round {round_ + 1}/{a.rounds}: {side}, {n} tokens ...", file=sys.stderr, flush=True)
                results[side, n].append(spawn(side, n, a, assets_file, round_))
    load_after = os.getloadavg()
    summary = {key: summarize(rounds) for key, rounds in results.items()}

    print(f"\nGRPO update benchmark: GPT-2 {MODEL['n_layer']} x {MODEL['n_embd']} ({assets['policy_params'] / 1e6:.2f}M "
          f"params, {len(CHARS)}-character vocabulary), {SETTINGS['batch_prompts']} prompts x "
          f"{SETTINGS['num_generations']} completions, fp32 CPU; llm_rl (grpo) vs TRL {trl_version or '-'} GRPOTrainer")
    print(f"{a.rounds} round(s) x {a.updates} timed updates after {a.warmup} warm-up; load average (1, 5, 15 min) "
          f"before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}")
    print("seconds per update = one full loop iteration (llm_rl: difference of time/elapsed; TRL: on_step_end to "
          "on_step_end)")
    for n in a.tokens:
        print_table(n, summary.get(("ours", n)), summary.get(("trl", n)))
    print()

    record: dict = {"settings": {**SETTINGS, "model": MODEL, "tokens": a.tokens, "updates": a.updates,
                                 "warmup": a.warmup, "rounds": a.rounds, "threads": a.threads, "trl_optim": a.trl_optim},
                    "policy_params": assets["policy_params"]}
    for n in a.tokens:
        entry = {f"{side}_{k}": v for side in a.sides for k, v in summary[side, n].items()}
        entry["max_new_tokens"] = n
        if "ours" in a.sides and "trl" in a.sides:
            ratio = summary["trl", n]["seconds"]["mean"] / summary["ours", n]["seconds"]["mean"]
            entry["trl_over_ours"] = ratio
            entry["trl_over_ours_median"] = summary["trl", n]["seconds"]["median"] / summary["ours", n]["seconds"]["median"]
            entry["bar"] = BAR_SHORT if n <= 8 else BAR_LONG  # the bar: 1.5 at <= 8 tokens, 1.2 at 48
            entry["bar_met"] = ratio >= entry["bar"]
            record.setdefault("trl_over_ours", {})[label(n)] = ratio
        record[label(n)] = entry
    record.update({"load_average": {"before": load_before, "after": load_after}, "python": platform.python_version(),
                   "versions": shared.versions(("torch", "transformers", "accelerate")), "trl_version": trl_version})
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(record, default=str))


def label(tokens: int) -> str:
    return "short" if tokens <= 8 else "long" if tokens == 48 else f"tokens_{tokens}"


if __name__ == "__main__":
    main()
