"""Shared fixtures: a character-level tokenizer and a tiny GPT-2, built once and saved locally.

Everything is offline. Tests load the saved folder with `from_pretrained`, the same
path a Hub id takes, and get a fresh copy each time so they may mutate what they get.
"""

from __future__ import annotations

import os

# The tests run tiny models, several processes at a time (subprocess and 2-rank runs): one thread
# each is fastest and avoids oversubscribing small CI machines. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from llm_rl.tasks.arithmetic import (
    build_model,  # noqa: E402
    build_tokenizer,
)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random GPT-2 (2 layers, width 32, 32 positions) and its tokenizer.

    Vocabulary (15 tokens): <pad>=0, <eos>=1, <unk>=2, '0'..'9'=3..12, '+'=13, '='=14.
    """
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = build_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    """A fresh copy of the tiny tokenizer (tests may set chat_template, padding side, ...)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_lm(tiny_model_dir):
    """A fresh plain `AutoModelForCausalLM` copy of the tiny GPT-2, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def left_pad(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align token lists: (ids (batch, longest), mask (batch, longest))."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, longest - len(seq) :] = torch.tensor(seq)
            mask[row, longest - len(seq) :] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], width: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-align token lists in `width` columns: (ids (batch, width), mask (batch, width))."""
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
    return ids, mask


@pytest.fixture
def pad_helpers():
    """(left_pad, right_pad) helpers, as a fixture so test modules need not import conftest."""
    return left_pad, right_pad


def assert_hub_valid_card(path):
    """Load a model card the way the Hub client does and apply the Hub's metadata rules that made
    uploads fail before (`ModelCard.validate` itself needs the network): base_model and datasets are
    repo ids, tags a list of strings. Returns the card."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    card = ModelCard.load(path)
    base = card.data.base_model
    for name in (base if isinstance(base, list) else [base] if base else []) + list(card.data.datasets or []):
        validate_repo_id(name)
    assert isinstance(card.data.tags, list) and all(isinstance(t, str) for t in card.data.tags)
    assert card.data.library_name in ("transformers", "peft")
    return card


@pytest.fixture
def hub_card():
    """`assert_hub_valid_card`, for tests that check the cards the package writes."""
    return assert_hub_valid_card


@pytest.fixture
def fresh_accelerate_state():
    """Every run builds its own Accelerator; forget the process-wide accelerate state after the test."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def sample_rollout(trainer, indices: list[int]):
    """Phases 1 and 3 of one update on the prompts at `indices`: sampled, then what the old policy (and the
    reference, when read) say about the sampled tokens."""
    rollout = trainer.sampler.sample(trainer.prompts.batch(indices))
    rollout = trainer.old_and_reference(rollout)
    return trainer.fused_old_policy(rollout)[0]
