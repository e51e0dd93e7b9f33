#!/usr/bin/env python
"""Seconds per PPO update of llm_rl, optionally against TRL 1.12's PPO and against a model-pass floor.

    python benchmarks/ppo_update.py                          # ours, default size (4 x 256 GPT-2)
    python benchmarks/ppo_update.py --compare trl --floor    # + TRL on the same models/data, + floor
    python benchmarks/ppo_update.py --size large             # ~26M-parameter policy (8 x 512)
    python benchmarks/ppo_update.py --tiny --updates 1 --warmup 0   # smoke run (seconds)

Everything is built offline: a WordLevel tokenizer over a synthetic vocabulary, GPT-2 policy and
reward models from configs, saved to a temporary folder and loaded back with `from_pretrained`,
and a jsonl file of random 16-token prompts. Each side (ours, TRL, floor) runs in its own
subprocess so its peak RSS is its own; `--rounds N` runs the sides N times, interleaved, and
takes medians over all timed updates of all rounds (useful on a shared, noisy machine).

The policy never emits EOS: the tokenizer's special tokens (<pad>, <eos>, <unk>) have ids
>= the model's vocab_size, so the model has no logit for them and every response is exactly
`max_new_tokens` long, on both sides (TRL: stop_token None; checked per update).

The last line printed is one JSON object (see README.md for its keys).
See benchmarks/README.md for what is measured and every setting of both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ---------------------------------------------------------------------------------- sizes
SIZES = {
    # policy (and TRL's value model) shape; reward model shape; rollout shape
    "default": dict(n_layer=4, n_embd=256, n_head=4, vocab=2048, rm_layer=2, rm_embd=256, rm_head=4,
                    batch_size=16, prompt_len=16, max_new_tokens=48, num_prompts=256),
    "large": dict(n_layer=8, n_embd=512, n_head=8, vocab=2048, rm_layer=2, rm_embd=256, rm_head=4,
                  batch_size=16, prompt_len=16, max_new_tokens=48, num_prompts=256),
    "tiny": dict(n_layer=1, n_embd=32, n_head=2, vocab=64, rm_layer=1, rm_embd=32, rm_head=2,
                 batch_size=2, prompt_len=4, max_new_tokens=4, num_prompts=8),
}

# the PPO hyper-parameters both sides get (names are ours; TRL's names are mapped in run_trl)
PPO_SETTINGS = dict(
    ppo_epochs=1, num_mini_batches=1, gradient_accumulation_steps=1,
    learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
    max_grad_norm=None,  # TRL's PPO loop never clips gradients
    clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, ent_coef=0.0,
    gamma=1.0, lam=0.95, whiten_advantages=True, whiten_rewards=False,
    kl_coef=0.05, kl_estimator="k1", kl_placement="reward", adaptive_kl=False,
    temperature=1.0, top_k=0, top_p=1.0, missing_eos_penalty=None, stop_token=None,
    dtype="float32", device="cpu", seed=42,
)

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def quiet_env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="true", ACCELERATE_MIXED_PRECISION="no",
        WANDB_DISABLED="true", DISABLE_MLFLOW_INTEGRATION="TRUE", PYTHONWARNINGS="ignore",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def silence() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:
        pass
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except Exception:
        pass


def rss_now_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def touch(*models) -> None:
    """Read every weight once: safetensors weights are memory-mapped, so untouched ones are not yet in RSS.
    Called before "RSS after setup" on both sides so that figure includes all models' weights."""
    import torch

    with torch.no_grad():
        for m in models:
            if m is not None:
                for p in m.parameters():
                    p.sum()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------- assets
