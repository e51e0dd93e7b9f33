"""PPOTrainer: the loop. Every phase is one short method; the maths live in pure functions.

    for update in range(num_updates):
        rollout = self.rollout(batch)         # sample, then log-probs, values, reference log-probs
        self.score(rollout)                   # rewards -> sequence scores
        self.compute_advantages(rollout)      # token rewards (-beta*KL + score), GAE, whitening
        stats = self.optimize(rollout)        # ppo_epochs x num_mini_batches x grad accumulation
        self.kl_controller.update(...)        # adapt beta
        self.log(...); self.evaluate(); ...
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from llm_rl import checkpoint, run_dir
from llm_rl.advantages import (
    action_gae,
    compute_gae,
    grpo_advantages,
    prefix_diff_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from llm_rl.config import CRITIC_FREE, Config, ConfigError
from llm_rl.data import PromptData, PromptSampler
from llm_rl.episodes import Episodes, load_environment, run_episodes
from llm_rl.evaluation import Evaluator
from llm_rl.hub import push_folder, write_model_card
from llm_rl.kl import AdaptiveKLController, FixedKLController, kl_penalty
from llm_rl.losses import loss_normalizer, ppo_objective
from llm_rl.metrics import log_table, read_metrics, reduce_scalars, write_completions
from llm_rl.modeling import CausalLMWithValueHead, disable_dropout, gathered_for_generation
from llm_rl.ops import entropy_from_logits, masked_whiten
from llm_rl.plotting import plot_training_curves
from llm_rl.rewards import (
    RewardFn,
    RewardModel,
    check_rewards,
    compute_rewards,
    prefix_scores,
    shape_scores,
    token_rewards,
)
from llm_rl.rollout import (
    Rollout,
    bootstrap_values,
    decode_responses,
    forward_logprobs,
    generate_responses,
    score_tokens,
)

RATIO_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # half precision: 5e-2
# training metrics that are shares of their mini-batch's mean: summed over micro-batches and processes
SHARE_STATS = ("loss/policy", "loss/value", "loss/kl", "loss/total", "entropy")


class PPOTrainer:
    """Train `policy` (a CausalLMWithValueHead) with PPO against `rewards` on `prompts`.

    `ref_model`: frozen reference for the KL penalty; by default a copy of the initial policy, or,
    when the policy is a peft (LoRA) model, the policy itself with its adapter disabled (no copy).
    `eval_fn(trainer) -> dict`: optional held-out evaluation run every `eval_steps` updates
    and at the end; its numbers are logged under `eval/`.
    """

    def __init__(
        self,
        config: Config,
        policy: CausalLMWithValueHead,
        tokenizer,
        prompts: PromptData,
        rewards: list[RewardFn],
        ref_model: Optional[CausalLMWithValueHead] = None,
        accelerator: Optional[Accelerator] = None,
        eval_fn: Optional[Callable[[PPOTrainer], dict]] = None,
        eval_prompts: Optional[PromptData] = None,
        eval_rewards: Optional[list[RewardFn]] = None,
    ):
        config.validate()
        # multi-turn: an environment plays each episode and gives its rewards (llm_rl.episodes)
        spec = config.environment.environment
        self.environment = load_environment(spec) if spec is not None else None
        if not rewards and self.environment is None:
            raise ConfigError("no reward: set reward_model_name_or_path and/or reward_funcs")
        if rewards:
            check_rewards(rewards, list(prompts.columns))
        self.evaluator = None
        if eval_prompts is not None:  # the training rewards and weights unless eval rewards are given
            check_rewards(eval_rewards or rewards, list(eval_prompts.columns))
            weights = None if eval_rewards else config.reward.reward_weights
            self.evaluator = Evaluator(eval_prompts, eval_rewards or rewards, weights, config.train.eval_decoding)
        self.config, self.tokenizer, self.prompts, self.rewards, self.eval_fn = (
            config, tokenizer, prompts, rewards, eval_fn
        )
        cfg_t, cfg_p, cfg_s = config.train, config.ppo, config.sampling
        log_with = None if cfg_t.report_to == "none" else cfg_t.report_to
        self.accelerator = accelerator or Accelerator(
            log_with=log_with, project_dir=cfg_t.output_dir, gradient_accumulation_steps=cfg_p.gradient_accumulation_steps
        )
        acc = self.accelerator
        if acc.gradient_accumulation_steps != cfg_p.gradient_accumulation_steps:
            raise ConfigError(
                f"the Accelerator accumulates {acc.gradient_accumulation_steps} micro-batches but the config says "
                f"gradient_accumulation_steps={cfg_p.gradient_accumulation_steps}; create it with "
                "Accelerator(gradient_accumulation_steps=config.ppo.gradient_accumulation_steps)"
            )
        self.output_dir = Path(cfg_t.output_dir)
        self._check_output_dir()

        # ---- sizes: derived once, here, never changed later
        self.rollout_rows = cfg_p.batch_size * cfg_p.num_generations  # rows per process per update
        self.micro_batch_size = self.rollout_rows // (cfg_p.num_mini_batches * cfg_p.gradient_accumulation_steps)
        self.mini_batch_size = self.micro_batch_size * cfg_p.gradient_accumulation_steps
        self.generation_batch_size = cfg_s.generation_batch_size or self.rollout_rows
        # one epoch over one micro-batch: the training forward, taken before any step, *is* the
        # old policy, so it also gives the old log-probs and values and the rollout skips that pass
        self.fused = cfg_p.ppo_epochs == 1 and cfg_p.num_mini_batches == 1 and cfg_p.gradient_accumulation_steps == 1
        self.sampler = PromptSampler(
            len(prompts), cfg_p.batch_size, acc.num_processes, acc.process_index, cfg_t.seed, config.data.shuffle
        )
        self.num_updates = cfg_t.max_updates or max(
            1, int(cfg_t.num_train_epochs * self.sampler.updates_per_epoch)
        )
        self.stop_token_ids = self._stop_token_ids()
        critic_free = cfg_p.advantage_estimator in CRITIC_FREE
        if critic_free != (policy.v_head is None):
            raise ConfigError(
                f"advantage_estimator {cfg_p.advantage_estimator} "
                + ("trains no value head: load the policy with value_head=False" if critic_free
                   else "needs the policy's value head")
            )
        self.prefix_reward_model = self._prefix_reward_model() if cfg_p.advantage_estimator == "prefix_diff" else None

        # ---- models: dropout off so the rollout and the first training forward agree (ratio 1)
        disable_dropout(policy)
        uses_adapter = hasattr(policy.pretrained_model, "disable_adapter")  # peft: reference = adapter off
        if ref_model is None and not uses_adapter:
            ref_model = CausalLMWithValueHead(copy.deepcopy(policy.pretrained_model), value_head=False)
        if ref_model is not None:
            disable_dropout(ref_model)
            ref_model.requires_grad_(False).eval()
        if config.model.gradient_checkpointing:
            policy.pretrained_model.gradient_checkpointing_enable()
        trainable = [p for p in policy.parameters() if p.requires_grad]
        check_master_weights(policy)
        optimizer = torch.optim.AdamW(trainable, lr=cfg_p.learning_rate, weight_decay=cfg_p.weight_decay)
        steps = self.num_updates * cfg_p.ppo_epochs * cfg_p.num_mini_batches
        # transformers' "constant" ignores warmup: warmup_steps applies to every schedule
        schedule = "constant_with_warmup" if cfg_p.lr_scheduler_type == "constant" else cfg_p.lr_scheduler_type
        scheduler = get_scheduler(schedule, optimizer, cfg_p.warmup_steps, steps)
        self.model, self.optimizer, self.scheduler = acc.prepare(policy, optimizer, scheduler)
        # `steps` counts optimizer steps of this run (num_updates already reflects the process count), so the
        # schedule takes one step per optimizer step. accelerate's wrapper would take num_processes (its
        # convention for data loaders that shrink with the process count); it still skips the steps the grad
        # scaler skipped. DeepSpeed steps the schedule inside its engine, once per step, and ignores this.
        self.scheduler.split_batches = True
        if uses_adapter and acc.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            checkpoint.save_trainable_only(acc, self.model)  # the frozen base reloads from model_name_or_path
        self.ref_model = self._prepare_reference(ref_model) if ref_model is not None else None
        for reward in rewards:
            if hasattr(reward, "to"):
                reward.to(acc.device)

        self.kl_controller = (
            AdaptiveKLController(cfg_p.kl_coef, cfg_p.kl_target, cfg_p.kl_horizon)
            if cfg_p.adaptive_kl
            else FixedKLController(cfg_p.kl_coef)
        )
        # minibatch shuffling: same seed on every rank (same schedule), independent of sampling RNG
        self.shuffle_generator = torch.Generator().manual_seed(cfg_t.seed)
        self.update = 0
        set_seed(cfg_t.seed, device_specific=True)  # ranks sample different responses

    # ================================================================== setup helpers
    def _check_output_dir(self) -> None:
        """Refuse to mix two runs in one folder, unless resuming or told to overwrite (`llm_rl.run_dir`)."""
        cfg_t = self.config.train
        self.resume_path = None
        if cfg_t.resume_from_checkpoint is not None:
            self.resume_path = checkpoint.resolve_checkpoint(cfg_t.resume_from_checkpoint, self.output_dir)
            if self.resume_path is None and run_dir.completed_work(self.output_dir) and not cfg_t.overwrite_output_dir:
                raise ConfigError(
                    f"resume_from_checkpoint: latest found no checkpoint in {self.output_dir}, which holds a run "
                    "without one; set overwrite_output_dir: true to start over, or choose another output_dir"
                )
        run_dir.prepare(self.accelerator, self.output_dir, cfg_t.overwrite_output_dir,
                        resuming=self.resume_path is not None, extra=(self.tracker_run_name,))

    @property
    def tracker_run_name(self) -> str:
        """The trackers' run name; tensorboard writes under OUTPUT_DIR/<this name>."""
        return self.config.train.run_name or "llm_rl"

    def _stop_token_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        stop = self.config.sampling.stop_token
        if stop is not None:
            stop_ids = self.tokenizer.convert_tokens_to_ids([stop])
            if stop_ids[0] is None or stop_ids[0] == self.tokenizer.unk_token_id:
                raise ConfigError(f"stop_token {stop!r} is not a single token of the tokenizer")
            ids += stop_ids
        if not ids:
            raise ConfigError("the tokenizer has no eos_token and no stop_token is set: responses could never end")
        if self.tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; llm_rl.pipeline.load_tokenizer adds one")
        return ids

    def _prefix_reward_model(self) -> RewardModel:
        """prefix_diff reads the reward model at every response position: it must share the policy's tokens."""
        model = next((r for r in self.rewards if isinstance(r, RewardModel)), None)
        if model is None:
            raise ConfigError("advantage_estimator prefix_diff needs a reward model (reward_model_name_or_path)")
        if model.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(
                "advantage_estimator prefix_diff scores the policy's own tokens: the reward model must use the "
                "policy's tokenizer (same vocabulary)"
            )
        return model

    def _prepare_reference(self, ref_model: CausalLMWithValueHead) -> CausalLMWithValueHead:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            # ZeRO-3 shards every model it runs; the frozen reference takes an inference engine
            return self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        return ref_model.to(self.accelerator.device)

    # ================================================================== the loop
    def train(self) -> list[dict]:
        """Run `num_updates` PPO updates; returns the per-update metrics."""
        acc, cfg_t = self.accelerator, self.config.train
        if cfg_t.report_to != "none":
            acc.init_trackers(self.tracker_run_name, config=flat_config(self.config))
        if self.resume_path is not None:
            self.load_checkpoint(self.resume_path)
        history = []
        batches = iter(self.sampler)
        bar = tqdm(
            total=self.num_updates,
            initial=self.update,
            desc="ppo",
            disable=not (acc.is_main_process and cfg_t.progress_bar),
            dynamic_ncols=True,
        )
        train_start, eval_seconds = time.perf_counter(), 0.0  # the time budget excludes evaluation
        while self.update < self.num_updates:
            start = time.perf_counter()
            rollout, timing = self.rollout(self.prompts.batch(next(batches)), old_policy=not self.fused)
            t0 = time.perf_counter()
            reward_means = self.score(rollout)
            timing["time/reward"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if self.fused:
                train_stats, kl_per_token = self.fused_update(rollout)
            else:
                kl_per_token = self.compute_advantages(rollout)
                train_stats = self.optimize(rollout)
            timing["time/train"] = time.perf_counter() - t0
            self.update += 1
            metrics = self.rollout_metrics(rollout, kl_per_token, reward_means)
            # the horizon counts samples: the rows of every process, num_generations per prompt
            samples = self.sampler.global_batch * self.config.ppo.num_generations
            self.kl_controller.update(metrics["kl/per_sequence"], samples)
            metrics.update(train_stats)
            metrics.update(timing)
            metrics["time/update"] = time.perf_counter() - start
            metrics["time/elapsed"] = time.perf_counter() - train_start - eval_seconds
            metrics["tokens_per_second"] = metrics["response/tokens"] / metrics["time/update"]
            if self.due(cfg_t.eval_steps, at_end=True):
                t0 = time.perf_counter()
                metrics.update(self.evaluate())
                eval_seconds += time.perf_counter() - t0
            metrics = {"update": self.update, **metrics}
            history.append(metrics)
            self.log(metrics, bar)
            # multi-turn: sample episodes every logging_steps unless log_completions_steps says otherwise
            every = cfg_t.log_completions_steps or (cfg_t.logging_steps if self.environment is not None else 0)
            if every and self.due(every, at_end=False):
                self.log_completions(rollout)
            out_of_time = cfg_t.max_seconds is not None and self.global_mean(
                {"elapsed": torch.tensor(metrics["time/elapsed"])})["elapsed"] > cfg_t.max_seconds  # ranks agree
            periodic = cfg_t.save_steps and self.update % cfg_t.save_steps == 0
            if periodic or self.update == self.num_updates or out_of_time:
                self.save_checkpoint()
            if out_of_time:
                break
        bar.close()
        self.save_model(self.output_dir)
        if acc.is_main_process:
            plot_training_curves(self.output_dir / "metrics.jsonl", self.output_dir / "curves.png")
            rows = read_metrics(self.output_dir / "metrics.jsonl")  # all updates, also those before a resume
            write_model_card(self.output_dir, self.config, rows[-1] if rows else {},
                             repo_id=cfg_t.hub_model_id or "")
            if cfg_t.push_to_hub:
                url = push_folder(self.output_dir, cfg_t.hub_model_id, private=cfg_t.hub_private_repo)
                print(f"[llm_rl] pushed {self.output_dir} to {url}")
        if cfg_t.report_to != "none":
            acc.end_training()
        return history

    def due(self, every: int, at_end: bool) -> bool:
        """Whether something done every `every` updates (0: never, or only at the end) is due now."""
        return bool(every and self.update % every == 0) or (at_end and self.update == self.num_updates)

    def evaluate(self) -> dict[str, float]:
        """Held-out numbers under eval/: the config's evaluation set (`llm_rl.evaluation`), then an
        eval_fn callback's. Empty when neither is there."""
        out = self.evaluator(self) if self.evaluator is not None else {}
        if self.eval_fn is not None:
            out.update({f"eval/{k}": v for k, v in self.eval_fn(self).items()})
        return out

    # ================================================================== phases
    @torch.no_grad()
    def rollout(self, batch: dict, old_policy: bool = True) -> tuple[Rollout, dict]:
        """Sample responses and take their reference log-probs, and (`old_policy`) old log-probs and values."""
        acc, cfg_s = self.accelerator, self.config.sampling
        if self.environment is not None:
            return self.play_episodes(batch["rows"], old_policy)
        prompt_ids, prompt_mask = batch["prompt_ids"].to(acc.device), batch["prompt_mask"].to(acc.device)
        groups = self.config.ppo.num_generations  # each prompt's completions sit on consecutive rows
        if groups > 1:
            prompt_ids, prompt_mask = prompt_ids.repeat_interleave(groups, 0), prompt_mask.repeat_interleave(groups, 0)
            batch["prompts"] = [p for p in batch["prompts"] for _ in range(groups)]
            batch["prompt_messages"] = [m for m in batch["prompt_messages"] for _ in range(groups)]
            batch["columns"] = {k: [v for v in vs for _ in range(groups)] for k, vs in batch["columns"].items()}
        unwrapped = acc.unwrap_model(self.model)
        unwrapped.eval()
        t0 = time.perf_counter()
        # sampled under the same autocast as the forwards that score the tokens
        with gathered_for_generation(self.model, acc) as lm, acc.autocast():
            response_ids, response_mask, ended = generate_responses(
                lm,
                prompt_ids,
                prompt_mask,
                max_new_tokens=cfg_s.max_new_tokens,
                temperature=cfg_s.temperature,
                top_k=cfg_s.top_k,
                top_p=cfg_s.top_p,
                stop_token_ids=self.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                chunk_size=self.generation_batch_size,
            )
        t1 = time.perf_counter()
        rollout = Rollout(
            prompt_ids, prompt_mask, response_ids, response_mask, ended,
            prompts=batch["prompts"], prompt_messages=batch["prompt_messages"], columns=batch["columns"],
        )
        rollout.completions = decode_responses(self.tokenizer, response_ids, response_mask, ended)
        self.score_rollout_tokens(rollout, old_policy)
        unwrapped.train()
        return rollout, {"time/generate": t1 - t0, "time/forward": time.perf_counter() - t1}

    @torch.no_grad()
    def score_rollout_tokens(self, rollout: Rollout, old_policy: bool) -> None:
        """Reference log-probs, and (`old_policy`) the old policy's log-probs and values, of a rollout."""
        temperature = self.config.sampling.temperature
        with self.accelerator.autocast():
            if old_policy:  # through the prepared model: FSDP/ZeRO-3 gather their shards per layer
                rollout.logprobs, rollout.values = score_tokens(self.model, rollout, temperature, self.micro_batch_size)
            with self.reference() as reference:
                rollout.ref_logprobs, _ = score_tokens(
                    reference, rollout, temperature, self.micro_batch_size, reference=True
                )

    @torch.no_grad()
    def play_episodes(self, rows: list[dict], old_policy: bool) -> tuple[Rollout, dict]:
        """Multi-turn rollout: one environment per episode (num_generations per row), every turn batched.
        The bot's tokens are the actions (response_mask); observations are context (context_mask)."""
        acc, cfg_s, cfg_e = self.accelerator, self.config.sampling, self.config.environment
        rows = [row for row in rows for _ in range(self.config.ppo.num_generations)]
        unwrapped = acc.unwrap_model(self.model)
        unwrapped.eval()
        t0 = time.perf_counter()
        with gathered_for_generation(self.model, acc) as lm, acc.autocast():
            episodes: Episodes = run_episodes(
                lm, self.tokenizer, [self.environment() for _ in rows], rows, max_turns=cfg_e.max_turns,
                max_episode_tokens=cfg_e.max_episode_tokens, max_new_tokens=cfg_s.max_new_tokens,
                temperature=cfg_s.temperature, top_k=cfg_s.top_k, top_p=cfg_s.top_p,
                stop_token_ids=self.stop_token_ids, chunk_size=self.generation_batch_size, device=acc.device,
                max_prompt_length=self.config.data.max_prompt_length,
            )
        t1 = time.perf_counter()
        rollout = Rollout(
            episodes.prompt_ids, episodes.prompt_mask, episodes.response_ids, episodes.action_mask, episodes.ended,
            context_mask=episodes.response_mask, turn_ends=episodes.turn_ends, num_turns=episodes.num_turns,
            token_scores=episodes.turn_rewards, scores=torch.zeros(len(rows), device=acc.device),
            prompts=episodes.prompts, completions=episodes.transcripts,
        )
        self.score_rollout_tokens(rollout, old_policy)
        if unwrapped.v_head is not None:  # an episode cut before done goes on from V of its next state
            with acc.autocast():
                values = bootstrap_values(self.model, rollout, self.micro_batch_size)
            rollout.final_values = values * (~rollout.ended).float()
        unwrapped.train()
        return rollout, {"time/generate": t1 - t0, "time/forward": time.perf_counter() - t1}

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference model: a separate copy, or the policy with its LoRA adapter disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        with unwrapped.pretrained_model.disable_adapter():  # in place: the prepared model runs without it
            yield self.model

    def score(self, rollout: Rollout) -> dict[str, float]:
        """Scores from every reward, weighted, scaled, clipped and EOS-penalised; token-level rewards;
        prefix scores for prefix_diff. Returns each reward's mean and the count of dropped samples."""
        cfg_r, cfg_s, device = self.config.reward, self.config.sampling, self.accelerator.device
        if self.environment is not None:  # the environment scored every turn while the episode was played
            rollout.reward_values = {"environment": rollout.token_scores.sum(dim=1)}
            return {"invalid": 0.0}
        lengths = rollout.response_mask.sum(dim=1).tolist()
        completion_ids = [row[:n] for row, n in zip(rollout.response_ids.tolist(), lengths)]
        result = compute_rewards(
            self.rewards, cfg_r.reward_weights, rollout.prompts, rollout.completions, rollout.columns,
            prompt_messages=rollout.prompt_messages,
            completion_ids=completion_ids, skip_invalid=cfg_r.skip_invalid_rewards,
        )
        rollout.reward_values = result.rows
        valid = result.valid.to(device)
        # a dropped sample keeps no response tokens: no reward, no KL, no loss
        rollout.response_mask = rollout.response_mask * valid[:, None].long()
        rollout.scores = shape_scores(
            result.scores.to(device), rollout.ended,
            scale=cfg_r.reward_scale, clip=cfg_r.reward_clip, missing_eos_penalty=cfg_s.missing_eos_penalty,
        )
        if result.token_scores is not None:
            width = rollout.response_ids.shape[1]
            rollout.token_scores = (cfg_r.reward_scale * result.token_scores[:, :width]).to(device)
        if self.prefix_reward_model is not None:
            with torch.no_grad():
                prompt_score, prefix = prefix_scores(
                    self.prefix_reward_model, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1]
                )
            # in score units: the reward model's weight x scale (clipping and missing_eos_penalty act on the
            # whole score, which prefix_diff takes as the terminal reward)
            weights = cfg_r.reward_weights or [1.0] * len(self.rewards)
            unit = cfg_r.reward_scale * weights[self.rewards.index(self.prefix_reward_model)]
            rollout.prefix_scores = (unit * prefix, unit * prompt_score)
        return {**result.means, "invalid": float((~valid).sum())}

    def compute_advantages(self, rollout: Rollout) -> torch.Tensor:
        """Token rewards, then advantages (and returns for the value head) by the configured estimator.

        Returns the per-token KL (batch, resp_len)."""
        cfg_p = self.config.ppo
        mask = rollout.response_mask
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, cfg_p.kl_estimator_in_use, mask)
        beta = self.kl_controller.value if cfg_p.kl_placement == "reward" else 0.0
        # r_t = -beta * KL_t (+ token-level rewards) (+ the score on the last token)
        rewards = token_rewards(rollout.scores, kl, mask, beta)
        if rollout.token_scores is not None:
            rewards = rewards + rollout.token_scores * mask
        if self.config.reward.whiten_rewards:
            rewards = self.whiten(rewards, mask, shift_mean=False)
        if rollout.context_mask is not None:  # multi-turn: GAE over the bot's tokens, skipping observations
            return self.episode_advantages(rollout, rewards, kl)
        estimator, returns, whiten = cfg_p.advantage_estimator, None, cfg_p.whiten_advantages
        if estimator == "gae":
            advantages, returns = compute_gae(rewards, rollout.values, mask, cfg_p.gamma, cfg_p.lam)
        elif estimator in ("grpo", "rloo"):
            sequence_return = (rewards * mask).sum(dim=1)  # score + token rewards - beta * KL
            kept = mask.sum(dim=1) > 0  # a row dropped for an invalid reward has no tokens and joins no group statistic
            group_fn = grpo_advantages if estimator == "grpo" else rloo_advantages
            advantages = group_fn(sequence_return, cfg_p.num_generations, valid=kept)[:, None] * mask
            whiten = whiten and estimator == "rloo"  # grpo is normalised per group already
        elif estimator == "reinforce_pp":
            advantages = reinforce_pp_advantages(rewards, mask, cfg_p.gamma, reduce=self.sum_over_processes)
            whiten = False  # whitened inside
        else:  # prefix_diff: the reward model's prefix scores as the critic of TD(0), A_t = r_t + Q_t - Q_{t-1}
            prefix, prompt_score = rollout.prefix_scores
            advantages = prefix_diff_advantages(prefix, prompt_score, mask, rewards)
        if whiten:
            advantages = self.whiten(advantages, mask)
        rollout.token_rewards, rollout.advantages, rollout.returns = rewards, advantages, returns
        return kl

    def episode_advantages(self, rollout: Rollout, rewards: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """Advantages of multi-turn episodes: each turn's reward on its last token, -beta * KL on every bot
        token; gamma per turn boundary (discount: turn) or per bot token (token); episodes cut before done
        bootstrap from V of their next state. Critic-free estimators take the episode's discounted return."""
        cfg_p, mask = self.config.ppo, rollout.response_mask
        turn_ends = rollout.turn_ends if self.config.environment.discount == "turn" else None
        estimator, returns, whiten = cfg_p.advantage_estimator, None, cfg_p.whiten_advantages
        if estimator == "gae":
            advantages, returns = action_gae(rewards, rollout.values, mask, cfg_p.gamma, cfg_p.lam, turn_ends,
                                             rollout.final_values)
        else:
            _, to_go = action_gae(rewards, torch.zeros_like(rewards), mask, cfg_p.gamma, 1.0, turn_ends)
            if estimator == "reinforce_pp":  # the discounted return to go, whitened over the batch
                advantages, whiten = self.whiten(to_go, mask), False
            else:
                first = mask.float().argmax(dim=1)  # first bot token: the episode's discounted return
                episode_return = to_go.gather(1, first[:, None])[:, 0]
                group_fn = grpo_advantages if estimator == "grpo" else rloo_advantages
                advantages = group_fn(episode_return, cfg_p.num_generations)[:, None] * mask
                whiten = whiten and estimator == "rloo"
        if whiten:
            advantages = self.whiten(advantages, mask)
        rollout.token_rewards, rollout.advantages, rollout.returns = rewards, advantages, returns
        return kl

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor.to(self.accelerator.device), "sum")

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """Whitening with the mean and variance of the whole batch, over every process."""
        return masked_whiten(x, mask, shift_mean=shift_mean, reduce=self.sum_over_processes)

    def optimize(self, rollout: Rollout) -> dict[str, float]:
        """ppo_epochs x num_mini_batches optimizer steps, each over gradient_accumulation_steps micro-batches.

        Each micro-batch's loss is normalised by the global count of its mini-batch (`global_count`), so the
        update is the same however the mini-batch is split over micro-batches and processes."""
        cfg_p, acc = self.config.ppo, self.accelerator
        sums: dict[str, torch.Tensor] = {}
        for epoch in range(cfg_p.ppo_epochs):
            order = torch.randperm(len(rollout), generator=self.shuffle_generator).to(acc.device)
            for mini in range(cfg_p.num_mini_batches):
                mini_rows = order[mini * self.mini_batch_size : (mini + 1) * self.mini_batch_size]
                normalizer = self.global_count(rollout.response_mask[mini_rows])
                for micro in range(cfg_p.gradient_accumulation_steps):
                    rows = mini_rows[micro * self.micro_batch_size : (micro + 1) * self.micro_batch_size]
                    # accelerate skips the gradient all-reduce (DDP) or the engine step (DeepSpeed)
                    # until the last micro-batch
                    with acc.accumulate(self.model):
                        stats = self.train_step(trim_responses(rollout.select(rows)), normalizer)
                        if acc.sync_gradients:
                            stats.update(self.apply_gradients())
                    if epoch == 0 and mini == 0 and micro == 0:
                        self.check_first_ratio(stats["policy/ratio_max_dev"])
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
        steps = cfg_p.ppo_epochs * cfg_p.num_mini_batches
        means = self.update_stats(sums, steps, steps * cfg_p.gradient_accumulation_steps)
        means["lr"] = self.scheduler.get_last_lr()[0]
        return means

    def fused_update(self, rollout: Rollout) -> tuple[dict[str, float], torch.Tensor]:
        """The whole update when it is one epoch over one micro-batch: a single training forward gives
        the old log-probs and values (detached), then advantages, loss, backward and one step."""
        logprobs, values, logits = self.forward(rollout)
        valid = rollout.response_mask.bool()
        rollout.logprobs = logprobs.detach().float().masked_fill(~valid, 0.0)
        if values is not None:
            rollout.values = values.detach().float().masked_fill(~valid, 0.0)
        kl = self.compute_advantages(rollout)
        stats = self.loss_and_backward(rollout, logprobs, values, logits, self.global_count(rollout.response_mask))
        stats.update(self.apply_gradients())
        means = self.update_stats(stats, 1, 1)
        means["lr"] = self.scheduler.get_last_lr()[0]
        return means, kl

    def global_count(self, mask: torch.Tensor) -> torch.Tensor:
        """What a mini-batch's losses are divided by: its tokens (token_mean) or sequences
        (seq_mean_token_mean) on every process, `mask` (rows, resp_len) being this process's part."""
        count = loss_normalizer(mask, self.config.ppo.loss_agg).to(self.accelerator.device)
        return self.accelerator.reduce(count, "sum")  # one all-reduce per mini-batch

    def update_stats(self, sums: dict[str, torch.Tensor], steps: int, micro_batches: int) -> dict[str, float]:
        """An update's training metrics from this process's sums over its micro-batches, in one collective.

        Loss terms are shares of their mini-batch's mean: summed over micro-batches and processes they
        give it, then averaged over the `steps` mini-batches. Other stats are means per micro-batch,
        averaged over micro-batches and processes; grad_norm over the steps that were applied."""
        n = self.accelerator.num_processes
        applied = max(steps - float(sums.get("optimizer/skipped_steps", 0.0)), 1.0)
        divisors = {"grad_norm": applied * n, "optimizer/skipped_steps": n}
        return self.global_sum({
            k: v / (steps if k in SHARE_STATS else divisors.get(k, micro_batches * n)) for k, v in sums.items()
        })

    def apply_gradients(self) -> dict[str, torch.Tensor]:
        """Clip the global grad norm, step optimizer and schedule. Returns the norm before clipping
        (`grad_norm`, 0 for a skipped step) and whether the step was skipped (`optimizer/skipped_steps`).

        Under fp16 a non-finite gradient is what the loss scaler is for: the step is skipped, the scale
        lowered, and the schedule does not advance. Only a non-finite gradient it cannot explain stops the run."""
        cfg_p, acc = self.config.ppo, self.accelerator
        grad_norm = None
        if cfg_p.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg_p.max_grad_norm)
        if grad_norm is not None:  # DeepSpeed may not report it
            grad_norm = torch.as_tensor(grad_norm).float().detach()
            if not torch.isfinite(grad_norm) and not self.loss_scale_may_overflow():
                raise FloatingPointError(
                    f"update {self.update + 1}: the gradient norm is {grad_norm.item()}; nothing was "
                    "applied and the last checkpoint is intact. Lower learning_rate or check the rewards."
                )
        self.optimizer.step()
        skipped = bool(self.optimizer.step_was_skipped)
        self.scheduler.step()  # accelerate's wrapper does not step when the optimizer step was skipped
        self.optimizer.zero_grad(set_to_none=True)
        stats = {"optimizer/skipped_steps": torch.tensor(float(skipped))}
        if grad_norm is not None:
            stats["grad_norm"] = torch.zeros_like(grad_norm) if skipped else grad_norm
        return stats

    def loss_scale_may_overflow(self) -> bool:
        """Whether a non-finite gradient may be a loss-scale overflow, which the optimizer step skips while
        the scale shrinks: fp16 with a scale still above 1 (at 1 or below the unscaled gradient overflows)."""
        acc = self.accelerator
        if acc.scaler is not None:  # torch's GradScaler
            return acc.scaler.get_scale() > 1.0
        return acc.distributed_type == DistributedType.DEEPSPEED and acc.mixed_precision == "fp16"  # its own scaler

    def forward(self, batch: Rollout):
        """Training forward (with grad): log-probs (batch, resp_len), values or None, logits."""
        return forward_logprobs(
            self.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.region_mask,
            self.config.sampling.temperature,
        )

    def train_step(self, batch: Rollout, normalizer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss on one micro-batch and its backward; returns detached stats."""
        logprobs, values, logits = self.forward(batch)
        return self.loss_and_backward(batch, logprobs, values, logits, normalizer)

    def loss_and_backward(self, batch: Rollout, logprobs, values, logits, normalizer) -> dict[str, torch.Tensor]:
        """PPO loss of a micro-batch from its training forward, and its backward; returns detached stats.

        Every term (policy, value, entropy, KL) is this micro-batch's share of its mini-batch's mean: the
        sum of its per-token (or per-sequence) terms over `normalizer`, the mini-batch's global count."""
        cfg_p, acc = self.config.ppo, self.accelerator
        loss, stats = ppo_objective(
            logprobs, batch.logprobs, batch.advantages, batch.response_mask,
            token_entropy=entropy_from_logits(logits.detach() if cfg_p.ent_coef == 0 else logits,
                                              self.config.sampling.temperature),
            values=values, old_values=batch.values, returns=batch.returns,
            ref_logprobs=batch.ref_logprobs if cfg_p.kl_placement == "loss" else None,
            clip_range=cfg_p.clip_range, dual_clip=cfg_p.dual_clip, clip_range_value=cfg_p.clip_range_value,
            vf_coef=cfg_p.vf_coef, ent_coef=cfg_p.ent_coef, kl_coef=self.kl_controller.value,
            kl_estimator=cfg_p.kl_estimator_in_use, loss_agg=cfg_p.loss_agg, normalizer=normalizer,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"update {self.update + 1}: the loss is {loss.item()} (policy {stats['loss/policy'].item()}, value "
                f"{stats['loss/value'].item()}); lower learning_rate, check rewards for huge values, or set max_grad_norm"
            )
        # accelerate divides the loss by gradient_accumulation_steps (DeepSpeed's engine too), and DDP, FSDP and
        # DeepSpeed average gradients over processes: undo both, so that the shares' gradients add up, over
        # micro-batches and processes, to the gradient of the mini-batch's mean
        acc.backward(loss * (acc.gradient_accumulation_steps * acc.num_processes))
        return stats

    def check_first_ratio(self, max_dev: torch.Tensor) -> None:
        """Before any step the new/old ratio must be 1; otherwise rollout and training disagree."""
        dtype = next(self.model.parameters()).dtype
        if self.accelerator.mixed_precision != "no":
            dtype = torch.bfloat16
        tolerance = RATIO_TOLERANCE.get(dtype, 5e-2)
        if float(max_dev) > tolerance:
            warnings.warn(
                f"update {self.update + 1}: on the first minibatch the PPO ratio deviates from 1 by "
                f"{float(max_dev):.2e} (> {tolerance:g}). Rollout and training forwards disagree: check padding, "
                "position ids, dropout, or a sampling temperature applied differently.",
                RuntimeWarning,
                stacklevel=2,
            )

    # ================================================================== metrics, logging, saving
    def rollout_metrics(self, rollout: Rollout, kl: torch.Tensor, reward_means: dict) -> dict[str, float]:
        """What the rollout produced, over all processes: totals are summed in one collective and
        divided afterwards, so means and variances are exact, not means of per-process means."""
        mask = rollout.response_mask.float()
        kept = mask.sum(dim=1) > 0  # samples not dropped for an invalid reward
        totals = {
            "rows": torch.tensor(float(len(rollout))),
            "kept": kept.float().sum(),
            "tokens": mask.sum(),
            "ended": rollout.ended.float().sum(),
            "score": rollout.scores.float()[kept].sum(),
            "kl": kl.sum(),
            "token_reward": (rollout.token_rewards * mask).sum(),
            **{f"reward/{k}": torch.tensor(v * float(kept.sum())) for k, v in reward_means.items() if k != "invalid"},
            "reward/invalid": torch.tensor(reward_means.get("invalid", 0.0)),
        }
        if rollout.num_turns is not None:  # multi-turn episodes
            totals.update({"turns": rollout.num_turns.float().sum(), "episode_reward": rollout.token_scores.sum()})
        if rollout.values is not None:
            values, returns = rollout.values, rollout.returns
            totals.update({
                "value": (values * mask).sum(),
                "return": (returns * mask).sum(),
                "return_sq": (returns**2 * mask).sum(),
                "residual_sq": ((returns - values) ** 2 * mask).sum(),
            })
        g = self.global_sum(totals)
        kept_rows, tokens = max(g["kept"], 1.0), max(g["tokens"], 1.0)
        out = {
            "score/mean": g["score"] / kept_rows,
            "kl/per_sequence": g["kl"] / kept_rows,
            "kl/per_token": g["kl"] / tokens,
            "kl/beta": self.kl_controller.value,
            "response/length": g["tokens"] / kept_rows,
            "response/eos_rate": g["ended"] / g["rows"],
            "response/tokens": g["tokens"],
            "token_reward/mean": g["token_reward"] / tokens,
            "reward/invalid": g["reward/invalid"],
            **{k: v / kept_rows for k, v in g.items() if k.startswith("reward/") and k != "reward/invalid"},
        }
        if rollout.num_turns is not None:
            out.update({
                "episode/turns": g["turns"] / g["rows"],
                "episode/return": g["episode_reward"] / g["rows"],  # undiscounted sum of the turn rewards
                "episode/turn_reward": g["episode_reward"] / max(g["turns"], 1.0),
                "episode/done_rate": g["ended"] / g["rows"],
            })
        if rollout.values is not None:
            var_returns = g["return_sq"] / tokens - (g["return"] / tokens) ** 2
            out["value/mean"] = g["value"] / tokens
            out["value/explained_variance"] = 1.0 - (g["residual_sq"] / tokens) / max(var_returns, 1e-8)
        return out

    def global_sum(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        return reduce_scalars(self.accelerator, values, "sum")

    def global_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        return reduce_scalars(self.accelerator, values, "mean")

    def log(self, metrics: dict, bar) -> None:
        acc = self.accelerator
        if self.config.train.report_to != "none":
            acc.log(metrics, step=self.update)
        if acc.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            bar.update(1)
            if self.update % self.config.train.logging_steps == 0 or self.update == self.num_updates:
                bar.write(summary_line(metrics))

    def log_completions(self, rollout: Rollout) -> None:
        """The first log_completions_count samples of this process's rollout (prompt, completion, each
        reward, mean advantage over the response tokens) to completions.jsonl and the trackers."""
        if not self.accelerator.is_main_process:
            return
        count = min(self.config.train.log_completions_count, len(rollout))
        mask = rollout.response_mask[:count].float()
        advantages = ((rollout.advantages[:count] * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
        rows = [
            {"prompt": rollout.prompts[i], "completion": rollout.completions[i],
             **{f"reward/{name}": float(values[i]) for name, values in rollout.reward_values.items()},
             "score": float(rollout.scores[i]), "advantage": advantages[i]}
            for i in range(count)
        ]
        write_completions(self.output_dir / "completions.jsonl", self.update, rows)
        log_table(self.accelerator, "completions", rows, self.update)

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly: weights, optimizer, scheduler, RNGs of every process,
        data position, KL controller. Written to a temporary folder and renamed when complete."""
        acc, cfg_t = self.accelerator, self.config.train
        tmp = checkpoint.temporary_dir(self.output_dir, self.update)
        final = checkpoint.checkpoint_dir(self.output_dir, self.update)
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        with checkpoint.quiet_shared_tensor_warning():
            acc.save_state(str(tmp), safe_serialization=True)  # every rank writes its own RNG state
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "update": self.update,
                "num_updates": self.num_updates,
                "sampler": self.sampler.state_dict(),
                "kl_controller": self.kl_controller.state_dict(),
                "shuffle_generator": self.shuffle_generator.get_state().tolist(),
            }
            checkpoint.finalize(tmp, final, state)
            checkpoint.rotate(self.output_dir, cfg_t.save_total_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint written by `save_checkpoint`, and drop metrics logged after it."""
        acc = self.accelerator
        try:
            acc.load_state(str(path))
            state = checkpoint.read_state(path)
        except Exception as e:  # a damaged file: name it and the checkpoint before
            error = checkpoint.load_error(path, e)
            if error is e:
                raise
            raise error from e
        self.update = int(state["update"])
        self.sampler.load_state_dict(state["sampler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.shuffle_generator.set_state(torch.tensor(state["shuffle_generator"], dtype=torch.uint8))
        if acc.is_main_process:
            metrics = self.output_dir / "metrics.jsonl"
            kept = [row for row in read_metrics(metrics) if row["update"] <= self.update]
            metrics.write_text("".join(json.dumps(row) + "\n" for row in kept))
            print(f"[llm_rl] resumed from {path} at update {self.update}")
        acc.wait_for_everyone()

    def save_model(self, directory: Path) -> None:
        """Policy (plain causal LM), value head, tokenizer and the config used; main process writes."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)  # every rank joins: gathers ZeRO-3/FSDP shards
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(
                directory, state_dict=state_dict, merge_adapter=self.config.model.merge_adapter
            )
            self.tokenizer.save_pretrained(directory)
            self.config.save_yaml(Path(directory) / "config.yaml")
        acc.wait_for_everyone()


def check_master_weights(policy: CausalLMWithValueHead) -> None:
    """Refuse to train weights stored in half precision: an AdamW step of lr ~1e-6 is far below
    bf16's resolution (8 bits of mantissa) for almost every weight, so most updates round away."""
    half = sorted({str(p.dtype).removeprefix("torch.") for p in policy.parameters()
                   if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})
    if half:
        raise ConfigError(
            f"the policy's trainable weights are {', '.join(half)}: AdamW would update them in that precision and "
            "most small updates would round away. Load them in float32 (torch_dtype: float32) and compute in half "
            "precision with accelerate's mixed precision (accelerate launch --mixed_precision bf16, or the "
            "accelerate_configs/*.yaml files). With use_peft a half-precision base is fine: the adapters train in float32."
        )


def trim_responses(batch: Rollout) -> Rollout:
    """Drop response columns that are padding in every row of this micro-batch (multi-turn: columns
    after the last bot token, whose observations no loss reads)."""
    last = batch.response_mask * torch.arange(1, batch.response_mask.shape[1] + 1, device=batch.response_mask.device)
    longest = max(int(last.max()), 1)
    for name in ("response_ids", "response_mask", "context_mask", "turn_ends", "logprobs", "values", "ref_logprobs",
                 "token_rewards", "advantages", "returns"):
        tensor = getattr(batch, name)
        if tensor is not None:
            setattr(batch, name, tensor[:, :longest])
    return batch


def summary_line(metrics: dict) -> str:
    keys = [("score/mean", "score"), ("episode/return", "return"), ("episode/turns", "turns"),
            ("kl/per_sequence", "kl"), ("kl/beta", "beta"), ("entropy", "ent"), ("loss/policy", "pg"), ("loss/value", "vf"), ("policy/clipfrac", "clip"),
            ("response/length", "len"), ("time/update", "s")]
    parts = [f"update {metrics['update']}"]
    parts += [f"{short} {metrics[k]:.4g}" for k, short in keys if k in metrics and math.isfinite(metrics[k])]
    parts += [f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("eval/")]
    return " | ".join(parts)


def flat_config(config: Config) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for section in config.to_dict().values() for k, v in section.items()}
