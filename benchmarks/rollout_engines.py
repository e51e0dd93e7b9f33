#!/usr/bin/env python
"""One GRPO update with `rollout_engine: hf` and with `rollout_engine: vllm`: same model, prompts, seed and
settings, in one invocation, at each length and model size.

    python benchmarks/rollout_engines.py                                    # in the vLLM venv: 30M and 100M, 256 and 1024
    python benchmarks/rollout_engines.py --models 30M --tokens 256 1024
    python benchmarks/rollout_engines.py --tiny --tokens 8 --updates 1 --warmup 0   # smoke run

Run it with the interpreter of a venv that has the `[vllm]` extra (both sides run there, so they share one
transformers). Every side, model and length runs in its own process; the policy is a Llama-style decoder with an
untied 32000-word vocabulary built offline with a fixed seed, and the tokenizer's EOS lies outside its logits,
so every completion is exactly `--tokens` long on both sides. Settings are long_responses.py's (one epoch, one
minibatch, lr 1e-4, no KL, token-mean loss) with `--prompts` prompts x `--generations` completions. Per side the
figure is the median of the timed updates; `generation` is the sampling phase (vllm: with its weight push),
`sync` the weight push alone.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from pathlib import Path

try:  # run as `python benchmarks/rollout_engines.py` (its folder on sys.path) or imported as a module
    from . import harness, side_llm_rl
    from .long_responses import PROMPT_WORDS, SETTINGS, build_assets
except ImportError:
    import harness
    import side_llm_rl
    from long_responses import PROMPT_WORDS, SETTINGS, build_assets

BASE = dict(max_position_embeddings=2112, tie_word_embeddings=False)
MODELS = {  # with the 32000-word embeddings and lm head
    "30M": dict(BASE, hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                num_key_value_heads=6),
    "100M": dict(BASE, hidden_size=640, intermediate_size=1728, num_hidden_layers=10, num_attention_heads=10,
                 num_key_value_heads=10),
    "tiny": dict(BASE, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2),
}
TARGETS = {"generation_at_256": 2.0, "update_at_256": 1.5, "update_at_1024": 3.0, "sync_fraction": 0.05}  # issue 21
WORKERS = {"hf": functools.partial(side_llm_rl.grpo_worker, sampling={"rollout_engine": "hf"}),
           "vllm": functools.partial(side_llm_rl.grpo_worker,
                                     sampling={"rollout_engine": "vllm", "vllm_kv_cache_gb": 2})}


def spawn(side: str, model: str, tokens: int, a: argparse.Namespace, assets_file: Path) -> dict:
    result_file = Path(a.workdir) / f"result_{side}_{model}_{tokens}.json"
    cmd = harness.worker_command(sys.executable, __file__, side, assets_file, result_file, 0)
    cmd += ["--_tokens", str(tokens), "--updates", str(a.updates), "--warmup", str(a.warmup), "--workdir",
            str(Path(a.workdir) / model), "--threads", str(a.threads)]
    return harness.run_worker(cmd, result_file, f"the {side} worker ({model}, {tokens} tokens)")


def med(values: list) -> float:
    return statistics.median(values)


def make_record(a, results: dict, params: dict, load: tuple) -> dict:
    """The JSON last line: one entry per (model, length) in the order run, in the issue's keys."""
    runs = [(m, n) for m in a.models for n in a.tokens]

    def per_run(side, pick):
        return [pick(results[side, m, n]) for m, n in runs]

    hf, vllm = per_run("hf", lambda r: med(r["seconds"])), per_run("vllm", lambda r: med(r["seconds"]))
    hf_gen = per_run("hf", lambda r: med(r["phases"]["generate"]))
    vllm_gen = per_run("vllm", lambda r: med(r["phases"]["generate"]))
    sync = per_run("vllm", lambda r: med(r["phases"]["weight_sync"]))
    record = {
        "models": [m for m, _ in runs], "tokens": [n for _, n in runs],
        "policy_params": [params[m] for m, _ in runs],
        "hf_seconds_per_update": hf, "vllm_seconds_per_update": vllm,
        "vllm_over_hf": [h / v for h, v in zip(hf, vllm)],  # how many times faster the update is with vllm
        "hf_generation_seconds": hf_gen, "vllm_generation_seconds": vllm_gen,
        "generation_over_hf": [h / v for h, v in zip(hf_gen, vllm_gen)],
        "sync_seconds": sync, "sync_fraction": [s / v for s, v in zip(sync, vllm)],
        "peak_rss_mb": {side: per_run(side, lambda r: r["peak_rss_process_mb"]) for side in ("hf", "vllm")},
    }
    record["targets"] = {
        f"{m} {n}": {**({"generation_2x": record["generation_over_hf"][i] >= TARGETS["generation_at_256"],
                          "update_1.5x": record["vllm_over_hf"][i] >= TARGETS["update_at_256"]} if n == 256 else {}),
                     **({"update_3x": record["vllm_over_hf"][i] >= TARGETS["update_at_1024"]} if n == 1024 else {}),
                     "sync_under_5%": record["sync_fraction"][i] < TARGETS["sync_fraction"]}
        for i, (m, n) in enumerate(runs)}
    record.update({"settings": {**SETTINGS, "prompt_tokens": PROMPT_WORDS, "updates": a.updates,
                                "warmup": a.warmup, "threads": a.threads},
                   "load_average": {"before": load[0], "after": load[1]},
                   **harness.environment(("torch", "transformers", "accelerate", "vllm"))})
    return record


