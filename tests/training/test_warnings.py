"""A normal run raises no FutureWarning or DeprecationWarning on llm_rl's behalf: no deprecated argument
or call of torch, transformers or accelerate in a tiny PPO run or reward-model run.

pyproject's pytest `filterwarnings` ignores both categories (for third-party import noise), and a warning
raised inside transformers names a transformers file, not the llm_rl line that caused it. So every
warning is recorded with "always", and a deprecation counts as llm_rl's when a frame of llm_rl is on
the stack where it was raised."""

from __future__ import annotations

import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ppo_config, write_jsonl, write_sevens_reward

import llm_rl

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
LLM_RL = str(Path(llm_rl.__file__).parent)


@contextmanager
def deprecations_caused_by_llm_rl():
    """Yields (all recorded warnings, the deprecations with an llm_rl frame on their stack)."""
    recorded, ours = [], []

    def record(message, category, filename, lineno, file=None, line=None):
        callers = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if f.filename.startswith(LLM_RL)]
        recorded.append((category, str(message)))
        if issubclass(category, (FutureWarning, DeprecationWarning)) and callers:
            ours.append(f"{category.__name__}: {message} ({filename}:{lineno}, from {callers[-1]})")

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # beats pytest's ignore filters inside this block
        warnings.showwarning = record
        yield recorded, ours


def test_recording_sees_the_categories_pytest_ignores():
    with deprecations_caused_by_llm_rl() as (recorded, ours):
        warnings.warn("probe", FutureWarning)
    assert (FutureWarning, "probe") in recorded and ours == []  # not raised from llm_rl's code


def test_a_ppo_update_raises_no_deprecation(tiny_model_dir, tmp_path):
    from llm_rl.training.pipeline import run_ppo

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{a}+{a}="} for a in range(4)])
    config = ppo_config(tiny_model_dir, prompts, tmp_path / "ppo", reward_funcs=[write_sevens_reward(tmp_path)],
                        batch_size=2, max_new_tokens=3, max_updates=1, save_steps=1, num_generations=2,
                        eval_split="train", eval_decoding=["greedy", "sampled"])  # the group's shared prompt cache
    with deprecations_caused_by_llm_rl() as (recorded, ours):
        run_ppo(config)
    assert ours == []


def test_a_reward_model_step_raises_no_deprecation(tiny_model_dir, tmp_path):
    from llm_rl.config.reward_training import RewardTrainingConfig
    from llm_rl.training.reward_trainer import train_reward_model

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": "0"}
                                                   for a in range(4)])
    config = RewardTrainingConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(pairs), batch_size=2,
                                  max_steps=1, output_dir=str(tmp_path / "rm"), progress_bar=False, eval_fraction=0.5)
    with deprecations_caused_by_llm_rl() as (recorded, ours):
        train_reward_model(config)
    assert ours == []