def build_tokenizer(vocab_size: int):
    """Words w0..w{V-1} take ids 0..V-1; <pad>, <eos>, <unk> take V, V+1, V+2: the model (vocab V)
    has no logit for them, so it can never sample EOS (or pad) and responses have a fixed length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab.update({PAD: vocab_size, EOS: vocab_size + 1, UNK: vocab_size + 2})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def build_assets(root: Path, size: dict, seed: int) -> dict:
    """Tokenizer, policy, reward model, TRL value model and prompts, saved under `root`."""
    import random

    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(size["vocab"])
    n_positions = 1 << (size["prompt_len"] + size["max_new_tokens"] - 1).bit_length()

    def config(n_layer, n_embd, n_head, **kw):
        # special-token ids stay None in the model configs: they are outside the model's vocabulary
        return GPT2Config(vocab_size=size["vocab"], n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                          n_head=n_head, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)

    paths = {name: root / name for name in ("policy", "reward", "value")}
    policy = GPT2LMHeadModel(config(size["n_layer"], size["n_embd"], size["n_head"]))
    policy.generation_config.eos_token_id = policy.generation_config.bos_token_id = None
    policy.save_pretrained(paths["policy"])
    # TRL's value model: a sequence classifier with the policy's shape, its backbone started from the policy
    value = GPT2ForSequenceClassification(config(size["n_layer"], size["n_embd"], size["n_head"], num_labels=1))
    value.transformer.load_state_dict(policy.transformer.state_dict())
    value.save_pretrained(paths["value"])
    reward = GPT2ForSequenceClassification(config(size["rm_layer"], size["rm_embd"], size["rm_head"], num_labels=1))
    reward.save_pretrained(paths["reward"])
    for path in paths.values():
        tokenizer.save_pretrained(path)

    # prompts: prompt_len random words each; the trailing space lets "prompt + completion" re-tokenize
    # into exactly prompt_len + max_new_tokens tokens (llm_rl's reward model scores text)
    rng = random.Random(seed)
    data = root / "prompts.jsonl"
    with open(data, "w") as f:
        for _ in range(size["num_prompts"]):
            words = [f"w{rng.randrange(size['vocab'])}" for _ in range(size["prompt_len"])]
            f.write(json.dumps({"prompt": " ".join(words) + " "}) + "\n")
    n_params = sum(p.numel() for p in policy.parameters())
    n_reward = sum(p.numel() for p in reward.parameters())
    return {**{k: str(v) for k, v in paths.items()}, "data": str(data), "policy_params": n_params,
            "reward_params": n_reward}


# ---------------------------------------------------------------------------------- ours
def run_ours(a: argparse.Namespace, assets: dict, size: dict) -> dict:
    silence()
    import torch
    from accelerate import Accelerator

    from llm_rl.config.sections import Config
    from llm_rl.data.prompts import load_prompts
    from llm_rl.models.loading import load_tokenizer
    from llm_rl.models.value_head import CausalLMWithValueHead
    from llm_rl.rewards.model import RewardModel
    from llm_rl.training.callbacks import TrainerCallback
    from llm_rl.training.ppo_trainer import PPOTrainer

    s = PPO_SETTINGS
    total = a.warmup + a.updates
    out_dir = Path(a.workdir) / "ours_out"
    config = Config.from_dict({
        "model": {"model_name_or_path": assets["policy"], "torch_dtype": s["dtype"], "gradient_checkpointing": False},
        "data": {"dataset_name": assets["data"], "prompt_column": "prompt", "max_prompt_length": 512},
        "sampling": {"max_new_tokens": size["max_new_tokens"], "temperature": s["temperature"], "top_k": s["top_k"],
                     "top_p": s["top_p"], "stop_token": None, "missing_eos_penalty": None,
                     "generation_batch_size": None},
        "reward": {"reward_model_name_or_path": assets["reward"], "whiten_rewards": s["whiten_rewards"]},
        "ppo": {"batch_size": size["batch_size"], "num_mini_batches": s["num_mini_batches"],
                "gradient_accumulation_steps": s["gradient_accumulation_steps"], "ppo_epochs": s["ppo_epochs"],
                "learning_rate": s["learning_rate"], "lr_scheduler_type": s["lr_scheduler_type"],
                "warmup_steps": s["warmup_steps"], "weight_decay": s["weight_decay"],
                "max_grad_norm": s["max_grad_norm"], "clip_range": s["clip_range"],
                "clip_range_value": s["clip_range_value"], "vf_coef": s["vf_coef"], "ent_coef": s["ent_coef"],
                "gamma": s["gamma"], "lam": s["lam"], "whiten_advantages": s["whiten_advantages"],
                "kl_coef": s["kl_coef"], "kl_estimator": s["kl_estimator"], "kl_placement": s["kl_placement"],
                "adaptive_kl": s["adaptive_kl"], "advantage_estimator": "gae", "num_generations": 1},
        "train": {"output_dir": str(out_dir), "overwrite_output_dir": True, "seed": s["seed"] + a.round,
                  "max_updates": total, "logging_steps": 10**9, "save_steps": 0, "eval_steps": 0,
                  "report_to": "none", "progress_bar": False, "push_to_hub": False},
    })
    # load_tokenizer/load_prompts/RewardModel as `run_ppo` does; the policy is loaded directly because
    # pipeline.load_policy would grow the embeddings to the tokenizer's size, making EOS samplable.
    tokenizer = load_tokenizer(assets["policy"])
    policy = CausalLMWithValueHead.from_pretrained(assets["policy"], value_head=True, torch_dtype=s["dtype"])
    assert policy.pretrained_model.get_output_embeddings().out_features == size["vocab"] <= tokenizer.eos_token_id
    rewards = [RewardModel.from_pretrained(assets["reward"], torch_dtype=s["dtype"])]
    prompts = load_prompts(config, tokenizer)
    marks: list[float] = []
    profiler = make_profiler(a.profile)
    peak_at_last_update = []

    class UpdateTimer(TrainerCallback):
        """The wall clock at the end of every update (intervals include everything the loop does)."""

        def on_update_end(self, trainer, metrics):
            marks.append(time.perf_counter())
            if len(marks) == total:
                peak_at_last_update.append(peak_rss_mb())
                if profiler is not None:
                    profiler.stop()  # before train() saves the model and plots curves
            if profiler is not None and len(marks) == a.warmup:
                profiler.start()

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    trainer = PPOTrainer(config, policy, tokenizer, prompts, rewards, accelerator=accelerator,
                         callbacks=[UpdateTimer()])
    reward_module = rewards[0].model

    # sequence lengths the reward model scores: hooked on its backbone, which every scoring path runs
    rm_lengths: list[int] = []
    reward_module_backbone = getattr(reward_module, reward_module.base_model_prefix)
    reward_module_backbone.register_forward_pre_hook(
        lambda mod, args, kwargs: rm_lengths.append(int((kwargs.get("input_ids") if "input_ids" in kwargs
                                                         else args[0]).shape[1])), with_kwargs=True
    )
    touch(trainer.model, trainer.ref_model, reward_module)
    rss_setup = rss_now_mb()
    peak_setup = peak_rss_mb()
    if profiler is not None and a.warmup == 0:
        profiler.start()
    t_start = time.perf_counter()
    history = trainer.train()
    ends = [t_start] + marks
    intervals = [ends[i + 1] - ends[i] for i in range(len(marks))]
    timed = slice(a.warmup, total)
    hist = history[timed]
    tokens = [int(round(h["response/tokens"])) for h in hist]
    expected = size["batch_size"] * size["max_new_tokens"]
    checks = {
        "tokens_per_update": tokens,
        "eos_rate": [h["response/eos_rate"] for h in hist],
        "reward_model_seq_len": sorted(set(rm_lengths)),
        "first_ratio_max_dev": [h.get("policy/ratio_max_dev") for h in hist],
    }
    if any(t != expected for t in tokens):
        raise AssertionError(f"ours generated {tokens} tokens per update, expected {expected}")
    result = {
        "side": "ours",
        "update_seconds": intervals[timed],
        # llm_rl's own metrics. time/forward: reference forward (+ the old policy+value forward unless the
        # trainer fuses it into the training forward); time/reward: reward model (+ advantages in older
        # versions); time/train: training forward, backward, AdamW (+ advantages when fused)
        "phases": {
            "generate": [h.get("time/generate", 0.0) for h in hist],
            "score_ref": [h.get("time/forward", 0.0) + h.get("time/reward", 0.0) for h in hist],
            "forward": [h.get("time/forward", 0.0) for h in hist],
            "reward": [h.get("time/reward", 0.0) for h in hist],
            "train": [h.get("time/train", 0.0) for h in hist],
            "inner_update": [h.get("time/update", 0.0) for h in hist],
            "rest": [dt - h.get("time/generate", 0.0) - h.get("time/forward", 0.0) - h.get("time/reward", 0.0)
                     - h.get("time/train", 0.0) for dt, h in zip(intervals[timed], hist)],
        },
        "tokens_per_update": expected,
        "checks": checks,
        "rss_after_setup_mb": rss_setup,
        "peak_rss_setup_mb": peak_setup,
        "peak_rss_mb": peak_at_last_update[0],  # before train() saves the model and plots curves
        "peak_rss_process_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
    if profiler is not None:
        result["profile"] = profiler.report(a.profile_top)
    return result


class make_profiler:  # noqa: N801 - a small factory class
    def __new__(cls, kind):
        if kind is None:
            return None
        return super().__new__(cls)

    def __init__(self, kind):
        self.kind = kind
        self.prof = None

    def start(self):
        if self.kind == "cprofile":
            import cProfile

            self.prof = cProfile.Profile()
            self.prof.enable()
        else:
            import torch.profiler as tp

            self.prof = tp.profile(activities=[tp.ProfilerActivity.CPU], record_shapes=False)
            self.prof.__enter__()

    def stop(self):
        if self.prof is None or getattr(self, "stopped", False):
            return
        self.stopped = True
        if self.kind == "cprofile":
            self.prof.disable()
        else:
            self.prof.__exit__(None, None, None)

    def report(self, top: int) -> str:
        if self.prof is None:
            return ""
        if self.kind == "cprofile":
            import io
            import pstats

            buf = io.StringIO()
            stats = pstats.Stats(self.prof, stream=buf).strip_dirs()
            stats.sort_stats("cumulative").print_stats(top)
            stats.sort_stats("tottime").print_stats(top)
            return buf.getvalue()
        return self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ---------------------------------------------------------------------------------- TRL
def run_trl(a: argparse.Namespace, assets: dict, size: dict) -> dict:
    silence()
    import gc as real_gc

    import datasets
    import torch
    import trl
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PrinterCallback,
        ProgressCallback,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    s = PPO_SETTINGS
    total = a.warmup + a.updates
    batch = size["batch_size"]
    tokenizer = AutoTokenizer.from_pretrained(assets["policy"])
    tokenizer.padding_side = "left"
    dtype = getattr(torch, s["dtype"])
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(assets["value"], num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(assets["reward"], num_labels=1, dtype=dtype)

    raw = datasets.load_dataset("json", data_files=assets["data"], split="train")
    train = raw.map(lambda row: {"input_ids": tokenizer(row["prompt"]).input_ids}, remove_columns=raw.column_names)
    lengths = {len(x) for x in train["input_ids"]}
    assert lengths == {size["prompt_len"]}, f"prompts must all have {size['prompt_len']} tokens, got {lengths}"

    args = PPOConfig(
        output_dir=str(Path(a.workdir) / "trl_out"),
        # batch shape
        per_device_train_batch_size=batch, gradient_accumulation_steps=s["gradient_accumulation_steps"],
        num_mini_batches=s["num_mini_batches"], num_ppo_epochs=s["ppo_epochs"],
        local_rollout_forward_batch_size=batch, total_episodes=total * batch,
        # sampling
        response_length=size["max_new_tokens"], temperature=s["temperature"], stop_token=None, stop_token_id=None,
        missing_eos_penalty=s["missing_eos_penalty"],
        # optimisation
        learning_rate=s["learning_rate"], lr_scheduler_type=s["lr_scheduler_type"], warmup_steps=s["warmup_steps"],
        weight_decay=s["weight_decay"], optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        # PPO maths
        cliprange=s["clip_range"], cliprange_value=s["clip_range_value"], vf_coef=s["vf_coef"], gamma=s["gamma"],
        lam=s["lam"], kl_coef=s["kl_coef"], kl_estimator=s["kl_estimator"], whiten_rewards=s["whiten_rewards"],
        # precision, device, memory
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, torch_compile=False,
        # no logging, saving, evaluation, sample generations or trackers
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        num_sample_generations=0, push_to_hub=False, dataloader_num_workers=0,
        seed=s["seed"] + a.round,
    )

    # --- timing and checks: wrappers around TRL's module-level helpers (they only observe)
    record = {"gen": [], "gen_end": [], "train_start": [], "gc": 0.0, "gc_per_update": [], "tokens": [],
              "rm_len": set()}
    orig_batch_generation, orig_forward, orig_get_reward = trl_ppo.batch_generation, trl_ppo.forward, trl_ppo.get_reward

    def batch_generation(model, queries, *rest, **kw):
        t0 = time.perf_counter()
        query_responses, logits = orig_batch_generation(model, queries, *rest, **kw)
        record["gen"].append(time.perf_counter() - t0)
        record["gen_end"].append(time.perf_counter())
        responses = query_responses[:, queries.shape[1]:]
        # TRL masks everything from the first pad on: count the tokens it trains on
        is_pad = responses == tokenizer.pad_token_id
        first_pad = torch.where(is_pad.any(1), is_pad.float().argmax(1), torch.full_like(is_pad[:, 0], responses.shape[1], dtype=torch.long))
        record["tokens"].append(int(first_pad.sum()))
        return query_responses, logits

    def forward(model, query_responses, pad_token_id):
        if isinstance(model, trl_ppo.PolicyAndValueWrapper) or hasattr(model, "module"):
            if len(record["train_start"]) < len(record["gen"]):
                record["train_start"].append(time.perf_counter())
        return orig_forward(model, query_responses, pad_token_id)

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is reward:
            record["rm_len"].add(int(query_responses.shape[1]))
        return orig_get_reward(model, query_responses, pad_token_id, context_length)

    class TimedGC:
        def __getattr__(self, name):
            return getattr(real_gc, name)

        @staticmethod
        def collect(*args, **kwargs):
            t0 = time.perf_counter()
            out = real_gc.collect(*args, **kwargs)
            record["gc"] += time.perf_counter() - t0
            return out

    trl_ppo.batch_generation, trl_ppo.forward, trl_ppo.get_reward = batch_generation, forward, get_reward
    trl_ppo.gc = TimedGC()

    marks: list[float] = []
    profiler = make_profiler(a.profile if a.profile_side == "trl" else None)

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())
            if len(marks) == total:
                record["peak_at_last_update"] = peak_rss_mb()
                if profiler is not None:
                    profiler.stop()
            record["gc_per_update"].append(record["gc"])
            record["gc"] = 0.0
            if profiler is not None and len(marks) == a.warmup:
                profiler.start()

    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
        train_dataset=train, value_model=value, eval_dataset=train.select(range(batch)), callbacks=[StepTimer()],
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    touch(trainer.model, trainer.ref_model, trainer.reward_model)
    rss_setup = rss_now_mb()
    peak_setup = peak_rss_mb()
    if profiler is not None and a.warmup == 0:
        profiler.start()
    t_start = time.perf_counter()
    trainer.train()
    ends = [t_start] + marks
    assert len(marks) == total, f"TRL ran {len(marks)} updates, expected {total}"
    intervals = [ends[i + 1] - ends[i] for i in range(total)]
    timed = slice(a.warmup, total)
    gen_end, train_start = record["gen_end"], record["train_start"]
    score_ref = [train_start[i] - gen_end[i] for i in range(total)]
    train_phase = [marks[i] - train_start[i] for i in range(total)]
    expected = batch * size["max_new_tokens"]
    tokens = record["tokens"][timed]
    if any(t != expected for t in tokens):
        raise AssertionError(f"TRL trained on {tokens} response tokens per update, expected {expected}")
    # interval i runs from on_step_end(i-1) to on_step_end(i): it holds the gc.collect() that closes
    # update i-1 and the one inside update i's rollout, exactly what gc_per_update[i] sums
    gc_in_interval = record["gc_per_update"]
    result = {
        "side": "trl",
        "update_seconds": intervals[timed],
        "phases": {
            "generate": record["gen"][timed],
            "score_ref": score_ref[timed],  # ref fwd, value-model fwd, RM fwd, GAE, one gc.collect
            "train": train_phase[timed],  # forward(policy+value model), backward, AdamW, metrics, log
            "gc_collect": gc_in_interval[timed],
            "rest": [intervals[i] - record["gen"][i] - score_ref[i] - train_phase[i] for i in range(total)][timed],
        },
        "tokens_per_update": expected,
        "checks": {"tokens_per_update": tokens, "reward_model_seq_len": sorted(record["rm_len"])},
        "rss_after_setup_mb": rss_setup,
        "peak_rss_setup_mb": peak_setup,
        "peak_rss_mb": record["peak_at_last_update"],
        "peak_rss_process_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "trl_version": trl.__version__,
    }
    if profiler is not None:
        result["profile"] = profiler.report(a.profile_top)
    return result


# ---------------------------------------------------------------------------------- floor
def run_floor(a: argparse.Namespace, assets: dict, size: dict) -> dict:
    """The model passes one update needs, each timed alone (median over repeats)."""
    silence()
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(PPO_SETTINGS["seed"] + a.round)
    tokenizer = AutoTokenizer.from_pretrained(assets["policy"])
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval()
    ref = AutoModelForCausalLM.from_pretrained(assets["policy"]).eval().requires_grad_(False)
    reward = AutoModelForSequenceClassification.from_pretrained(assets["reward"], num_labels=1).eval()
    reward.config.pad_token_id = tokenizer.pad_token_id  # as llm_rl's RewardModel does; never present in the ids
    v_head = torch.nn.Linear(policy.config.n_embd, 1)
    params = list(policy.parameters()) + list(v_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=PPO_SETTINGS["learning_rate"], weight_decay=0.0)
    B, P, N = size["batch_size"], size["prompt_len"], size["max_new_tokens"]
    prompts = [json.loads(line)["prompt"] for line in open(assets["data"])][:B]
    prompt_ids = torch.tensor([tokenizer(p).input_ids for p in prompts])
    prompt_mask = torch.ones_like(prompt_ids)

    def generate():
        with torch.no_grad():
            out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
                                  temperature=1.0, max_new_tokens=N, pad_token_id=tokenizer.pad_token_id)
        return out

    full = generate()
    assert full.shape == (B, P + N), full.shape
    mask = torch.ones_like(full)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    response = full[:, P:]

    def logprobs(logits):
        return torch.gather(logits.log_softmax(-1), 2, response[..., None]).squeeze(-1)

    def ref_forward():
        with torch.no_grad():
            logits = ref(input_ids=full, attention_mask=mask, position_ids=pos, logits_to_keep=N + 1).logits[:, :-1]
            return logprobs(logits)

    def policy_value_forward(grad=False):
        with torch.set_grad_enabled(grad):
            hidden = policy.transformer(input_ids=full, attention_mask=mask, position_ids=pos).last_hidden_state
            hidden = hidden[:, P - 1:-1]
            return logprobs(policy.lm_head(hidden)), v_head(hidden).squeeze(-1)

    def reward_forward():
        with torch.no_grad():
            return reward(input_ids=full, attention_mask=mask, position_ids=pos).logits[:, 0]

    old_lp, old_v = policy_value_forward()
    adv = torch.randn_like(old_lp)
    ret = torch.randn_like(old_v)

    def train_step():
        lp, v = policy_value_forward(grad=True)
        ratio = (lp - old_lp).exp()
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        vf = 0.5 * torch.max((v - ret) ** 2, (old_v + (v - old_v).clamp(-0.2, 0.2) - ret) ** 2).mean()
        (pg + 0.1 * vf).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    passes = {"generate": generate, "ref_forward": ref_forward, "policy_value_forward": policy_value_forward,
              "reward_forward": reward_forward, "train_step": train_step}
    repeats = max(a.updates, 5)
    times = {name: [] for name in passes}
    for _ in range(2):  # warm-up
        for fn in passes.values():
            fn()
    touch(policy, ref, reward)
    rss_setup = rss_now_mb()
    for _ in range(repeats):  # interleaved, so load changes hit every pass alike
        for name, fn in passes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"side": "floor", "passes": times, "rss_after_setup_mb": rss_setup, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(), "tokens_per_update": B * N}


# ---------------------------------------------------------------------------------- driver
def spawn(side: str, a: argparse.Namespace, assets_file: Path, round_: int) -> dict:
    result_file = Path(a.workdir) / f"result_{side}_{round_}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", side, "--_assets", str(assets_file),
           "--_result", str(result_file), "--_round", str(round_), "--updates", str(a.updates),
           "--warmup", str(a.warmup), "--size", a.size, "--workdir", a.workdir, "--profile_top", str(a.profile_top)]
    if a.tiny:
        cmd.append("--tiny")
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    if a.profile and a.profile_side == side:
        cmd += ["--profile", a.profile, "--profile_side", side]
    return run_worker(cmd, result_file, f"the {side} worker")


def run_worker(cmd: list[str], result_file: Path, what: str) -> dict:
    """Run one side's worker process (`cmd`), which writes its result JSON to `result_file`; that result,
    with the wall time of the whole process added. Shared with grpo_update.py."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=quiet_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-20000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    result = json.loads(result_file.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def open_workdir(a: argparse.Namespace, prefix: str):
    """The driver's working folder: `a.workdir`, or a new temporary one (returned, to clean up at the
    end; None otherwise). Also quiets the libraries' output in this process and the workers'."""
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        a.workdir = tmp.name
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    os.environ.update({k: v for k, v in quiet_env().items() if k != "PYTHONPATH"})
    silence()
    return tmp


