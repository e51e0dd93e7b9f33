"""`llm-rl reward score`: row alignment, malformed lines, streaming, summary, the CLI in a subprocess."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, sequence_classifier

from llm_rl.rewards.functions import RewardError
from llm_rl.rewards.model import RewardModel
from llm_rl.rewards.score_files import Record, ScoreInputError, ScoreSummary, main, quantile, read_jsonl, score_records

LENGTH_REWARD = '''
def length(prompts, completions, **columns):
    """Deterministic: the completion's length in characters."""
    return [float(len(c)) for c in completions]
'''


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def good_row(i: int) -> str:
    return json.dumps({"prompt": f"p{i}", "completion": "x" * i, "id": i})


@pytest.fixture
def file_with_bad_lines(tmp_path) -> Path:
    """Eight rows; lines 3 (bad JSON), 5 (no completion) and 7 (completion not a string) are malformed."""
    lines = [good_row(i) for i in range(1, 9)]
    lines[2] = '{"prompt": "p3", "completion": '
    lines[4] = json.dumps({"prompt": "p5", "id": 5})
    lines[6] = json.dumps({"prompt": "p7", "completion": 7, "id": 7})
    return write_lines(tmp_path / "rows.jsonl", lines)


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args + ["--no_progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- malformed lines, alignment
def test_malformed_line_names_file_and_line(file_with_bad_lines):
    records = read_jsonl(file_with_bad_lines)
    assert [next(records).row["id"] for _ in range(2)] == [1, 2]
    with pytest.raises(ScoreInputError, match=rf"{file_with_bad_lines}:3: not valid JSON"):
        next(records)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (json.dumps({"prompt": "p"}), "no 'completion' field"),
        (json.dumps({"prompt": "p", "completion": ["a"]}), "'completion' must be a string, got list"),
        (json.dumps({"prompt": 3, "completion": "a"}), "'prompt' must be a string, got int"),
        (json.dumps(["p", "c"]), "expected a JSON object, got list"),
    ],
)
def test_each_kind_of_bad_row_is_explained(tmp_path, line, reason):
    path = write_lines(tmp_path / "one.jsonl", [good_row(1), line])
    with pytest.raises(ScoreInputError) as info:
        list(read_jsonl(path))
    assert f"{path}:2: {reason}" in str(info.value)


@pytest.fixture
def length_spec(tmp_path) -> str:
    """'file.py:length' for a reward function file, as a user would pass it."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    return f"{tmp_path / 'length_reward.py'}:length"


def test_skipping_bad_lines_keeps_every_other_row_with_its_own_score(file_with_bad_lines, tmp_path, length_spec, capsys):
    out, summary = tmp_path / "scored.jsonl", tmp_path / "summary.json"
    code, stdout, stderr = run_main(
        ["--reward", length_spec, "--input", str(file_with_bad_lines), "--output", str(out),
         "--skip_bad_lines", "--batch_size", "3", "--summary", str(summary)],
        capsys,
    )
    assert code == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 4, 6, 8]
    for r in rows:  # input row kept whole, score aligned with its own completion
        assert r == {"prompt": f"p{r['id']}", "completion": "x" * r["id"], "id": r["id"], "score": float(r["id"])}
    assert f"{file_with_bad_lines}:3" in stderr and f"{file_with_bad_lines}:5" in stderr
    stats = json.loads(summary.read_text())
    assert stats["count"] == 5 and stats["skipped"] == 3
    assert stats["min"] == 1.0 and stats["max"] == 8.0 and stats["p50"] == 4.0
    assert stats["mean"] == pytest.approx(21 / 5)
    assert "scored 5 rows, skipped 3" in stdout


def test_without_skip_the_run_fails_and_leaves_no_output(file_with_bad_lines, tmp_path, length_spec, capsys):
    out = tmp_path / "scored.jsonl"
    code, _, stderr = run_main(
        ["--reward", length_spec, "--input", str(file_with_bad_lines), "--output", str(out)],
        capsys,
    )
    assert code == 2
    assert f"{file_with_bad_lines}:3: not valid JSON" in stderr and "--skip_bad_lines" in stderr
    assert not out.exists() and not (tmp_path / "scored.jsonl.partial").exists()


def test_reward_gets_the_other_columns_and_wrong_counts_are_caught():
    records = [Record(f"f:{i}", {"prompt": "1+1=", "completion": c, "answer": "2"}) for i, c in enumerate("23")]

    def exact(prompts, completions, answer, **_):
        return [float(c == a) for c, a in zip(completions, answer)]

    assert [r["score"] for r in score_records(records, exact, batch_size=2)] == [1.0, 0.0]

    def one_short(prompts, completions, **_):
        return [0.0] * (len(completions) - 1)

    with pytest.raises(RewardError, match="scoring f:0 to f:1: .*returned 1 scores for 2 completions"):
        list(score_records(records, one_short, batch_size=2))


# ---------------------------------------------------------------- streaming
def test_scoring_is_lazy_one_batch_at_a_time():
    pulled = []

    def endless_rows():
        for i in itertools.count():
            pulled.append(i)
            yield Record(f"gen:{i}", {"prompt": "", "completion": "y" * (i % 7)})

    calls = []

    def reward(prompts, completions, **_):
        calls.append(len(completions))
        return [float(len(c)) for c in completions]

    first = list(itertools.islice(score_records(endless_rows(), reward, batch_size=4), 10))
    assert [r["score"] for r in first] == [float(i % 7) for i in range(10)]
    assert calls == [4, 4, 4] and len(pulled) == 12  # never more than the batch being scored


def test_file_is_read_line_by_line(tmp_path):
    # a bad line far down the file is not reached while the first rows are read
    path = write_lines(tmp_path / "big.jsonl", [good_row(i) for i in range(1, 1001)] + ["not json"])
    records = read_jsonl(path)
    assert [r.row["id"] for r in itertools.islice(records, 3)] == [1, 2, 3]
    with pytest.raises(ScoreInputError, match=":1001:"):
        list(records)


def test_dataset_input_saved_folder_and_data_file(tmp_path, length_spec, capsys):
    import datasets

    rows = [{"prompt": "p", "completion": "abc", "id": 0}, {"prompt": "p", "completion": None, "id": 1},
            {"prompt": "p", "completion": "a", "id": 2}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    write_lines(tmp_path / "rows.jsonl", [json.dumps(r) for r in rows])
    for source in (tmp_path / "saved", tmp_path / "rows.jsonl"):
        out = tmp_path / "out.jsonl"
        code, _, stderr = run_main(["--reward", length_spec, "--dataset", str(source), "--output", str(out),
                                    "--skip_bad_lines"], capsys)
        assert code == 0, stderr
        assert [(r["id"], r["score"]) for r in map(json.loads, out.read_text().splitlines())] == [(0, 3.0), (2, 1.0)]
        assert f"dataset '{source}' row 1: 'completion' must be a string, got NoneType" in stderr


# ---------------------------------------------------------------- summary
def test_summary_statistics_by_hand():
    summary = ScoreSummary()
    for score in [4.0, 1.0, 3.0, 2.0, 5.0]:
        summary.add(score)
    stats = summary.as_dict()
    assert stats["count"] == 5 and stats["mean"] == 3.0
    assert stats["std"] == pytest.approx(math.sqrt(2.0))  # population std: mean of (-2,-1,0,1,2)^2 = 2
    # linear interpolation over the sorted 1..5: q * 4 ranks above 1
    assert (stats["p5"], stats["p25"], stats["p50"], stats["p75"], stats["p95"]) == pytest.approx((1.2, 2, 3, 4, 4.8))
    assert stats["min"] == 1.0 and stats["max"] == 5.0 and stats["quantiles_exact"]
    assert quantile([7.0], 0.95) == 7.0


def test_summary_memory_is_bounded_and_quantiles_approximate():
    summary = ScoreSummary(sample_size=1000)
    for i in range(20_000):
        summary.add(float(i))
    stats = summary.as_dict()
    assert len(summary.sample) == 1000 and not stats["quantiles_exact"]
    assert stats["min"] == 0 and stats["max"] == 19_999 and stats["mean"] == pytest.approx(9999.5)
    assert stats["p50"] == pytest.approx(10_000, abs=1500)


# ---------------------------------------------------------------- model scoring
def test_model_reward_matches_unpadded_scores(tiny_model_dir):
    from transformers import AutoTokenizer

    model = sequence_classifier(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reward = RewardModel(model, tokenizer)
    prompts, completions = ["12+34=", "1+2=", "99+99="], ["46", "3<eos>", "198"]
    batched = reward(prompts, completions)
    alone = [reward([p], [c])[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(alone, abs=1e-5)


# ---------------------------------------------------------------- the command, in its own process
def test_cli_scores_a_file_in_a_subprocess(tmp_path, length_spec):
    data = write_lines(tmp_path / "in.jsonl", [good_row(i) for i in (3, 1, 2)] + ["", "{oops"])
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "llm_rl.cli", "reward", "score", "--reward", length_spec,
         "--input", str(data), "--output", str(out), "--summary", str(summary), "--skip_bad_lines"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [3.0, 1.0, 2.0]
    assert json.loads(summary.read_text())["skipped"] == 1
    assert f"{data}:5" in proc.stderr and "scored 3 rows, skipped 1" in proc.stdout
