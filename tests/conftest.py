"""Shared fixtures and builders for every test folder (tests/<layer>/test_*.py).

A character-level tokenizer and a tiny GPT-2, built once and saved locally: everything is offline.
Tests load the saved folder with `from_pretrained`, the same path a Hub id takes, and get a fresh copy
each time so they may mutate what they get. Below them, plain functions the test files import
(`from conftest import ...`; tests/ is on sys.path because this file sits there): files the runs read
(prompts, reward functions, preference pairs), the config and trainer of a tiny run, and the helpers
that run commands in other processes (one process, or two under `accelerate launch`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

# The tests run tiny models, several processes at a time (subprocess and 2-rank runs): one thread
# each is fastest and avoids oversubscribing small CI machines. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from llm_rl.tasks.arithmetic import (  # noqa: E402
    build_model,
    build_tokenizer,
)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]  # the repository root, from whichever folder a test file sits in


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


def reset_accelerate_state() -> None:
    """Forget the process-wide accelerate state, so that the next run can build its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Every run builds its own Accelerator; forget the process-wide accelerate state after the test."""
    yield
    reset_accelerate_state()


def sample_rollout(trainer, indices: list[int]):
    """Phases 1 and 3 of one update on the prompts at `indices`: sampled, then what the old policy (and the
    reference, when read) say about the sampled tokens."""
    rollout = trainer.sampler.sample(trainer.prompts.batch(indices))
    rollout = trainer.old_and_reference(rollout)
    return trainer.fused_old_policy(rollout)[0]


# ----------------------------------------------------------------------------- hand-computed values
def close(actual, expected, atol=1e-6):
    """`actual` equals the hand-computed `expected` (nested lists or a tensor, taken in actual's dtype) to `atol`."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- files a run reads and writes
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object a line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a JSON-lines file (metrics.jsonl, completions.jsonl), each one a JSON object."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def addition_prompts(folder: Path, num_train: int = 16, num_heldout: int = 2) -> Path:
    """folder/prompts.jsonl: the training split of one-digit addition problems (columns prompt, answer)."""
    from llm_rl.tasks import arithmetic

    train, _ = arithmetic.make_splits(1, num_train, num_heldout, seed=0)
    return arithmetic.write_jsonl(train, folder / "prompts.jsonl")


def write_addition_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """Preference pairs (prompt, chosen, rejected, mistake) for `n` one-digit addition problems."""
    from llm_rl.tasks import addition_preferences, arithmetic

    train, _ = arithmetic.make_splits(1, n, 0, seed=seed)
    return write_jsonl(path, addition_preferences.make_pairs(train, seed=seed))


SEVENS_REWARD = '''
def sevens(prompts, completions, **columns):
    """Fraction of the completion's characters that are the digit 7 (0 for an empty completion)."""
    return [c.count("7") / len(c) if c else 0.0 for c in completions]
'''


# a scripted multi-turn environment (tests of episodes, through HF generate and through vLLM)
TWO_TURNS_ENV = '''
class TwoTurns:
    """Scripted user: answers "7" to every reply, rewards a reply by its length / 4, done after 2 turns."""

    def reset(self, row):
        self.turns = 0
        return row["prompt"]

    def step(self, response):
        self.turns += 1
        return "7", len(response) / 4, self.turns >= 2
'''


def write_sevens_reward(folder: Path) -> str:
    """folder/sevens.py holding the `sevens` reward; returns its spec 'folder/sevens.py:sevens'."""
    (folder / "sevens.py").write_text(SEVENS_REWARD)
    return f"{folder / 'sevens.py'}:sevens"


def length_reward(prompts, completions, **_):
    """An in-process reward: the completion's length in characters."""
    return [float(len(c)) for c in completions]


# ----------------------------------------------------------------------------- a tiny run, in this process
def ppo_config(model_dir, dataset, output_dir, **values):
    """The `Config` of a run of `model_dir` on the prompts file `dataset`, writing to `output_dir`, without a
    progress bar; `values` gives the rest."""
    from llm_rl.config.sections import Config

    return Config.from_dict({"model_name_or_path": str(model_dir), "dataset_name": str(dataset),
                             "output_dir": str(output_dir), "progress_bar": False, **values})


def build_trainer(config, rewards=None):
    """A `PPOTrainer` loaded the way `run_ppo` loads one (tokenizer, policy, prompts); the rewards of the
    config unless `rewards` (a list of reward functions) is given."""
    from llm_rl.data.prompts import load_prompts
    from llm_rl.models.loading import load_policy, load_tokenizer
    from llm_rl.rewards.loading import load_rewards
    from llm_rl.training.ppo_trainer import PPOTrainer

    tokenizer = load_tokenizer(config.model.model_name_or_path)
    return PPOTrainer(config, load_policy(config, tokenizer), tokenizer, load_prompts(config, tokenizer),
                      load_rewards(config) if rewards is None else rewards)


def sequence_classifier(model_dir):
    """The tiny model as a one-label sequence classifier (a fresh score head, seed 0), in eval mode."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()


# ----------------------------------------------------------------------------- other processes
def offline_env(root: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a command run offline, with its own HF_HOME under `root` (no user
    accelerate/datasets state leaks in); `extra` is set on top."""
    return {
        **os.environ, "HF_HOME": str(root / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra,
    }


def run_cli(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m llm_rl.cli ARGS` in its own process, from the repository root, offline."""
    return subprocess.run(
        [sys.executable, "-m", "llm_rl.cli", *args],
        cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script: str, args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch` of `script` (a path, or relative to the repository root) on 2 CPU processes (gloo).

    `accelerate launch --cpu --num_processes 2` starts a single process unless mpirun is set up (accelerate's
    multi-CPU path goes through MPI), so the two processes are started with torchrun through `--multi_gpu`,
    and ACCELERATE_USE_CPU=true makes accelerate pick MULTI_CPU with the gloo backend on a machine without GPUs.
    """
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
        script, *args,
    ]
    env = offline_env(tmp_path, ACCELERATE_USE_CPU="true")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    """Exit code, the error lines of any rank (they drown in torchrun's report), then the output tails."""
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "llm-rl:" in line or "Error:" in line]
    errors = list(dict.fromkeys(errors))[:20]
    return (f"exit {proc.returncode}\n--- errors\n" + "\n".join(errors)
            + f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")


# The same steps as recipes/ppo.py (Config.from_yaml + run_ppo), then every rank dumps a digest of its
# parameters and the metrics it returned to rank<r>.json beside the script.
RANK_REPORT_DRIVER = '''
import hashlib
import json
import sys
from pathlib import Path

from llm_rl.config import Config
from llm_rl.training.pipeline import run_ppo


def main():
    config = Config.from_yaml(sys.argv[1], sys.argv[2:])
    trainer, history = run_ppo(config)
    acc = trainer.accelerator
    state = acc.unwrap_model(trainer.model).state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    report = {
        "rank": acc.process_index,
        "num_processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "digest": digest.hexdigest(),
        "sums": {name: float(t.double().sum()) for name, t in state.items()},
        "history": history,
    }
    (Path(__file__).parent / f"rank{acc.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
'''


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    """A local stand-in for the Hub that huggingface_hub's client talks to, with a token (tests/local_hub.py)."""
    from local_hub import serve

    yield from serve(monkeypatch, tmp_path)