def set_threads(threads: int) -> None:
    """torch.set_num_threads in a worker (0: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def worker_main(a: argparse.Namespace) -> None:
    set_threads(a.threads)
    assets = json.loads(Path(a._assets).read_text())
    size = assets["size"]
    a.round = a._round
    fn = {"ours": run_ours, "trl": run_trl, "floor": run_floor}[a._worker]
    result = fn(a, assets, size)
    Path(a._result).write_text(json.dumps(result))


def summarize(results: dict[str, list[dict]]) -> dict:
    """Pool timed updates of every round per side; medians."""
    out = {}
    for side, rounds in results.items():
        if side == "floor":
            passes = {k: median([x for r in rounds for x in r["passes"][k]]) for k in rounds[0]["passes"]}
            out[side] = {"passes": passes, "seconds": sum(passes.values()),
                         # one epoch, one minibatch: the training forward can give the old log-probs and values
                         "seconds_fused": sum(v for k, v in passes.items() if k != "policy_value_forward"),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds)}
            continue
        seconds = [x for r in rounds for x in r["update_seconds"]]
        phases = {k: median([x for r in rounds for x in r["phases"][k]]) for k in rounds[0]["phases"]}
        out[side] = {
            "seconds": median(seconds),
            "min": min(seconds), "max": max(seconds), "n": len(seconds),
            "per_round_median": [median(r["update_seconds"]) for r in rounds],
            "phases": phases,
            "tokens_per_update": rounds[0]["tokens_per_update"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
            "rss_after_setup_mb": max(r["rss_after_setup_mb"] for r in rounds),
            "peak_growth_mb": max(r["peak_rss_mb"] - r["rss_after_setup_mb"] for r in rounds),
            "peak_rss_process_mb": max(r["peak_rss_process_mb"] for r in rounds),
            "checks": rounds[0]["checks"],
            "threads": rounds[0]["threads"],
        }
    return out


def print_table(summary: dict, settings: dict, meta: dict) -> None:
    def row(*cells, widths=(34, 14, 14, 10)):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    ours, trl = summary["ours"], summary.get("trl")
    print()
    print(f"PPO update benchmark: {meta['size']} size, policy {meta['policy_params'] / 1e6:.2f}M params, "
          f"reward model {meta['reward_params'] / 1e6:.2f}M, batch {settings['batch_size']}, "
          f"prompt {settings['prompt_len']} + {settings['max_new_tokens']} new tokens, fp32 CPU, "
          f"{ours['threads']} torch threads")
    print(f"timed updates per side: {ours['n']} ({meta['rounds']} round(s) x {settings['updates']}, "
          f"after {settings['warmup']} warm-up each); load average before/after: {meta['load_before']} / "
          f"{meta['load_after']}")
    print()
    print(row("median seconds", "llm_rl", "TRL 1.12" if trl else "", "TRL/ours" if trl else ""))
    print(row("-" * 34, "-" * 14, "-" * 14 if trl else "", "-" * 10 if trl else ""))

    def line(label, ours_v, trl_v, fmt="{:.3f}"):
        o = fmt.format(ours_v) if ours_v is not None else "-"
        t = fmt.format(trl_v) if trl_v is not None else ("-" if trl else "")
        ratio = f"{trl_v / ours_v:.2f}x" if trl and trl_v and ours_v else ""
        print(row(label, o, t, ratio))

    tp = trl["phases"] if trl else {}
    line("update (end to end)", ours["seconds"], trl["seconds"] if trl else None)
    line("  generation", ours["phases"]["generate"], tp.get("generate"))
    line("  scoring + reference (+GAE)", ours["phases"]["score_ref"], tp.get("score_ref"))
    line("    of which time/forward", ours["phases"]["forward"], None)
    line("    of which time/reward", ours["phases"]["reward"], None)
    line("  training (fwd+bwd+AdamW)", ours["phases"]["train"], tp.get("train"))
    if trl:
        line("  TRL gc.collect() per update", None, tp.get("gc_collect"))
    line("  rest (metrics, logging, loop)", ours["phases"]["rest"], tp.get("rest"))
    line("fastest update", ours["min"], trl["min"] if trl else None)
    print(row("per-round medians", " ".join(f"{x:.2f}" for x in ours["per_round_median"]),
              " ".join(f"{x:.2f}" for x in trl["per_round_median"]) if trl else ""))
    print(row("generated tokens / s", f"{ours['tokens_per_update'] / ours['seconds']:.0f}",
              f"{trl['tokens_per_update'] / trl['seconds']:.0f}" if trl else ""))
    print(row("peak RSS (MB)", f"{ours['peak_rss_mb']:.0f}", f"{trl['peak_rss_mb']:.0f}" if trl else "",
              f"{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f} o/t" if trl else ""))
    print(row("RSS after setup (MB)", f"{ours['rss_after_setup_mb']:.0f}",
              f"{trl['rss_after_setup_mb']:.0f}" if trl else ""))
    print(row("peak - RSS after setup (MB)", f"{ours['peak_growth_mb']:.0f}",
              f"{trl['peak_growth_mb']:.0f}" if trl else "",
              f"{ours['peak_growth_mb'] / trl['peak_growth_mb']:.2f} o/t" if trl and trl["peak_growth_mb"] > 0 else ""))
    if "floor" in summary:
        f = summary["floor"]
        print()
        print("floor: model passes alone (median seconds)")
        for k, v in f["passes"].items():
            print(row(f"  {k}", f"{v:.3f}"))
        print(row("  sum = floor", f"{f['seconds']:.3f}"))
        print(row("  llm_rl update / floor", f"{ours['seconds'] / f['seconds']:.2f}x"))
        print(row("  floor w/o no-grad policy+value fwd", f"{f['seconds_fused']:.3f}"))
        print(row("  llm_rl update / that floor", f"{ours['seconds'] / f['seconds_fused']:.2f}x"))
        if trl:
            print(row("  TRL update / floor", f"{trl['seconds'] / f['seconds']:.2f}x"))
    print()
    print(f"checks: ours tokens/update {sorted(set(ours['checks']['tokens_per_update']))}, "
          f"RM sequence lengths {ours['checks']['reward_model_seq_len']}"
          + (f"; TRL tokens/update {sorted(set(trl['checks']['tokens_per_update']))}, "
             f"RM sequence lengths {trl['checks']['reward_model_seq_len']}" if trl else ""))
    print()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["default", "large"], default="default")
    p.add_argument("--tiny", action="store_true", help="minimal models (1 x 32), batch 2, 4 new tokens: smoke test")
    p.add_argument("--updates", type=int, default=10, help="timed updates per side (K)")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    p.add_argument("--rounds", type=int, default=1, help="run every side this many times, interleaved")
    p.add_argument("--compare", choices=["trl"], default=None)
    p.add_argument("--floor", action="store_true", help="also time the bare model passes of one update")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each worker (0: torch default)")
    p.add_argument("--profile", choices=["cprofile", "torch"], default=None, help="profile the timed updates")
    p.add_argument("--profile_side", choices=["ours", "trl"], default="ours")
    p.add_argument("--profile_top", type=int, default=30)
    p.add_argument("--workdir", default=None, help="folder for models, data and outputs (default: a temp folder)")
    p.add_argument("--_worker", choices=["ours", "trl", "floor"], help=argparse.SUPPRESS)
    p.add_argument("--_assets", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_round", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        worker_main(a)
        return
    if a.updates < 1 or a.warmup < 0 or a.rounds < 1:
        p.error("--updates >= 1, --warmup >= 0, --rounds >= 1")
    if a.compare == "trl":
        try:
            import trl  # noqa: F401
        except ImportError:
            p.error("--compare trl needs TRL: pip install trl==1.12.0")

    size_name = "tiny" if a.tiny else a.size
    size = SIZES[size_name]
    tmp = open_workdir(a, "ppo_bench_")
    load_before = os.getloadavg()[0]
    assets = build_assets(Path(a.workdir) / "assets", size, PPO_SETTINGS["seed"])
    assets["size"] = size
    assets_file = Path(a.workdir) / "assets.json"
    assets_file.write_text(json.dumps(assets))

    sides = ["ours"] + (["trl"] if a.compare else []) + (["floor"] if a.floor else [])
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for round_ in range(a.rounds):
        order = sides if round_ % 2 == 0 else sides[::-1]  # alternate who runs first
        for side in order:
            print(f"[bench] round {round_ + 1}/{a.rounds}: {side} ...", file=sys.stderr, flush=True)
            results[side].append(spawn(side, a, assets_file, round_))
    load_after = os.getloadavg()[0]
    summary = summarize(results)

    settings = {
        "size": size_name, "n_layer": size["n_layer"], "n_embd": size["n_embd"], "vocab": size["vocab"],
        "reward_model": f"{size['rm_layer']}x{size['rm_embd']}", "batch_size": size["batch_size"],
        "prompt_len": size["prompt_len"], "max_new_tokens": size["max_new_tokens"], "updates": a.updates,
        "warmup": a.warmup, "rounds": a.rounds, "threads": summary["ours"]["threads"],
        **{k: v for k, v in PPO_SETTINGS.items()},
    }
    meta = {"size": size_name, "policy_params": assets["policy_params"], "reward_params": assets["reward_params"],
            "rounds": a.rounds, "load_before": f"{load_before:.2f}", "load_after": f"{load_after:.2f}"}
    print_table(summary, settings, meta)
    for side in sides:
        for r in results[side]:
            if r.get("profile"):
                print(f"----- profile of {side} (timed updates) -----")
                print(r["profile"])

    ours = summary["ours"]
    record = {
        "seconds_per_update": ours["seconds"],
        "tokens_per_second": ours["tokens_per_update"] / ours["seconds"],
        "peak_rss_mb": ours["peak_rss_mb"],
        "phases": ours["phases"],
        "update_seconds_min": ours["min"],
        "update_seconds_max": ours["max"],
        "per_round_median": ours["per_round_median"],
        "tokens_per_update": ours["tokens_per_update"],
        "rss_after_setup_mb": ours["rss_after_setup_mb"],
        "peak_rss_growth_mb": ours["peak_growth_mb"],
    }
    if "trl" in summary:
        t = summary["trl"]
        record.update({
            "trl_seconds_per_update": t["seconds"],
            "trl_tokens_per_second": t["tokens_per_update"] / t["seconds"],
            "trl_over_ours": t["seconds"] / ours["seconds"],
            "trl_peak_rss_mb": t["peak_rss_mb"],
            "rss_ratio_ours_over_trl": ours["peak_rss_mb"] / t["peak_rss_mb"],
            "trl_rss_after_setup_mb": t["rss_after_setup_mb"],
            "trl_peak_rss_growth_mb": t["peak_growth_mb"],
            "trl_phases": t["phases"],
            "trl_per_round_median": t["per_round_median"],
        })
    if "floor" in summary:
        f = summary["floor"]
        record.update({"floor_seconds": f["seconds"], "floor_passes": f["passes"],
                       "update_over_floor": ours["seconds"] / f["seconds"],
                       "floor_seconds_fused": f["seconds_fused"],
                       "update_over_floor_fused": ours["seconds"] / f["seconds_fused"]})
        if "trl" in summary:
            record["trl_update_over_floor"] = summary["trl"]["seconds"] / f["seconds"]
    record.update({
        "settings": settings,
        "policy_params": assets["policy_params"],
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "python": platform.python_version(),
        "versions": versions(),
    })
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(record, default=str))


def versions(names=("torch", "transformers", "accelerate", "trl")) -> dict:
    """Installed versions of `names` (those installed). Shared with grpo_update.py."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    main()
