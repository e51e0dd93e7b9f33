"""Two processes on the CPU (gloo) under `accelerate launch`: the recipe and a driver script.

`accelerate launch --cpu --num_processes 2` starts a single process unless mpirun is
set up (accelerate's multi-CPU path goes through MPI), so the two processes are
started with torchrun through `--multi_gpu`, and ACCELERATE_USE_CPU=true makes
accelerate pick MULTI_CPU with the gloo backend on a machine without GPUs.

Checked: both ranks end with bit-identical parameters, logged metrics are means over
both ranks (the reward is the rank: 0 and 1, so the mean score is 0.5 exactly), and
only rank 0 prints and writes files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
UPDATES = 2

REWARD_SOURCE = '''
import os
import time

# Rank 1 gets to the trainer a little after rank 0, as a process on a busier machine
# would: nothing in a run may depend on which rank arrives first.
if os.environ.get("RANK") == "1":
    time.sleep(2.0)


def rank_score(prompts, completions, **columns):
    """Every completion of rank r scores r: the global mean over 2 ranks is 0.5."""
    return [float(os.environ["RANK"])] * len(completions)
'''

# The same steps as recipes/ppo.py (Config.from_yaml + run_ppo), then every rank dumps
# a digest of its parameters and the metrics it returned.
DRIVER_SOURCE = '''
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        ACCELERATE_USE_CPU="true",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
        script, *args,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    """Exit code, the error lines of any rank (they drown in torchrun's report), then the output tails."""
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "llm-rl:" in line or "Error:" in line]
    errors = list(dict.fromkeys(errors))[:20]
    return (f"exit {proc.returncode}\n--- errors\n" + "\n".join(errors)
            + f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ddp")
    (root / "rank_reward.py").write_text(REWARD_SOURCE)
    prompts = [f"{a}+{b}=" for a in (3, 45, 678, 9) for b in (1, 23, 456, 7)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    config = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(root / "prompts.jsonl"),
        "reward_funcs": [f"{root / 'rank_reward.py'}:rank_score"],
        "batch_size": 4,
        "max_new_tokens": 4,
        "learning_rate": 1e-3,
        "max_updates": UPDATES,
        "seed": 0,
        "progress_bar": False,
        "logging_steps": 1,
    }
    (root / "ddp.yaml").write_text(yaml.safe_dump(config))
    (root / "driver.py").write_text(DRIVER_SOURCE)
    return root


def test_ranks_end_with_identical_parameters(setup):
    proc = launch(str(setup / "driver.py"), [str(setup / "ddp.yaml"), "--output_dir", str(setup / "driver_out")],
                  setup)
    assert proc.returncode == 0, explain(proc)
    reports = [json.loads((setup / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["num_processes"] == 2 and r["distributed_type"].endswith("MULTI_CPU") for r in reports)
    assert reports[0]["digest"] == reports[1]["digest"], [
        name for name, s in reports[0]["sums"].items() if s != reports[1]["sums"][name]
    ]
    # and training moved them: the value head starts at zero
    assert any(s != 0.0 for name, s in reports[0]["sums"].items() if name.startswith("v_head."))
    # every rank returns the same (global) metrics
    assert reports[0]["history"][-1]["score/mean"] == reports[1]["history"][-1]["score/mean"] == 0.5


def test_recipe_logs_global_means_and_only_rank0_writes(setup):
    out = setup / "recipe_out"
    proc = launch("recipes/ppo.py", ["--config", str(setup / "ddp.yaml"), "--output_dir", str(out)], setup)
    assert proc.returncode == 0, explain(proc)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["update"] for r in rows] == list(range(1, UPDATES + 1))  # N lines, not 2N
    for row in rows:
        assert row["score/mean"] == 0.5  # rank 0 scores 0, rank 1 scores 1
        # 4 prompts per process and per update, counted over both processes
        assert row["response/tokens"] >= 2 * 4

    # only rank 0 prints its summary lines
    for update in range(1, UPDATES + 1):
        assert (proc.stdout + proc.stderr).count(f"update {update} |") == 1, explain(proc)
    for name in ("config.json", "model.safetensors", "value_head.safetensors", "config.yaml", "tokenizer.json"):
        assert (out / name).is_file(), name

    # the reward function's own mean is a global mean too
    key = "reward/rank_score"
    assert [row.get(key) for row in rows] == [0.5] * UPDATES, [{k: v for k, v in r.items() if "reward" in k}
                                                                for r in rows]
