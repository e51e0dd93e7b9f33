#!/usr/bin/env python
"""Peak memory and seconds of one GRPO update at 256-2048 new tokens over a 32k vocabulary: llm_rl with the
chunked log-probs (the default), llm_rl with `chunked_logprobs: false` (log-probs from the full logits), and
TRL 1.16's GRPOTrainer (its fused lm-head path), all in one invocation.

    python benchmarks/long_responses.py --trl-python /work/venv-trl116/bin/python      # all three sides
    python benchmarks/long_responses.py --sides chunked unchunked --tokens 256 1024     # llm_rl only
    python benchmarks/long_responses.py --sides chunked --tokens 16 --updates 1 --warmup 0 --tiny   # smoke run

Every side and length runs in its own process, so the peak RSS (`ru_maxrss` at the end of the process:
setup, generation, scoring and training) belongs to that setting alone. The model is a Llama-style decoder
(4 layers x 256, 4 heads, SwiGLU 688, untied 32000-word embeddings and lm head: 19.6M parameters) built
offline from a config with a fixed seed; the tokenizer is grpo_update.py's word-level one, whose EOS lies
outside the model's 32000 logits, so every completion is exactly `--tokens` long on every side and all
train on the same number of tokens. The settings are grpo_update.py's (one epoch, one minibatch, lr 1e-4,
no KL, token-mean loss; TRL: loss_type dapo, fp32, no gradient checkpointing) with 2 prompts x 2
completions per update. The figure per side is the median of the timed updates.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
from pathlib import Path

try:  # run as `python benchmarks/long_responses.py` (its folder on sys.path) or imported as a module
    from . import harness, side_llm_rl, side_trl
except ImportError:
    import harness
    import side_llm_rl
    import side_trl

VOCAB = 32000
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=2112, tie_word_embeddings=False)
TINY_MODEL = dict(MODEL, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2)
PROMPT_WORDS = 16
SETTINGS = dict(harness.GRPO_SETTINGS, batch_prompts=2, num_generations=2)  # 4 completions per update
TARGETS = {"tokens": 1024, "memory_vs_unchunked": 0.5, "time_vs_unchunked": 1.1}  # issue 23, at 1024 tokens
WORKERS = {"chunked": functools.partial(side_llm_rl.grpo_worker, model={"chunked_logprobs": True}),
           "unchunked": functools.partial(side_llm_rl.grpo_worker, model={"chunked_logprobs": False}),
           "trl": side_trl.grpo_worker}


def build_assets(root: Path, seed: int, model: dict) -> dict:
    """The Llama-style policy, its tokenizer and the prompts (16 random words, an `answer` for the reward)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None, **model)
    policy = LlamaForCausalLM(config)
    path = root / "policy"
    harness.save_policy(policy, path)
    harness.word_tokenizer(VOCAB).save_pretrained(path)
    rng = random.Random(seed)

    def row():
        words = [f"w{rng.randrange(VOCAB)}" for _ in range(PROMPT_WORDS)]
        return {"prompt": " ".join(words), "answer": " ".join(reversed(words[:4]))}

    data = harness.write_jsonl(root / "prompts.jsonl", (row() for _ in range(64)))
    return {"policy": str(path), "data": data, "policy_params": harness.n_params(policy), "vocab": VOCAB,
            "settings": SETTINGS}


def spawn(side: str, tokens: int, a: argparse.Namespace, assets_file: Path) -> dict:
    result_file = Path(a.workdir) / f"result_{side}_{tokens}.json"
    python = a.trl_python if side == "trl" else sys.executable
    cmd = harness.worker_command(python, __file__, side, assets_file, result_file, 0)
    cmd += ["--_tokens", str(tokens), "--updates", str(a.updates), "--warmup", str(a.warmup), "--workdir", a.workdir,
            "--threads", str(a.threads), "--trl-optim", "adamw_torch"]
    return harness.run_worker(cmd, result_file, f"the {side} worker ({tokens} tokens)")


def ratios(table: dict, key: str, top: str, bottom: str, tokens: list[int]) -> list:
    """`top` / `bottom` per length for `key` (None where either side did not run)."""
    return [table[top][key][i] / table[bottom][key][i] if top in table and bottom in table else None
            for i in range(len(tokens))]


