"""llm_rl's side of both benchmarks: its PPOTrainer built from a Config, as `run_ppo` builds it, nothing of it
wrapped or patched.

- `ppo_worker` (ppo_update.py): GAE PPO with a value head; seconds per update between consecutive
  `on_update_end` calls of a TrainerCallback;
- `grpo_worker` (grpo_update.py): critic-free GRPO; seconds per update from the `time/elapsed` of the metrics
  `train()` returns.

Both load the policy with `CausalLMWithValueHead.from_pretrained` rather than `load_policy`, which would grow
the embeddings to the tokenizer's size and make EOS samplable (responses shorter than max_new_tokens).
llm_rl comes from this checkout (first on the workers' PYTHONPATH), through its public names, except
`load_prompts` (llm_rl.data.prompts), which llm_rl does not export. It is imported inside the functions only:
TRL's interpreter imports this module too and must import nothing of llm_rl.
"""

from __future__ import annotations

import time
from pathlib import Path

try:  # imported as benchmarks.side_llm_rl, or from a driver run as a script (its folder on sys.path)
    from . import harness
except ImportError:
    import harness


def _trainer(s: dict, assets: dict, vocab: int, max_new_tokens: int, value_head: bool, rewards: list, reward: dict,
             ppo: dict, train: dict, callbacks=(), model: dict | None = None, sampling: dict | None = None):
    """llm_rl's PPOTrainer on the benchmark's policy (`vocab` logits) and prompts, with settings `s` and these
    sections of its Config (`model`, `sampling`: keys added to those sections)."""
    from accelerate import Accelerator

    from llm_rl import CausalLMWithValueHead, Config, PPOTrainer, load_tokenizer
    from llm_rl.data.prompts import load_prompts  # not exported by llm_rl

    config = Config.from_dict({
        "model": {"model_name_or_path": assets["policy"], "torch_dtype": s["dtype"], "gradient_checkpointing": False,
                  **(model or {})},
        "data": {"dataset_name": assets["data"], "prompt_column": "prompt", "max_prompt_length": 512},
        "sampling": {"max_new_tokens": max_new_tokens, "temperature": s["temperature"], "top_k": s["top_k"],
                     "top_p": s["top_p"], "stop_token": None, "missing_eos_penalty": None,
                     "generation_batch_size": None, **(sampling or {})},
        "reward": reward,
        "ppo": ppo,
        "train": {"overwrite_output_dir": True, "save_steps": 0, "eval_steps": 0, "report_to": "none",
                  "progress_bar": False, **train},
    })
    # load_tokenizer/load_prompts as `run_ppo` does; the policy is loaded directly (see the module's docstring)
    tokenizer = load_tokenizer(assets["policy"])
    policy = CausalLMWithValueHead.from_pretrained(assets["policy"], value_head=value_head, torch_dtype=s["dtype"])
    assert policy.pretrained_model.get_output_embeddings().out_features == vocab <= tokenizer.eos_token_id
    return PPOTrainer(config, policy, tokenizer, load_prompts(config, tokenizer), rewards,
                      accelerator=Accelerator(cpu=True, mixed_precision="no"), callbacks=callbacks)


def _check_tokens(hist: list[dict], expected: int, what: str) -> list[int]:
    """Tokens per update from llm_rl's metrics; every one must be `expected` (no EOS, nothing masked)."""
    tokens = [int(round(h["response/tokens"])) for h in hist]
    if any(t != expected for t in tokens):
        raise AssertionError(f"ours {what} {tokens} tokens per update, expected {expected}")
    return tokens


# ---------------------------------------------------------------------------------- ppo_update.py
# the entries of harness.PPO_SETTINGS that go to the Config's ppo section as they are
PPO_KEYS = ("num_mini_batches", "gradient_accumulation_steps", "ppo_epochs", "learning_rate", "lr_scheduler_type",
            "warmup_steps", "weight_decay", "max_grad_norm", "clip_range", "clip_range_value", "vf_coef", "ent_coef",
            "gamma", "lam", "whiten_advantages", "kl_coef", "kl_estimator", "kl_placement", "adaptive_kl")


