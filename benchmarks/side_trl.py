"""TRL's side of both benchmarks; imports nothing of llm_rl (TRL inside the functions only).

- `ppo_worker` (ppo_update.py): TRL 1.12's `trl.experimental.ppo.PPOTrainer`, with a separate value model;
  seconds per update between consecutive `on_step_end` callbacks; phases from wrappers around TRL's
  module-level helpers (they only observe: they call the originals).
- `grpo_worker` (grpo_update.py): TRL 1.16's `GRPOTrainer`; seconds per update between consecutive
  `on_step_end` callbacks; phases from wrappers on the trainer instance that only observe.
  TRL 1.16 and 1.12 cannot share one environment: `check_grpo_python` checks the interpreter given for it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

try:  # imported as benchmarks.side_trl, or from a driver run as a script (its folder on sys.path)
    from . import harness
except ImportError:
    import harness

GRPO_TRL_VERSION = "1.16."
GRPO_TRL_INSTALL = (
    "  python -m venv /work/venv-trl116\n"
    "  /work/venv-trl116/bin/pip install torch==2.13.0           # the CPU build\n"
    "  /work/venv-trl116/bin/pip install -e '.[bench-grpo]'      # from the repository root: trl==1.16.0, psutil")


def _quiet(trainer):
    """No printer or progress-bar callbacks: `trainer`."""
    from transformers import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


# ---------------------------------------------------------------------------------- ppo_update.py: TRL 1.12 PPO
def ppo_worker(a, assets: dict) -> dict:
    harness.silence()
    import gc as real_gc

    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    s, size = harness.PPO_SETTINGS, assets["size"]
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
        seed=s["seed"] + a._round,
    )

    # --- timing and checks: wrappers around TRL's module-level helpers (they only observe)
    record = {"gen": [], "gen_end": [], "train_start": [], "gc": 0.0, "gc_per_update": [], "tokens": [],
              "rm_len": set()}
    timed_generation = harness.timed(trl_ppo.batch_generation, record["gen"], record["gen_end"])
    orig_forward, orig_get_reward = trl_ppo.forward, trl_ppo.get_reward

    def batch_generation(model, queries, *rest, **kw):
        query_responses, logits = timed_generation(model, queries, *rest, **kw)
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

    clock = harness.UpdateClock(total, a.warmup, harness.make_profiler(a.profile if a.profile_side == "trl" else None))

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()
            record["gc_per_update"].append(record["gc"])
            record["gc"] = 0.0

    trainer = _quiet(PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
        train_dataset=train, value_model=value, eval_dataset=train.select(range(batch)), callbacks=[StepTimer()],
    ))
    rss_setup, peak_setup = harness.setup_memory(trainer.model, trainer.ref_model, trainer.reward_model)
    clock.start()
    trainer.train()
    marks = clock.marks
    assert len(marks) == total, f"TRL ran {len(marks)} updates, expected {total}"
    intervals = clock.intervals()
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
        "peak_rss_mb": clock.peak_at_last_update,
        "peak_rss_process_mb": harness.peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "trl_version": trl.__version__,
    }
    return clock.profile(result, a.profile_top)


# ---------------------------------------------------------------------------------- grpo_update.py: TRL 1.16 GRPO
def check_grpo_python(python: str) -> str:
    """TRL's version in `python`, which must have trl 1.16.x and psutil (otherwise: stop, with how to make one)."""
    probe = "import trl, psutil; print(trl.__version__)"
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=harness.quiet_env())
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version.startswith(GRPO_TRL_VERSION):
        found = f"trl {version}" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(
            f"TRL's side needs trl {GRPO_TRL_VERSION}x and psutil in {python} ({found}). TRL 1.16 cannot share an "
            f"environment with TRL 1.12 (ppo_update.py): make one for it, e.g.\n{GRPO_TRL_INSTALL}\n"
            "then pass --trl-python /work/venv-trl116/bin/python"
        )
    return version


def grpo_worker(a, assets: dict) -> dict:
    harness.silence()
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if not trl.__version__.startswith(GRPO_TRL_VERSION):
        raise SystemExit(f"TRL side: found trl {trl.__version__}, need {GRPO_TRL_VERSION}x; install it apart:\n"
                         f"{GRPO_TRL_INSTALL}")
    s, total = assets.get("settings", harness.GRPO_SETTINGS), a.warmup + a.updates  # as side_llm_rl.grpo_worker
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
    reward = harness.Reward()
    marks = {"begin": [], "end": [], "rollout": [], "generate": [], "reward": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks["begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks["end"].append(time.perf_counter())

    trainer = _quiet(GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=train,
                                 processing_class=tokenizer, callbacks=[StepTimer()]))
    # TRL's phases: wrappers on the trainer instance that only observe (they call the originals)
    for name, key in (("_generate_and_score_completions", "rollout"),  # tokenize, generate, decode, rewards, advantages
                      ("_generate_single_turn", "generate"),  # model.generate and the EOS mask
                      ("_calculate_rewards", "reward")):
        setattr(trainer, name, harness.timed(getattr(trainer, name), marks[key]))
    rss_setup, _ = harness.setup_memory(trainer.model)
    gc_log = harness.GcLog()
    t_start = time.perf_counter()
    trainer.train()
    if len(marks["end"]) != total:
        raise AssertionError(f"TRL ran {len(marks['end'])} updates, expected {total}")
    ends = [t_start] + marks["end"]
    cycle = harness.intervals(t_start, marks["end"])
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
        "rss_after_setup_mb": rss_setup, "peak_rss_mb": reward.peak_mb[-1],
        "peak_rss_process_mb": harness.peak_rss_mb(), "threads": torch.get_num_threads(),
        "trl_version": trl.__version__,
    }