def make_record(a, results: dict, assets: dict, load: tuple, trl_version) -> dict:
    """The JSON last line: per side, seconds per update (median) and peak RSS per length; the ratios; the targets."""
    table = {side: {"seconds_per_update": [statistics.median(results[side, n]["seconds"]) for n in a.tokens],
                    "peak_rss_mb": [results[side, n]["peak_rss_process_mb"] for n in a.tokens],
                    "rss_after_setup_mb": [results[side, n]["rss_after_setup_mb"] for n in a.tokens]}
             for side in a.sides}
    record = {
        "tokens": a.tokens,
        "seconds_per_update": {side: t["seconds_per_update"] for side, t in table.items()},
        "peak_rss_mb": {side: t["peak_rss_mb"] for side, t in table.items()},
        "rss_after_setup_mb": {side: t["rss_after_setup_mb"] for side, t in table.items()},
        "ratios": {
            "memory_chunked_over_unchunked": ratios(table, "peak_rss_mb", "chunked", "unchunked", a.tokens),
            "memory_chunked_over_trl": ratios(table, "peak_rss_mb", "chunked", "trl", a.tokens),
            "time_chunked_over_unchunked": ratios(table, "seconds_per_update", "chunked", "unchunked", a.tokens),
            "time_chunked_over_trl": ratios(table, "seconds_per_update", "chunked", "trl", a.tokens),
        },
    }
    if TARGETS["tokens"] in a.tokens and {"chunked", "unchunked"} <= set(a.sides):
        i = a.tokens.index(TARGETS["tokens"])
        r = record["ratios"]
        record["targets_at_1024"] = {
            "memory_at_most_half_of_unchunked": r["memory_chunked_over_unchunked"][i] <= TARGETS["memory_vs_unchunked"],
            "time_at_most_1.1x_unchunked": r["time_chunked_over_unchunked"][i] <= TARGETS["time_vs_unchunked"],
            **({"memory_below_trl": r["memory_chunked_over_trl"][i] < 1.0} if "trl" in a.sides else {}),
        }
    record.update({"settings": {**SETTINGS, "model": assets["model"], "vocab": VOCAB, "prompt_tokens": PROMPT_WORDS,
                                "updates": a.updates, "warmup": a.warmup, "threads": a.threads},
                   "policy_params": assets["policy_params"], "trl_version": trl_version,
                   "load_average": {"before": load[0], "after": load[1]},
                   **harness.environment(("torch", "transformers", "accelerate"))})
    return record


def print_table(record: dict) -> None:
    sides = list(record["seconds_per_update"])
    widths = (10, *([22] * len(sides)))
    print(harness.table_row("tokens", *(f"{s}: s/update, peak MB" for s in sides), widths=widths))
    for i, n in enumerate(record["tokens"]):
        cells = [f"{record['seconds_per_update'][s][i]:.2f}, {record['peak_rss_mb'][s][i]:.0f}" for s in sides]
        print(harness.table_row(str(n), *cells, widths=widths))
    for name, values in record["ratios"].items():
        if any(v is not None for v in values):
            print(f"{name}: " + ", ".join("-" if v is None else f"{v:.2f}" for v in values))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048], help="max_new_tokens settings")
    p.add_argument("--sides", nargs="+", choices=list(WORKERS), default=list(WORKERS))
    p.add_argument("--updates", type=int, default=2, help="timed updates per side and length")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each worker (0: torch default)")
    p.add_argument("--tiny", action="store_true", help="a 1-layer, 32-wide model (same vocabulary): smoke runs")
    p.add_argument("--trl-python", "--trl_python", dest="trl_python", default=sys.executable,
                   help="interpreter for TRL's side; it needs trl 1.16.x and psutil (default: this one)")
    p.add_argument("--workdir", default=None, help="folder for the model, data and outputs (default: a temp folder)")
    harness.add_worker_args(p, list(WORKERS))
    p.add_argument("--_tokens", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--trl-optim", dest="trl_optim", default="adamw_torch", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        harness.worker_main(a, WORKERS)
        return
    if a.updates < 1 or a.warmup < 0 or min(a.tokens) < 1:
        p.error("--updates >= 1, --warmup >= 0, --tokens >= 1")
    model = TINY_MODEL if a.tiny else MODEL
    if max(a.tokens) + PROMPT_WORDS > model["max_position_embeddings"]:
        p.error(f"--tokens: at most {model['max_position_embeddings'] - PROMPT_WORDS} (the model's positions)")
    trl_version = side_trl.check_grpo_python(a.trl_python) if "trl" in a.sides else None

    tmp = harness.open_workdir(a, "long_responses_")
    load_before = os.getloadavg()
    assets = {**build_assets(Path(a.workdir) / "assets", SETTINGS["seed"], model), "model": model}
    assets_file = harness.write_assets(a.workdir, assets)
    results = {}
    for n in a.tokens:
        for side in a.sides:
            harness.announce(f"{side}, {n} tokens")
            results[side, n] = spawn(side, n, a, assets_file)
    record = make_record(a, results, assets, (load_before, os.getloadavg()), trl_version)
    print(f"\nOne GRPO update, Llama-style {assets['policy_params'] / 1e6:.1f}M parameters, {VOCAB} vocabulary, "
          f"{SETTINGS['batch_prompts']} prompts x {SETTINGS['num_generations']} completions, fp32 CPU; median of "
          f"{a.updates} after {a.warmup} warm-up; load average before {load_before[0]:.2f}, after "
          f"{record['load_average']['after'][0]:.2f}")
    print_table(record)
    print()
    harness.finish(record, tmp)


if __name__ == "__main__":
    main()
