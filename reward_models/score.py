"""Add a reward score to every prompt + completion row of a JSONL file (or a datasets dataset), streaming.

With a reward model (a Hub id or a folder written by reward_models/train.py):
    python reward_models/score.py --model outputs/addition_rlhf/reward_model --input rows.jsonl --output scored.jsonl
With a reward function instead ('package.module:function' or 'file.py:function'):
    python reward_models/score.py --reward llm_rl.tasks.arithmetic:reward --input rows.jsonl --output scored.jsonl
From a datasets dataset, with the summary also written as JSON:
    python reward_models/score.py --model PATH --dataset NAME --dataset_split test --output scored.jsonl --summary summary.json

Each input line is a JSON object with `prompt` and `completion` (other fields are kept and, for
reward functions, passed as keyword columns); each output line is that object plus `score`.
Malformed lines stop the run with FILE:LINE, or with --skip_bad_lines are skipped and counted.
The same command: `llm-rl reward score ...`; all options: `llm-rl reward score --help`.
"""

import sys

from llm_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["reward", "score", *sys.argv[1:]]))