def print_table(record: dict) -> None:
    widths = (6, 7, 12, 12, 9, 12, 12, 9, 9)
    print(harness.table_row("model", "tokens", "hf s/upd", "vllm s/upd", "speedup", "hf gen s", "vllm gen s",
                            "gen x", "sync %", widths=widths))
    for i, (m, n) in enumerate(zip(record["models"], record["tokens"])):
        print(harness.table_row(m, str(n), f"{record['hf_seconds_per_update'][i]:.2f}",
                                f"{record['vllm_seconds_per_update'][i]:.2f}", f"{record['vllm_over_hf'][i]:.2f}",
                                f"{record['hf_generation_seconds'][i]:.2f}", f"{record['vllm_generation_seconds'][i]:.2f}",
                                f"{record['generation_over_hf'][i]:.2f}", f"{100 * record['sync_fraction'][i]:.1f}",
                                widths=widths))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=[m for m in MODELS if m != "tiny"], default=["30M", "100M"])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="max_new_tokens settings")
    p.add_argument("--prompts", type=int, default=4, help="prompts per update")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--updates", type=int, default=2, help="timed updates per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first (vllm's first call warms it up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch default)")
    p.add_argument("--tiny", action="store_true", help="a 1-layer, 64-wide model: smoke runs")
    p.add_argument("--workdir", default=None, help="folder for the models, data and outputs (default: a temp folder)")
    harness.add_worker_args(p, list(WORKERS))
    p.add_argument("--_tokens", type=int, default=256, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        harness.worker_main(a, WORKERS)
        return
    if a.updates < 1 or a.warmup < 0 or min(a.tokens) < 1:
        p.error("--updates >= 1, --warmup >= 0, --tokens >= 1")
    if max(a.tokens) + PROMPT_WORDS > BASE["max_position_embeddings"]:
        p.error(f"--tokens: at most {BASE['max_position_embeddings'] - PROMPT_WORDS}")
    if a.tiny:
        a.models = ["tiny"]
    SETTINGS.update(batch_prompts=a.prompts, num_generations=a.generations)
    tmp = harness.open_workdir(a, "rollout_engines_")
    load_before = os.getloadavg()
    results, params = {}, {}
    for m in a.models:
        assets = {**build_assets(Path(a.workdir) / m / "assets", SETTINGS["seed"], MODELS[m]), "model": MODELS[m],
                  "settings": dict(SETTINGS)}
        params[m] = assets["policy_params"]
        assets_file = harness.write_assets(str(Path(a.workdir) / m), assets)
        for n in a.tokens:
            for side in WORKERS:
                harness.announce(f"{side}, {m}, {n} tokens")
                results[side, m, n] = spawn(side, m, n, a, assets_file)
    record = make_record(a, results, params, (load_before, os.getloadavg()))
    print(f"\nOne GRPO update, {a.prompts} prompts x {a.generations} completions, fp32 CPU; median of {a.updates} "
          f"after {a.warmup} warm-up; load average before {load_before[0]:.2f}, after "
          f"{record['load_average']['after'][0]:.2f}")
    print_table(record)
    print()
    harness.finish(record, tmp)


if __name__ == "__main__":
    main()
