"""PPOTrainer: the loop. Each phase is one short method that returns a value; the maths are pure functions.

    rollout = self.sampler.sample(batch)             # 1. Rollout: sampled token ids, masks, texts
    scores = self.scorer.score(rollout, state)       # 2. Scores: every reward, shaped (state: updates done)
    rollout = self.old_and_reference(rollout)        # 3. old policy's log-probs + values, the reference's
    rollout, forward = self.fused_old_policy(rollout)  #   (fused update: the first training forward is the old policy)
    targets = self.targets(rollout, scores)          # 4. Targets: KL, token rewards, advantages, returns
    stats = self.optimize(rollout, targets, forward) # 5. ppo_epochs x num_mini_batches x grad accumulation
    metrics = self.collect_metrics(...)              # 6. adapt beta, evaluate, callbacks; then log, save

The sampler and the scorer are chosen once, when the trainer is built: single responses or multi-turn
episodes, reward functions or an environment's turn rewards. "Update" always means one pass of this loop.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from llm_rl.algorithms.advantages import ESTIMATORS
from llm_rl.algorithms.kl import AdaptiveKLController, FixedKLController
from llm_rl.algorithms.losses import PPOCoefficients, loss_normalizer, ppo_objective
from llm_rl.algorithms.rollout_correction import importance_weights
from llm_rl.algorithms.scores import Scores
from llm_rl.algorithms.targets import Targets, compute_targets
from llm_rl.config.errors import ConfigError, OutOfMemoryError
from llm_rl.config.sections import Config
from llm_rl.config.variants import ADVANTAGE_ESTIMATORS
from llm_rl.data.prompts import PromptData, PromptSampler
from llm_rl.models.forward import forward_logprobs
from llm_rl.models.value_head import (
    CausalLMWithValueHead,
    disable_dropout,
    enable_activation_checkpointing,
    eval_mode,
)
from llm_rl.reporting.hub import model_card
from llm_rl.reporting.metrics import log_table, write_completions
from llm_rl.reporting.plotting import plot_training_curves
from llm_rl.rewards.functions import RewardFn, TrainerState, check_rewards
from llm_rl.rewards.scoring import EnvironmentScorer, RewardScorer, prefix_reward_model
from llm_rl.sampling.episodes import EpisodeSampler, load_environment
from llm_rl.sampling.hf import HFSampler
from llm_rl.sampling.rollout import Rollout, bootstrap_values, logprobs_and_values
from llm_rl.sampling.sampler import Sampler, SamplingSettings
from llm_rl.sampling.tool_env import load_tool_environment
from llm_rl.training import output_dir as run_dir
from llm_rl.training.callbacks import TrainerCallback
from llm_rl.training.evaluation import Evaluator
from llm_rl.training.ppo_metrics import completion_rows, mismatch_metrics, rollout_metrics, summary_line
from llm_rl.training.run import TrainingRun

RATIO_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # half precision: 5e-2
# training metrics that are shares of their mini-batch's mean: summed over micro-batches and processes
SHARE_STATS = ("loss/policy", "loss/value", "loss/kl", "loss/total", "entropy")


class PPOTrainer(TrainingRun):
    """Train `policy` (a CausalLMWithValueHead) with PPO against `rewards` on `prompts`.

    `ref_model`: frozen reference for the KL penalty; by default a copy of the initial policy, or,
    when the policy is a peft (LoRA) model, the policy itself with its adapter disabled (no copy).
    `callbacks`: `llm_rl.training.callbacks.TrainerCallback`s, e.g. a held-out evaluation (`on_evaluate`, logged
    under `eval/`) or a benchmark's timer (`on_update_end`).
    Accelerator, output folder, logging, checkpoints and the saved model: `llm_rl.training.run.TrainingRun`.
    """

    name = "ppo"
    step_key = "update"
    hub_commit_message = "llm_rl PPO"

    def __init__(
        self,
        config: Config,
        policy: CausalLMWithValueHead,
        tokenizer,
        prompts: PromptData,
        rewards: list[RewardFn],
        ref_model: Optional[CausalLMWithValueHead] = None,
        accelerator: Optional[Accelerator] = None,
        callbacks: Sequence[TrainerCallback] = (),
        eval_prompts: Optional[PromptData] = None,
        eval_rewards: Optional[list[RewardFn]] = None,
        environment=None,
    ):
        config.validate()
        # multi-turn: an environment plays each episode and gives its rewards (llm_rl.sampling.episodes);
        # `environment`: what `episode_environment` gives, when built before the model loaded
        environment = episode_environment(config, tokenizer) if environment is None else environment
        check_run_rewards(rewards, prompts, environment)
        self.evaluator = None
        if eval_prompts is not None:  # the training rewards and weights unless eval rewards are given
            check_rewards(eval_rewards or rewards, list(eval_prompts.columns))
            weights = None if eval_rewards else config.reward.reward_weights
            self.evaluator = Evaluator(eval_prompts, eval_rewards or rewards, weights, config.train.eval_decoding)
        self.config, self.tokenizer, self.prompts, self.rewards = config, tokenizer, prompts, rewards
        self.callbacks = list(callbacks)
        ppo, train = config.ppo, config.train
        super().__init__(config, train, ppo.gradient_accumulation_steps, accelerator)  # folder checked, resume found

        # ---- sizes: derived once, here, never changed later
        self.rollout_rows = ppo.batch_size * ppo.num_generations  # rows per process per update
        self.micro_batch_size = self.rollout_rows // (ppo.num_mini_batches * ppo.gradient_accumulation_steps)
        self.mini_batch_size = self.micro_batch_size * ppo.gradient_accumulation_steps
        # one epoch over one micro-batch: the training forward, taken before any step, *is* the
        # old policy, so it also gives the old log-probs and values and phase 3 skips that pass
        self.fused = ppo.ppo_epochs == 1 and ppo.num_mini_batches == 1 and ppo.gradient_accumulation_steps == 1
        self.prompt_sampler = PromptSampler(len(prompts), ppo.batch_size, self.accelerator.num_processes,
                                            self.accelerator.process_index, train.seed, config.data.shuffle)
        self.num_updates = train.max_updates or max(1, int(train.num_train_epochs * self.prompt_sampler.updates_per_epoch))
        self.sampling = SamplingSettings.from_config(config.sampling, tokenizer, self.rollout_rows)
        estimator = ADVANTAGE_ESTIMATORS[ppo.advantage_estimator]
        prefix_model = (prefix_reward_model(rewards, tokenizer, ppo.advantage_estimator)
                        if estimator.needs_reward_model else None)
        # the reference's log-probs are read by the KL penalty only: with kl_coef 0 (and no adaptive
        # controller to raise it) no reference is kept or run
        self.uses_reference = ppo.kl_coef > 0 or ppo.adaptive_kl
        self._prepare_models(policy, ref_model)
        self.sampler = self._build_sampler(environment)
        reward_scorer = (RewardScorer(rewards, config.reward, config.sampling, self.accelerator.device, prefix_model)
                         if rewards else None)
        self.scorer = EnvironmentScorer(reward_scorer) if environment is not None else reward_scorer
        self.kl_controller = (
            AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl
            else FixedKLController(ppo.kl_coef)
        )
        # minibatch shuffling: same seed on every rank (same schedule), independent of sampling RNG
        self.shuffle_generator = torch.Generator().manual_seed(train.seed)
        set_seed(train.seed, device_specific=True)  # ranks sample different responses

    def _build_sampler(self, environment: Optional[type]) -> Sampler:
        """The run's rollout engine, chosen once. A group's prompt runs once (in generation and in the
        forwards) unless the model is sharded: FSDP / DeepSpeed run that extra prompt forward untested."""
        ppo, acc = self.config.ppo, self.accelerator
        sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        engine = self._vllm_engine(sharded) if self.config.sampling.rollout_engine == "vllm" else None
        if environment is None:
            if engine is not None:
                from llm_rl.sampling.vllm import VLLMSampler

                return VLLMSampler(engine, self.tokenizer, ppo.num_generations)
            return HFSampler(self.model, acc, self.tokenizer, self.sampling, ppo.num_generations,
                             share_prompts=not sharded)
        env = self.config.environment
        return EpisodeSampler(self.model, acc, self.tokenizer, self.sampling, environment, ppo.num_generations,
                              max_turns=env.max_turns, max_episode_tokens=env.max_episode_tokens,
                              max_prompt_length=self.config.data.max_prompt_length, engine=engine)

    def _vllm_engine(self, sharded: bool):
        """A vLLM engine in this process, built after the run set its threads; one per process, each pushed this
        process's (identical) policy weights before every rollout, and seeded by rank."""
        from llm_rl.sampling.vllm import VLLMEngine, engine_length

        if sharded:
            raise ConfigError("rollout_engine: vllm pushes whole weights from each process: FSDP / DeepSpeed shard "
                              "them; use DDP (accelerate_configs/multi_gpu.yaml or cpu.yaml) or rollout_engine: hf")
        config, acc = self.config, self.accelerator
        length = engine_length(config, acc.unwrap_model(self.model).pretrained_model.config)  # DDP wraps it
        return VLLMEngine(self.model, acc, self.sampling, config.sampling, config.model.model_name_or_path, length,
                          seed=config.train.seed + acc.process_index)

    def _prepare_models(self, policy: CausalLMWithValueHead, ref_model: Optional[CausalLMWithValueHead]) -> None:
        """Policy (with its optimizer and schedule), reference and reward models on their devices; dropout
        off, so that the rollout and the first training forward agree (ratio 1)."""
        ppo = self.config.ppo
        needs_values = ESTIMATORS[ppo.advantage_estimator].needs_values
        if needs_values != (policy.v_head is not None):
            raise ConfigError(
                f"advantage_estimator {ppo.advantage_estimator} "
                + ("needs the policy's value head" if needs_values
                   else "trains no value head: load the policy with value_head=False")
            )
        disable_dropout(policy)
        uses_adapter = hasattr(policy.pretrained_model, "disable_adapter")  # peft: reference = adapter off
        if not self.uses_reference:
            ref_model = None
        elif ref_model is None and not uses_adapter:
            ref_model = CausalLMWithValueHead(copy.deepcopy(policy.pretrained_model), value_head=False)
        if ref_model is not None:
            disable_dropout(ref_model)
            ref_model.requires_grad_(False).eval()
        if self.config.model.gradient_checkpointing:
            enable_activation_checkpointing(policy.pretrained_model)
        self._choose_logprob_path(policy, ref_model)
        check_master_weights(policy)
        # optimizer steps of this run (num_updates already reflects the process count)
        steps = self.num_updates * ppo.ppo_epochs * ppo.num_mini_batches
        self.prepare_training(policy, ppo, steps, trainable_only=uses_adapter)
        # training mode for the training forwards (gradient checkpointing recomputes only there; dropout is off);
        # the no-grad passes switch to eval and back (`eval_mode` restores each module's own flag)
        self.model.train()
        self.ref_model = self._prepare_reference(ref_model) if ref_model is not None else None
        for reward in self.rewards:
            if hasattr(reward, "to"):
                reward.to(self.accelerator.device)

    def _choose_logprob_path(self, policy: CausalLMWithValueHead, ref_model: Optional[CausalLMWithValueHead]) -> None:
        """`chunked_logprobs` on the policy and the reference: log-probs and entropy in chunks from the lm head's
        input, where the check at load found that exact; off under FSDP / DeepSpeed (sharded heads, untested)."""
        wanted = self.config.model.chunked_logprobs
        if wanted and self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            warnings.warn("chunked_logprobs is off under FSDP / DeepSpeed: log-probs come from the full logits",
                          RuntimeWarning, stacklevel=3)
            wanted = False
        for model in (policy, ref_model):
            if model is not None:
                model.use_chunked_logprobs(wanted)

    def _prepare_reference(self, ref_model: CausalLMWithValueHead) -> CausalLMWithValueHead:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            # ZeRO-3 shards every model it runs; the frozen reference takes an inference engine
            return self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        return ref_model.to(self.accelerator.device)

    # ================================================================== the loop
    def train(self) -> list[dict]:
        """Run `num_updates` PPO updates; returns the per-update metrics."""
        if self.accelerator.is_main_process:
            print(self.startup_summary(), flush=True)
        self.start(self.num_updates)  # trackers, resume, progress bar
        history = []
        batches = iter(self.prompt_sampler)
        self.train_start, self.eval_seconds = time.perf_counter(), 0.0  # the time budget excludes evaluation
        while self.update < self.num_updates:
            start, timing = time.perf_counter(), {}
            with self.phase(timing, "time/generate"):
                rollout = self.sampler.sample(self.prompts.batch(next(batches)))  # 1. token ids, masks, texts
            timing.update(getattr(self.sampler, "timing", {}))  # an engine's own phases (vllm: time/weight_sync)
            with self.phase(timing, "time/reward"):
                scores = self.scorer.score(rollout, TrainerState(self.update, self.num_updates))  # 2. rewards -> scores
            with self.phase(timing, "time/forward"):
                rollout = self.old_and_reference(rollout)  # 3. old policy (unless fused) and reference, no grad
            with self.phase(timing, "time/train"):
                rollout, first_forward = self.fused_old_policy(rollout)  # 3. fused: the training forward is the old policy
                targets = self.targets(rollout, scores)  # 4. KL, token rewards, advantages, value targets
                train_stats = self.optimize(rollout, targets, first_forward)  # 5. the PPO epochs
            self.update += 1
            # 6. metrics (the KL coefficient adapts, due evaluations run), logs, samples, checkpoint
            metrics = self.collect_metrics(rollout, scores, targets, {**train_stats, **timing}, start)
            history.append(metrics)
            self.bar.update(1)
            self.log(metrics, summary_line(metrics) if self.due(self.config.train.logging_steps, at_end=True) else None)
            self.log_completions_if_due(rollout, scores, targets)
            if self.checkpoint_if_due(metrics["time/elapsed"]):  # out of time
                break
        self.finish()  # model, card, curves, Hub push, trackers closed
        for callback in self.callbacks:
            callback.on_train_end(self, history)
        return history

    def startup_summary(self) -> str:
        """What this run is about to do, printed once at its start: processes, device, precision, model,
        data, length, output folder and rollout engine (the facts a wrong launch command changes)."""
        acc, config, ppo = self.accelerator, self.config, self.config.ppo
        dtype = str(next(acc.unwrap_model(self.model).parameters()).dtype).removeprefix("torch.")
        m = config.model
        lora = f" (LoRA r={m.lora_r})" if m.use_peft else ""
        held_out = f", {len(self.evaluator.prompts)} held-out" if self.evaluator is not None else ""
        resume = f", resuming {self.resume_path}" if self.resume_path is not None else ""
        return "\n".join([
            f"[llm_rl] ppo: {acc.num_processes} process{'es' if acc.num_processes > 1 else ''} "
            f"({acc.distributed_type.value}), device {acc.device}, dtype {dtype}, "
            f"mixed precision {acc.mixed_precision}",
            f"  model: {m.model_name_or_path}{lora}",
            f"  prompts: {len(self.prompts)}{held_out}; {ppo.batch_size} per process per update, "
            f"{ppo.num_generations} completion{'s' if ppo.num_generations > 1 else ''} each",
            f"  updates: {self.num_updates}{resume}",
            f"  output_dir: {self.output_dir}",
            f"  rollout engine: {config.sampling.rollout_engine}",
        ])

    def collect_metrics(self, rollout: Rollout, scores: Scores, targets: Targets, stats: dict, start: float) -> dict:
        """Phase 6: this update's metrics: the rollout's over every process, training `stats` and times,
        held-out numbers when due, and what callbacks add. Adapts the KL coefficient to the measured KL."""
        train = self.config.train
        metrics = {**rollout_metrics(rollout, scores, targets, self.global_sum, self.kl_controller.value),
                   **mismatch_metrics(rollout, targets, self.global_sum, self.global_max,
                                     cap=self.config.sampling.vllm_importance_sampling_clip_max), **stats}
        if "kl/per_sequence" in metrics:  # the horizon counts samples: the rows of every process
            self.kl_controller.adapt(metrics["kl/per_sequence"],
                                      self.prompt_sampler.global_batch * self.config.ppo.num_generations)
        metrics["time/update"] = time.perf_counter() - start
        metrics["time/elapsed"] = time.perf_counter() - self.train_start - self.eval_seconds
        metrics["tokens_per_second"] = metrics["response/tokens"] / metrics["time/update"]
        if self.due(train.eval_steps, at_end=True):
            t0 = time.perf_counter()
            metrics.update(self.evaluate())
            self.eval_seconds += time.perf_counter() - t0
        metrics = {"update": self.update, **metrics}
        for callback in self.callbacks:
            callback.on_update_end(self, metrics)
        return metrics

    def log_completions_if_due(self, rollout: Rollout, scores: Scores, targets: Targets) -> None:
        """Sample completions every log_completions_steps (multi-turn: every logging_steps unless set)."""
        train = self.config.train
        every = train.log_completions_steps or (train.logging_steps if rollout.is_episode else 0)
        if every and self.due(every, at_end=False) and self.accelerator.is_main_process:
            rows = completion_rows(rollout, scores, targets, self.config.train.log_completions_count)
            write_completions(self.output_dir / "completions.jsonl", self.update, rows)
            log_table(self.accelerator, "completions", rows, self.update)

    def checkpoint_if_due(self, elapsed: float) -> bool:
        """Save every save_steps updates, at the end, and when max_seconds is spent; returns whether it is."""
        train = self.config.train
        out_of_time = train.max_seconds is not None and self.global_mean(
            {"elapsed": torch.tensor(elapsed)})["elapsed"] > train.max_seconds  # every rank decides the same
        if self.due(train.save_steps, at_end=True) or out_of_time:
            self.save_checkpoint()
        return out_of_time

    def evaluate(self) -> dict[str, float]:
        """Held-out numbers under eval/: the config's evaluation set (`llm_rl.training.evaluation`), then the
        callbacks' `on_evaluate`. Empty when neither is there."""
        out = self.evaluator(self) if self.evaluator is not None else {}
        for callback in self.callbacks:
            out.update({f"eval/{k}": v for k, v in callback.on_evaluate(self).items()})
        return out

    # ================================================================== phases 3-5
    @torch.no_grad()
    def old_and_reference(self, rollout: Rollout) -> Rollout:
        """Phase 3, no grad: the rollout with the old policy's log-probs and values (unless the update is
        fused: its training forward gives them), the reference's log-probs (when something reads them),
        and, for episodes cut before done, V of the state they would go on from."""
        rows, group = self.micro_batch_size, self.forward_group_size(rollout)
        temperature = self.sampling.temperature
        logprobs = values = ref_logprobs = final_values = None
        with eval_mode(self.accelerator.unwrap_model(self.model)), self.accelerator.autocast():
            if not self.fused:  # through the prepared model: FSDP/ZeRO-3 gather their shards per layer
                logprobs, values = logprobs_and_values(self.model, rollout, temperature, rows, group_size=group)
            if self.uses_reference:
                with self.reference() as reference:
                    ref_logprobs, _ = logprobs_and_values(reference, rollout, temperature, rows, reference=True,
                                                          group_size=group)
            if rollout.is_episode and self.accelerator.unwrap_model(self.model).v_head is not None:
                final_values = bootstrap_values(self.model, rollout, rows) * (~rollout.ended).float()
        return dataclasses.replace(rollout, logprobs=logprobs, values=values, ref_logprobs=ref_logprobs,
                                   final_values=final_values)

    def fused_old_policy(self, rollout: Rollout) -> tuple[Rollout, Optional[tuple]]:
        """Phase 3 of a fused update (one epoch over one micro-batch): the training forward of the whole
        rollout, taken before any step, is the old policy; returns the rollout with its detached log-probs
        and values, and the forward for `optimize` to reuse. Otherwise (rollout, None)."""
        if not self.fused:
            return rollout, None
        forward = self.forward(rollout, grouped=True)
        return with_old_policy(rollout, forward), forward

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference model: a separate copy, or the policy with its LoRA adapter disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        with unwrapped.pretrained_model.disable_adapter():  # in place: the prepared model runs without it
            yield self.model

    def targets(self, rollout: Rollout, scores: Scores) -> Targets:
        """Phase 4: KL, token rewards, advantages and value targets (`llm_rl.algorithms.targets.compute_targets`),
        and the importance weights that correct an engine's own sampling distribution when asked."""
        ppo, sampling = self.config.ppo, self.config.sampling
        targets = compute_targets(
            rollout, scores, estimator=ppo.advantage_estimator,
            beta=0.0 if ppo.kl_in_loss else self.kl_controller.value,
            kl_estimator=ppo.kl_estimator_in_use, gamma=ppo.gamma, lam=ppo.lam, group_size=ppo.num_generations,
            whiten_advantages=ppo.whiten_advantages, whiten_rewards=self.config.reward.whiten_rewards,
            turn_discount=self.config.environment.turn_discount, reduce=self.sum_over_processes,
            advantage_scaling=ppo.advantage_scaling, mask_truncated=ppo.mask_truncated_completions,
        )
        if rollout.sampler_logprobs is None or not sampling.vllm_importance_sampling_correction:
            return targets
        weights = importance_weights(
            rollout.logprobs, rollout.sampler_logprobs, targets.loss_mask, sampling.vllm_importance_sampling_mode,
            clip_max=sampling.vllm_importance_sampling_clip_max, clip_min=sampling.vllm_importance_sampling_clip_min)
        return dataclasses.replace(targets, importance_weights=weights)

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor.to(self.accelerator.device), "sum")

    def optimize(self, rollout: Rollout, targets: Targets, first_forward: Optional[tuple] = None) -> dict[str, float]:
        """Phase 4: ppo_epochs x num_mini_batches optimizer steps, each over gradient_accumulation_steps
        micro-batches. `first_forward`: the fused update's training forward of the whole rollout (one epoch,
        one micro-batch), already taken because it gave the old log-probs.

        Each micro-batch's loss is normalised by the global count of its mini-batch (`global_count`), so the
        update is the same however the mini-batch is split over micro-batches and processes."""
        ppo, acc = self.config.ppo, self.accelerator
        sums: dict[str, torch.Tensor] = {}
        for epoch in range(ppo.ppo_epochs):
            if first_forward is None:
                order = torch.randperm(len(rollout), generator=self.shuffle_generator).to(acc.device)
            else:
                order = torch.arange(len(rollout), device=acc.device)
            for mini in range(ppo.num_mini_batches):
                mini_rows = order[mini * self.mini_batch_size : (mini + 1) * self.mini_batch_size]
                normalizer = self.global_count(targets.loss_mask[mini_rows])
                for micro in range(ppo.gradient_accumulation_steps):
                    rows = mini_rows[micro * self.micro_batch_size : (micro + 1) * self.micro_batch_size]
                    # accelerate skips the gradient all-reduce (DDP) or the engine step (DeepSpeed)
                    # until the last micro-batch
                    with acc.accumulate(self.model):
                        if first_forward is None:
                            batch, batch_targets = micro_batch(rollout, targets, rows)
                            forward = self.forward(batch)
                        else:
                            batch, batch_targets, forward = rollout, targets, first_forward
                        stats = self.loss_and_backward(batch, batch_targets, forward, normalizer)
                        if acc.sync_gradients:
                            stats.update(self.apply_gradients())
                    if epoch == 0 and mini == 0 and micro == 0:
                        self.check_first_ratio(stats["policy/ratio_max_dev"])
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
        steps = ppo.ppo_epochs * ppo.num_mini_batches
        means = self.reduce_train_stats(sums, steps, steps * ppo.gradient_accumulation_steps)
        means["lr"] = self.scheduler.get_last_lr()[0]
        return means

    def global_count(self, mask: torch.Tensor) -> torch.Tensor:
        """What a mini-batch's losses are divided by (`loss_normalizer`): its tokens (token_mean), sequences
        (seq_mean_token_mean), micro-batches or rows x the longest response on every process, `mask`
        (rows, resp_len) being this process's part."""
        env = self.config.environment
        longest = self.config.sampling.max_new_tokens if env.environment is None else env.max_episode_tokens
        count = loss_normalizer(mask, self.config.ppo.loss_agg, self.micro_batch_size, longest)
        count = count.to(self.accelerator.device)
        return self.accelerator.reduce(count, "sum")  # one all-reduce per mini-batch

    def reduce_train_stats(self, sums: dict[str, torch.Tensor], steps: int, micro_batches: int) -> dict[str, float]:
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
        ppo, acc = self.config.ppo, self.accelerator
        grad_norm = None
        if ppo.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), ppo.max_grad_norm)
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

    def forward(self, batch: Rollout, grouped: bool = False):
        """Training forward (with grad): log-probs (batch, resp_len), values or None, entropy (batch, resp_len),
        the entropy without a gradient when ent_coef is 0. Chunked where the model allows it (`chunked_logprobs`).
        `grouped`: the rows are a whole rollout's in order, so each group's prompt runs once
        (`CausalLMWithValueHead.forward(group_size=...)`)."""
        return forward_logprobs(
            self.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
            self.sampling.temperature, group_size=self.forward_group_size(batch) if grouped else 1,
            entropy_grad=self.config.ppo.ent_coef != 0,
        )

    def forward_group_size(self, rollout: Rollout) -> int:
        """Rows per prompt the forwards may run once: the sampler's group, unless FSDP / DeepSpeed shard the
        model (that extra prompt forward is untested there)."""
        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        return 1 if sharded else rollout.group_size

    def loss_and_backward(self, rollout: Rollout, targets: Targets, forward: tuple, normalizer) -> dict[str, torch.Tensor]:
        """The PPO loss of a micro-batch from its training `forward` (log-probs, values, entropy), and its
        backward; returns detached stats.

        Every term (policy, value, entropy, KL) is this micro-batch's share of its mini-batch's mean: the
        sum of its per-token (or per-sequence) terms over `normalizer`, the mini-batch's global count."""
        ppo, acc = self.config.ppo, self.accelerator
        logprobs, values, entropy = forward
        coefficients = PPOCoefficients(
            clip_range=ppo.clip_range, clip_range_high=ppo.clip_range_high, dual_clip=ppo.dual_clip,
            clip_range_value=ppo.clip_range_value, vf_coef=ppo.vf_coef, ent_coef=ppo.ent_coef,
            kl_coef=self.kl_controller.value, kl_estimator=ppo.kl_estimator_in_use,
            kl_ratio_weighted=ppo.kl_ratio_weighted, loss_agg=ppo.loss_agg,
        )
        loss, stats = ppo_objective(
            logprobs, rollout.logprobs, targets.advantages, targets.loss_mask,
            token_entropy=entropy,
            values=values, old_values=rollout.values, returns=targets.returns,
            ref_logprobs=rollout.ref_logprobs if ppo.kl_in_loss else None,
            coefficients=coefficients, normalizer=normalizer, importance_weights=targets.importance_weights,
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

    @contextlib.contextmanager
    def phase(self, timing: dict, key: str):
        """One phase of an update: its seconds go to `timing[key]`, and running out of memory in it stops the
        run with one `OutOfMemoryError` that names the keys which lower the memory an update needs."""
        try:
            with timed(timing, key):
                yield
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            raise OutOfMemoryError(self.out_of_memory_message(key.removeprefix("time/"), error)) from error

    def out_of_memory_message(self, phase: str, error: BaseException) -> str:
        """What `phase` ran out of, and every key that lowers the memory an update needs, with its value now."""
        model, ppo, sampling = self.config.model, self.config.ppo, self.sampling
        policy = self.accelerator.unwrap_model(self.model)
        chunked = "on" if policy.chunked_logprobs else "off" + (
            f": {policy.chunked_head_problem}" if policy.chunked_head_problem else "")
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return (
            f"update {self.update + 1} ran out of memory in its {phase} phase ({first_line}). To need less: "
            f"smaller micro-batches (now {self.micro_batch_size} rows per forward: raise num_mini_batches, now "
            f"{ppo.num_mini_batches}, or gradient_accumulation_steps, now {ppo.gradient_accumulation_steps}), "
            f"a smaller generation_batch_size (now {sampling.chunk_size} rows per generate call) or max_new_tokens "
            f"(now {sampling.max_new_tokens}), gradient_checkpointing: true (now {model.gradient_checkpointing}), "
            f"chunked_logprobs: true (now {chunked}), use_peft: true (LoRA adapters; now {model.use_peft})."
        )

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
    # ================================================================== what the run skeleton saves
    def checkpoint_state(self) -> dict:
        """Beside the update counter: data position, KL controller, minibatch-shuffle RNG."""
        return {
            "num_updates": self.num_updates,
            "sampler": self.prompt_sampler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "shuffle_generator": self.shuffle_generator.get_state().tolist(),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        self.prompt_sampler.load_state_dict(state["sampler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.shuffle_generator.set_state(torch.tensor(state["shuffle_generator"], dtype=torch.uint8))

    def write_model(self, directory: Path, state_dict: dict) -> None:
        """The policy as a plain causal LM (or its adapter, or merged), and the value head."""
        self.accelerator.unwrap_model(self.model).save_pretrained(
            directory, state_dict=state_dict, merge_adapter=self.config.model.merge_adapter
        )

    def model_card(self, metrics: dict):
        return model_card(self.config, metrics, self.config.train.hub_model_id or str(self.output_dir))

    def write_reports(self, metrics: dict) -> None:
        super().write_reports(metrics)
        plot_training_curves(self.output_dir / run_dir.METRICS_FILE, self.output_dir / "curves.png")


def check_run_rewards(rewards: Sequence[RewardFn], prompts, environment) -> None:
    """Something scores the run, and every reward can be called with the dataset's columns: checked when
    the trainer is built, and by run_ppo before the policy loads."""
    if not rewards and (environment is None or not getattr(environment, "has_reward", True)):
        raise ConfigError(
            "no reward: set reward_model_name_or_path and/or reward_funcs" if environment is None else
            f"environment_factory {environment.__name__} has no get_reward() and no reward_funcs are set: "
            "nothing scores its episodes")
    if rewards:  # episodes' reward functions also get the instances that played them (TRL's environments=)
        check_rewards(rewards, list(prompts.columns) + (["environments"] if environment is not None else []))


def episode_environment(config: Config, tokenizer):
    """What builds one environment per episode: the `environment` class, or the `environment_factory` class
    (TRL's tool-calling shape) under its adapter; None for single-turn runs."""
    env = config.environment
    if env.environment is not None:
        return load_environment(env.environment)
    if env.environment_factory is not None:
        return load_tool_environment(env.environment_factory, tokenizer, max_turns=env.max_turns,
                                     prompt_column=config.data.prompt_column)
    return None


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


def micro_batch(rollout: Rollout, targets: Targets, rows: torch.Tensor) -> tuple[Rollout, Targets]:
    """The `rows` of a rollout and its targets, without the response columns where none of them has an
    action (padding; multi-turn: observations after the last bot token, which no loss reads)."""
    mask = targets.loss_mask[rows]
    last = mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)
    width = max(int(last.max()), 1)
    return rollout.select(rows, width), targets.select(rows, width)


def with_old_policy(rollout: Rollout, forward: tuple) -> Rollout:
    """The fused update's rollout: the training forward, taken before any step, is the old policy; its
    log-probs and values, detached, are the rollout's."""
    logprobs, values, _ = forward
    valid = rollout.response_mask.bool()
    return dataclasses.replace(
        rollout, logprobs=logprobs.detach().float().masked_fill(~valid, 0.0),
        values=None if values is None else values.detach().float().masked_fill(~valid, 0.0),
    )


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, ...), or a RuntimeError that says so (other devices, the CPU allocator)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in message.lower() or "DefaultCPUAllocator: can't allocate memory" in message)


@contextlib.contextmanager
def timed(timing: dict, key: str):
    """Add the seconds the block took to `timing[key]`."""
    start = time.perf_counter()
    yield
    timing[key] = time.perf_counter() - start
