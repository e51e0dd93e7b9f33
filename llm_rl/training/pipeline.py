"""From a Config to a finished run: load tokenizer, policy, reference, rewards and prompts, then train.

`recipes/ppo.py` and `llm-rl ppo` both call `run_ppo(config)`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from accelerate.utils import set_seed

from llm_rl.config.errors import loading
from llm_rl.config.sections import Config
from llm_rl.data.prompts import load_eval_prompts, load_prompts
from llm_rl.models.loading import load_policy, load_reference, load_tokenizer
from llm_rl.rewards.loading import load_eval_rewards, load_rewards
from llm_rl.training import output_dir as run_dir
from llm_rl.training.run import launch_check

logger = logging.getLogger(__name__)


def run_ppo(config: Config, callbacks: Sequence = ()):
    """Load everything the config names and train (with `llm_rl.training.callbacks.TrainerCallback`s); returns the
    trainer and per-update metrics."""
    from llm_rl.training.ppo_trainer import PPOTrainer, check_run_rewards, episode_environment

    config.validate()
    t = config.train
    run_dir.check_reuse(Path(t.output_dir), t.overwrite_output_dir, t.resume_from_checkpoint)  # before any load
    config.check_paths()
    launch_check(t)  # FSDP/DeepSpeed without GPUs, Hub access: before any load
    set_seed(config.train.seed)  # identical initial weights (value head) on every process
    m = config.model
    tokenizer_name = m.tokenizer_name_or_path or m.model_name_or_path
    with loading("tokenizer_name_or_path" if m.tokenizer_name_or_path else "model_name_or_path", tokenizer_name):
        tokenizer = load_tokenizer(tokenizer_name, m.trust_remote_code)
    with loading("reward_model_name_or_path", config.reward.reward_model_name_or_path):
        rewards = load_rewards(config)
    prompts = load_prompts(config, tokenizer)
    environment = episode_environment(config, tokenizer)  # a broken environment class: before the model loads
    check_run_rewards(rewards, prompts, environment)  # a reward the columns cannot call: before the model loads
    with loading("model_name_or_path", m.model_name_or_path):
        policy = load_policy(config, tokenizer)
    with loading("ref_model_name_or_path", m.ref_model_name_or_path):
        reference = load_reference(config, tokenizer)
    trainer = PPOTrainer(
        config, policy, tokenizer, prompts, rewards, ref_model=reference, callbacks=callbacks,
        eval_prompts=load_eval_prompts(config, tokenizer), eval_rewards=load_eval_rewards(config),
        environment=environment,
    )
    history = trainer.train()
    return trainer, history
