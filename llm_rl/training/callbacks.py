"""Hooks into `PPOTrainer.train()`: what a user or a benchmark adds to a run without editing the trainer.

Subclass `TrainerCallback` and override what you need; pass instances as `PPOTrainer(callbacks=[...])`
(or `run_ppo(config, callbacks=[...])`). Every process calls every hook, so a hook may join a
collective; only the main process (`trainer.accelerator.is_main_process`) should write.
"""

from __future__ import annotations

from collections.abc import Callable


class TrainerCallback:
    def on_evaluate(self, trainer) -> dict[str, float]:
        """Held-out numbers, run every `eval_steps` updates and at the end; logged under `eval/`."""
        return {}

    def on_update_end(self, trainer, metrics: dict) -> None:
        """After each update, before its metrics are logged; may add keys to `metrics`."""

    def on_train_end(self, trainer, history: list[dict]) -> None:
        """After the last update, once the model is saved."""


class Evaluate(TrainerCallback):
    """A function `fn(trainer) -> dict` as the evaluation hook: `callbacks=[Evaluate(exact_match)]`."""

    def __init__(self, fn: Callable[..., dict]):
        self.fn = fn

    def on_evaluate(self, trainer) -> dict[str, float]:
        return self.fn(trainer)
