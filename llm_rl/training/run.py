"""The run skeleton PPO (`llm_rl.training.ppo_trainer.PPOTrainer`) and reward-model training
(`llm_rl.training.reward_trainer.RewardTrainer`) share: everything around their training steps.

    launch_check(options)       # before any model loads: FSDP/DeepSpeed need GPUs, Hub push access (rank 0)
    run = Trainer(...)          # TrainingRun.__init__: Accelerator, output folder checked, resume found
    run.prepare_training(...)   # AdamW + warmup schedule, prepared with the model (and data loaders)
    run.start(total)            # trackers, exact resume from a checkpoint, progress bar
    loop: ...; run.log(row); run.save_checkpoint()
    run.finish()                # model, tokenizer, config, card, trackers closed, optional Hub push last

A subclass sets the class attributes below and writes the model (`write_model`), its card
(`model_card`), and any state of its own a checkpoint must carry (`checkpoint_state` /
`load_checkpoint_state`). Its counter lives in the attribute named `step_key` (PPO: `update`).

`options` is the part of a config these steps read: output_dir, overwrite_output_dir,
resume_from_checkpoint, save_total_limit, report_to, run_name, progress_bar, push_to_hub,
hub_model_id, hub_private_repo (`Config.train` for PPO, the flat `RewardTrainingConfig`).
Only the main process prints and writes files; every process joins the collectives.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from llm_rl.config.errors import ConfigError
from llm_rl.reporting.metrics import read_metrics, reduce_scalars
from llm_rl.training import checkpoint
from llm_rl.training import output_dir as run_dir


class TrainingRun:
    """Accelerator, output folder, trackers, metrics log, checkpoints and the saved model of one run."""

    name = "llm_rl"  # progress bar label
    default_run_name = "llm_rl"  # the trackers' run name unless options.run_name is set
    step_key = "step"  # attribute counting optimizer steps (or PPO updates); key of metrics rows and checkpoints
    config_file = "config.yaml"  # the config used, saved beside the model
    hub_commit_message = "llm_rl"

    def __init__(self, config, options, gradient_accumulation_steps: int, accelerator: Optional[Accelerator] = None):
        self.config, self.options = config, options
        check_sharding_device(accelerator.distributed_type if accelerator else None)
        self.accelerator = accelerator or new_accelerator(
            log_with=None if options.report_to == "none" else options.report_to,
            project_dir=options.output_dir,
            gradient_accumulation_steps=gradient_accumulation_steps,
        )
        if self.accelerator.gradient_accumulation_steps != gradient_accumulation_steps:
            raise ConfigError(
                f"the Accelerator accumulates {self.accelerator.gradient_accumulation_steps} micro-batches but the "
                f"config says gradient_accumulation_steps={gradient_accumulation_steps}; create it with "
                f"Accelerator(gradient_accumulation_steps={gradient_accumulation_steps})"
            )
        self.output_dir = Path(options.output_dir)
        self.resume_path = self.find_resume_checkpoint()
        run_dir.prepare(self.accelerator, self.output_dir, options.overwrite_output_dir,
                        resuming=self.resume_path is not None, extra=(self.tracker_run_name,))
        self.bar = None
        setattr(self, self.step_key, 0)

    # ================================================================== setup
    @property
    def tracker_run_name(self) -> str:
        """The trackers' run name; tensorboard writes under OUTPUT_DIR/<this name>."""
        return self.options.run_name or self.default_run_name

    @property
    def trackers_on(self) -> bool:
        return self.options.report_to != "none"

    def find_resume_checkpoint(self) -> Optional[Path]:
        """The checkpoint `resume_from_checkpoint` names, or None. 'latest' in a folder holding a run
        but no checkpoint is refused: starting over there would mix two runs' metrics."""
        spec = self.options.resume_from_checkpoint
        if spec is None:
            return None
        path = checkpoint.resolve_checkpoint(spec, self.output_dir)
        if path is None:
            run_dir.check_reuse(self.output_dir, self.options.overwrite_output_dir, spec)
        return path

    def prepare_training(self, model, optim, total_steps: int, *others, trainable_only: bool = False) -> list:
        """AdamW over `model`'s trainable weights and its schedule, prepared with the model and `others`
        (data loaders) in one `accelerator.prepare`; sets self.model, optimizer, scheduler and returns
        the prepared `others`.

        `optim` holds learning_rate, weight_decay, lr_scheduler_type and warmup_steps. transformers'
        "constant" ignores warmup, so it becomes "constant_with_warmup": warmup applies to every schedule.
        `total_steps` counts this run's optimizer steps, and the schedule takes one step per optimizer
        step: accelerate's wrapper would take num_processes (its convention for data loaders that shrink
        with the process count), hence `split_batches`; it still skips steps the grad scaler skipped.
        DeepSpeed steps the schedule inside its engine, once per step. `trainable_only` (LoRA): checkpoints
        store the trainable weights only; the frozen base reloads from the model path on resume.
        """
        from transformers import get_scheduler

        trainable = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for every tensor's update (CPU and GPU; 4 ms instead of 18 for 3.7M weights on CPU).
        # Not with fp16's loss scaler, whose skipped steps accelerate detects on the unfused optimizer only.
        fused = self.accelerator.mixed_precision != "fp16"
        optimizer = torch.optim.AdamW(trainable, lr=optim.learning_rate, weight_decay=optim.weight_decay, fused=fused)
        schedule = "constant_with_warmup" if optim.lr_scheduler_type == "constant" else optim.lr_scheduler_type
        scheduler = get_scheduler(schedule, optimizer, optim.warmup_steps, total_steps)
        acc = self.accelerator
        self.model, self.optimizer, self.scheduler, *prepared = acc.prepare(model, optimizer, scheduler, *others)
        self.scheduler.split_batches = True
        if trainable_only and acc.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            checkpoint.save_trainable_only(acc, self.model)
        return prepared

    # ================================================================== the loop's frame
    def start(self, total_steps: int) -> None:
        """Open the trackers, restore the checkpoint being resumed, show the progress bar."""
        from tqdm.auto import tqdm

        self.total_steps = total_steps
        if self.trackers_on:
            self.accelerator.init_trackers(self.tracker_run_name, config=flat_config(self.config.to_dict()))
        if self.resume_path is not None:
            self.load_checkpoint(self.resume_path)
        self.bar = tqdm(
            total=total_steps, initial=getattr(self, self.step_key), desc=self.name, dynamic_ncols=True,
            disable=not (self.accelerator.is_main_process and self.options.progress_bar),
        )

    def log(self, metrics: dict, line: Optional[str] = None) -> None:
        """One metrics row (holding `step_key`): to the trackers, appended to metrics.jsonl, and `line`
        printed under the progress bar. Every process calls; the main process writes."""
        acc = self.accelerator
        if self.trackers_on:
            acc.log(metrics, step=metrics[self.step_key])
        if acc.is_main_process:
            with open(self.output_dir / run_dir.METRICS_FILE, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if line:
                self.bar.write(line)

    def due(self, every: int, at_end: bool = False) -> bool:
        """Whether something done every `every` steps (0: never, or only at the end) is due now."""
        step = getattr(self, self.step_key)
        return bool(every and step % every == 0) or (at_end and step == self.total_steps)

    def global_sum(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        return reduce_scalars(self.accelerator, values, "sum")

    def global_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        return reduce_scalars(self.accelerator, values, "mean")

    def global_max(self, value: torch.Tensor) -> float:
        """The largest of every process's `value` (a scalar)."""
        acc = self.accelerator
        return float(acc.gather(value.detach().float().reshape(1).to(acc.device)).max())

    def finish(self) -> None:
        """End of the run: the model, tokenizer and config in output_dir, the card (and whatever
        `write_reports` adds), the optional Hub upload, the trackers closed."""
        self.bar.close()
        self.save_model(self.output_dir)
        if self.accelerator.is_main_process:
            rows = read_metrics(self.output_dir / run_dir.METRICS_FILE)  # also those before a resume
            self.write_reports(latest_values(rows))
        if self.trackers_on:
            self.accelerator.end_training()
        if self.options.push_to_hub and self.accelerator.is_main_process:  # last: a failed upload keeps the rest
            from llm_rl.reporting.hub import push_folder

            url = push_folder(self.output_dir, self.options.hub_model_id, self.options.hub_private_repo,
                              self.hub_commit_message)
            print(f"[llm_rl] pushed {self.output_dir} to {url}")

    # ================================================================== checkpoints
    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly: weights, optimizer, scheduler, RNGs of every process
        (accelerate's `save_state`), the step counter and `checkpoint_state()`. Written to a temporary
        folder and renamed when complete, so a crash mid-write leaves the previous one the latest."""
        acc, step = self.accelerator, getattr(self, self.step_key)
        tmp = checkpoint.temporary_dir(self.output_dir, step)
        final = checkpoint.checkpoint_dir(self.output_dir, step)
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        with checkpoint.quiet_shared_tensor_warning():
            acc.save_state(str(tmp), safe_serialization=True)  # every rank writes its own RNG state
        acc.wait_for_everyone()
        if acc.is_main_process:
            checkpoint.finalize(tmp, final, {self.step_key: step, **self.checkpoint_state()})
            checkpoint.rotate(self.output_dir, self.options.save_total_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint written by `save_checkpoint`, and drop metrics rows logged after it."""
        acc = self.accelerator
        try:
            acc.load_state(str(path))
            state = checkpoint.read_state(path)
        except Exception as e:  # a damaged file: name it and the checkpoint before
            error = checkpoint.load_error(path, e)
            if error is e:
                raise
            raise error from e
        step = int(state[self.step_key])
        setattr(self, self.step_key, step)
        self.load_checkpoint_state(state)
        if acc.is_main_process:
            metrics = self.output_dir / run_dir.METRICS_FILE
            kept = [row for row in read_metrics(metrics) if row[self.step_key] <= step]
            metrics.write_text("".join(json.dumps(row) + "\n" for row in kept))
            print(f"[llm_rl] resumed from {path} at {self.step_key} {step}")
        acc.wait_for_everyone()

    def checkpoint_state(self) -> dict[str, Any]:
        """The subclass's own state a resumed run needs (JSON), beside the step counter."""
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what `checkpoint_state` wrote."""

    # ================================================================== the saved model
    def save_model(self, directory: Path) -> None:
        """Model (`write_model`), tokenizer and the config used. Every process joins `get_state_dict`
        (it gathers ZeRO-3 / FSDP shards); the main process writes."""
        acc, directory = self.accelerator, Path(directory)
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)
        if acc.is_main_process:
            self.write_model(directory, state_dict)
            self.tokenizer.save_pretrained(directory)
            self.config.save_yaml(directory / self.config_file)
        acc.wait_for_everyone()

    def write_model(self, directory: Path, state_dict: dict) -> None:
        """Main process: save the trained model from its full `state_dict`."""
        raise NotImplementedError

    def model_card(self, metrics: dict):
        """The output folder's README.md (a huggingface_hub ModelCard) from the latest metrics."""
        raise NotImplementedError

    def write_reports(self, metrics: dict) -> None:
        """Main process: the files that describe the run beside the model; here its card."""
        self.model_card(metrics).save(self.output_dir / "README.md")


def launch_check(options) -> None:
    """Before any model loads: refuse FSDP or DeepSpeed on a machine without GPUs, and with push_to_hub
    check the token, the network and the repo (`llm_rl.reporting.hub.check_push_access`) on the main process
    only: RANK 0 of a launch (the others skip it, without a collective; a failed rank 0 ends the launch)."""
    check_sharding_device(None)
    if options.push_to_hub and int(os.environ.get("RANK", "0")) == 0:
        from llm_rl.reporting.hub import check_push_access

        check_push_access(options.hub_model_id, private=options.hub_private_repo)


# accelerate's sharded engines: the variable its launcher sets, and why they cannot run on the CPU
SHARDED_ENGINES = {
    DistributedType.FSDP: ("ACCELERATE_USE_FSDP", "FSDP", "accelerate's FSDP cannot run on CPU (sync_module_states "
                           "is not supported on cpu, and without it accelerate falls back to DDP)"),
    DistributedType.DEEPSPEED: ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", "llm_rl runs accelerate's DeepSpeed "
                                "engine on GPUs only (not tried on CPU)"),
}


def sharding_refusal(env, distributed_type: Optional[DistributedType], has_gpu: bool) -> Optional[str]:
    """The line refusing FSDP or DeepSpeed (named by accelerate's launcher variables in `env`, or by an
    Accelerator's `distributed_type`) without a GPU; None when there is one or neither is asked for."""
    if has_gpu:
        return None
    for kind, (variable, name, why) in SHARDED_ENGINES.items():
        if distributed_type == kind or env.get(variable, "").lower() in ("true", "1", "yes"):
            return (f"{name} needs GPUs: {why}; use accelerate_configs/cpu.yaml (DDP over gloo, "
                    "--num_processes N) on this machine")
    return None


def check_sharding_device(distributed_type: Optional[DistributedType]) -> None:
    problem = sharding_refusal(os.environ, distributed_type, torch.accelerator.is_available())
    if problem:
        raise ConfigError(problem)


def new_accelerator(**kwargs) -> Accelerator:
    """An Accelerator; on the CPU when torchrun started several processes on a machine without an
    accelerator device (accelerate_configs/cpu.yaml with --num_processes N: accelerate's launcher does
    not pass use_cpu on), so they train together over gloo instead of as N runs that ignore each other."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ
    if several and not torch.accelerator.is_available():
        kwargs["cpu"] = True
    return Accelerator(**kwargs)


def latest_values(rows: list[dict]) -> dict:
    """Each metric's last logged value (evaluation rows come less often than training rows)."""
    latest = {}
    for row in rows:
        latest.update(row)
    return latest


def flat_config(values: dict) -> dict:
    """A config dict as trackers take it: sections merged, values that are not scalars as text."""
    flat = {}
    for key, value in values.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}
