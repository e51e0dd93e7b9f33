"""The PPO update benchmark runs end to end on a minimal model and ends with one JSON line.

No timing assertions: only that the script works and reports finite numbers. TRL is not
needed (no --compare).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "ppo_update.py"


def finite_numbers(obj, path="record"):
    """Yield (path, value) for every number in a nested JSON value."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from finite_numbers(v, f"{path}[{i}]")


def test_benchmark_tiny_emits_json(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--updates", "1", "--warmup", "0", "--threads", "1",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    record = json.loads(last)
    for key in ("seconds_per_update", "tokens_per_second", "peak_rss_mb"):
        assert key in record, f"missing {key}"
        assert isinstance(record[key], (int, float)) and math.isfinite(record[key]) and record[key] > 0, key
    for where, value in finite_numbers(record):
        assert math.isfinite(value), f"{where} = {value}"
    settings = record["settings"]
    assert settings["batch_size"] == 2 and settings["max_new_tokens"] == 4
    assert record["tokens_per_update"] == settings["batch_size"] * settings["max_new_tokens"]
    assert "trl_seconds_per_update" not in record  # no --compare


def test_long_responses_tiny_emits_json(tmp_path):
    """benchmarks/long_responses.py, both llm_rl sides on a one-layer model: the JSON line has a figure per
    side and length, and both sides trained on the same fixed-length completions."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "long_responses.py"), "--tiny", "--sides", "chunked", "unchunked",
         "--tokens", "8", "--updates", "1", "--warmup", "0", "--threads", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["tokens"] == [8]
    for side in ("chunked", "unchunked"):
        assert len(record["seconds_per_update"][side]) == 1 and record["seconds_per_update"][side][0] > 0
        assert len(record["peak_rss_mb"][side]) == 1 and record["peak_rss_mb"][side][0] > 0
    assert "trl" not in record["seconds_per_update"]
    for where, value in finite_numbers(record):
        assert math.isfinite(value), f"{where} = {value}"