def ppo_worker(a, assets: dict) -> dict:
    harness.silence()
    import torch

    from llm_rl import RewardModel, TrainerCallback

    s, size = harness.PPO_SETTINGS, assets["size"]
    total = a.warmup + a.updates
    rewards = [RewardModel.from_pretrained(assets["reward"], torch_dtype=s["dtype"])]
    clock = harness.UpdateClock(total, a.warmup, harness.make_profiler(a.profile))

    class UpdateTimer(TrainerCallback):
        """The wall clock at the end of every update (intervals include everything the loop does)."""

        def on_update_end(self, trainer, metrics):
            clock.mark()

    trainer = _trainer(
        s, assets, size["vocab"], size["max_new_tokens"], True, rewards,
        reward={"reward_model_name_or_path": assets["reward"], "whiten_rewards": s["whiten_rewards"]},
        ppo={"batch_size": size["batch_size"], **{k: s[k] for k in PPO_KEYS}, "advantage_estimator": "gae",
             "num_generations": 1},
        train={"output_dir": str(Path(a.workdir) / "ours_out"), "seed": s["seed"] + a._round, "max_updates": total,
               "logging_steps": 10**9, "push_to_hub": False},
        callbacks=[UpdateTimer()])
    reward_module = rewards[0].model

    # sequence lengths the reward model scores: hooked on its backbone, which every scoring path runs
    rm_lengths: list[int] = []
    reward_module_backbone = getattr(reward_module, reward_module.base_model_prefix)
    reward_module_backbone.register_forward_pre_hook(
        lambda mod, args, kwargs: rm_lengths.append(int((kwargs.get("input_ids") if "input_ids" in kwargs
                                                         else args[0]).shape[1])), with_kwargs=True
    )
    rss_setup, peak_setup = harness.setup_memory(trainer.model, trainer.ref_model, reward_module)
    clock.start()
    history = trainer.train()
    intervals = clock.intervals()
    timed = slice(a.warmup, total)
    hist = history[timed]
    expected = size["batch_size"] * size["max_new_tokens"]
    tokens = _check_tokens(hist, expected, "generated")

    def phase(key):
        return [h.get(key, 0.0) for h in hist]

    result = {
        "side": "ours",
        "update_seconds": intervals[timed],
        # llm_rl's own metrics. time/forward: reference forward (+ the old policy+value forward unless the
        # trainer fuses it into the training forward); time/reward: reward model (+ advantages in older
        # versions); time/train: training forward, backward, AdamW (+ advantages when fused)
        "phases": {
            "generate": phase("time/generate"),
            "score_ref": [f + r for f, r in zip(phase("time/forward"), phase("time/reward"))],
            "forward": phase("time/forward"),
            "reward": phase("time/reward"),
            "train": phase("time/train"),
            "inner_update": phase("time/update"),
            "rest": [dt - h.get("time/generate", 0.0) - h.get("time/forward", 0.0) - h.get("time/reward", 0.0)
                     - h.get("time/train", 0.0) for dt, h in zip(intervals[timed], hist)],
        },
        "tokens_per_update": expected,
        "checks": {
            "tokens_per_update": tokens,
            "eos_rate": [h["response/eos_rate"] for h in hist],
            "reward_model_seq_len": sorted(set(rm_lengths)),
            "first_ratio_max_dev": [h.get("policy/ratio_max_dev") for h in hist],
        },
        "rss_after_setup_mb": rss_setup,
        "peak_rss_setup_mb": peak_setup,
        "peak_rss_mb": clock.peak_at_last_update,  # before train() saves the model and plots curves
        "peak_rss_process_mb": harness.peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
    return clock.profile(result, a.profile_top)


# ---------------------------------------------------------------------------------- grpo_update.py
def grpo_worker(a, assets: dict, model: dict | None = None, sampling: dict | None = None) -> dict:
    """One GRPO run; the settings and vocabulary from `assets` where the driver put them there (long_responses.py),
    else grpo_update.py's. `model`, `sampling`: keys for those Config sections (chunked_logprobs, rollout_engine)."""
    harness.silence()
    import torch

    s, total = assets.get("settings", harness.GRPO_SETTINGS), a.warmup + a.updates
    reward = harness.Reward()
    trainer = _trainer(
        s, assets, assets.get("vocab", len(harness.GRPO_CHARS)), a._tokens, False, [reward], model=model, sampling=sampling,
        reward={"whiten_rewards": False},
        ppo={"advantage_estimator": "grpo", "num_generations": s["num_generations"],
             "batch_size": s["batch_prompts"], "ppo_epochs": s["epochs"], "num_mini_batches": s["minibatches"],
             "gradient_accumulation_steps": s["gradient_accumulation_steps"], "learning_rate": s["learning_rate"],
             "lr_scheduler_type": s["lr_scheduler_type"], "warmup_steps": s["warmup_steps"],
             "weight_decay": s["weight_decay"], "max_grad_norm": s["max_grad_norm"], "clip_range": s["clip_range"],
             "ent_coef": s["ent_coef"], "kl_coef": s["kl_coef"], "adaptive_kl": False, "loss_agg": "token_mean"},
        train={"output_dir": str(Path(a.workdir) / f"ours_{a._tokens}_{a._round}"), "seed": s["seed"] + a._round,
               "max_updates": total, "logging_steps": s["logging_steps"]})
    rss_setup, _ = harness.setup_memory(trainer.model, trainer.ref_model)
    gc_log = harness.GcLog()
    t_start = time.perf_counter()
    history = trainer.train()
    elapsed = [h["time/elapsed"] for h in history]  # since train() began, before this update's log/save
    cycle = harness.intervals(0.0, elapsed)  # one full loop iteration each
    # the update boundaries on gc_log's clock (train() starts within microseconds of t_start)
    bounds = [t_start - gc_log.origin + e for e in [0.0] + elapsed]
    timed = slice(a.warmup, total)
    hist = history[timed]
    tokens = _check_tokens(hist, s["batch_prompts"] * s["num_generations"] * a._tokens, "trained on")

    def phase(key):
        return [h.get(key, 0.0) for h in hist]

    return {
        "side": "ours", "seconds": cycle[timed], "inner_seconds": phase("time/update"),
        "phases": {"generate": phase("time/generate"), "reference": phase("time/forward"),
                   "reward": phase("time/reward"), "train": phase("time/train"),
                   "weight_sync": phase("time/weight_sync"),
                   "rest": [c - h["time/generate"] - h["time/forward"] - h["time/reward"] - h["time/train"]
                            for c, h in zip(cycle[timed], hist)]},
        "gc": gc_log.per_interval(bounds)[timed],
        "tokens_per_update": tokens, "score": [h["score/mean"] for h in hist],
        "rss_after_setup_mb": rss_setup, "peak_rss_mb": reward.peak_mb[-1],
        "peak_rss_process_mb": harness.peak_rss_mb(), "threads": torch.get_num_threads(),
    }
