#!/usr/bin/env python
"""Seconds per critic-free (GRPO) update of llm_rl against TRL 1.16's GRPOTrainer.

    python benchmarks/grpo_update.py --trl-python /work/venv-trl116/bin/python      # both sides, 6 and 48 tokens
    python benchmarks/grpo_update.py --trl-python ... --threads 1 --rounds 3           # on a shared machine
    python benchmarks/grpo_update.py --sides ours --tokens 6 --updates 2 --warmup 0    # smoke run, no TRL

TRL 1.16 and TRL 1.12 (which `ppo_update.py --compare trl` needs) cannot share one environment, so each
side runs in its own subprocess and TRL's side may run under another interpreter (`--trl-python`, default:
this one); that interpreter needs `pip install trl==1.16.0 psutil` (or `pip install -e .[bench-grpo]`).
Nothing of llm_rl is imported on TRL's side.

Both sides train the same tiny character-level GPT-2 (4 layers x 128, 4 heads, 0.80M parameters) on the same
addition prompts ("357+468="), 32 prompts x 8 completions = 256 completions per update, with the same
Python reward function on the completion text, one epoch over one minibatch, lr 1e-4, no KL. The model
has no logit for EOS (the tokenizer's special tokens lie outside its vocabulary), so every completion is
exactly `max_new_tokens` long on both sides and both train on the same number of tokens.

This file is the driver: options, the sequence of runs, the tables and the JSON last line. The sides are
side_llm_rl.py and side_trl.py; what they share is harness.py.
See benchmarks/README.md for what is measured and every setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

try:  # run as `python benchmarks/grpo_update.py` (its folder on sys.path) or imported as benchmarks.grpo_update
    from . import harness, side_llm_rl, side_trl
except ImportError:
    import harness
    import side_llm_rl
    import side_trl

BAR_SHORT, BAR_LONG = 1.5, 1.2  # issue 15: TRL seconds / llm_rl seconds per update (means) at <= 8 and 48 tokens
WORKERS = {"ours": side_llm_rl.grpo_worker, "trl": side_trl.grpo_worker}
MODEL, SETTINGS = harness.GRPO_MODEL, harness.GRPO_SETTINGS


def spawn(side: str, tokens: int, a: argparse.Namespace, assets_file: Path, round_: int) -> dict:
    result_file = Path(a.workdir) / f"result_{side}_{tokens}_{round_}.json"
    python = a.trl_python if side == "trl" else a.ours_python
    cmd = harness.worker_command(python, __file__, side, assets_file, result_file, round_)
    cmd += ["--_tokens", str(tokens), "--updates", str(a.updates), "--warmup", str(a.warmup), "--workdir", a.workdir,
            "--threads", str(a.threads), "--trl-optim", a.trl_optim]
    return harness.run_worker(cmd, result_file, f"the {side} worker ({tokens} tokens)")


def summarize(rounds: list[dict]) -> dict:
    pool = harness.pooled(rounds, "seconds")
    gcs = harness.pooled(rounds, "gc")
    slowest = sorted(zip(pool, gcs), key=lambda p: -p[0])[: max(1, len(pool) // 100)]
    mean = statistics.fmean
    return {
        "seconds": harness.stats(pool),
        "inner": harness.stats(harness.pooled(rounds, "inner_seconds")),
        "phases": {k: {"median": harness.median(v), "mean": mean(v)}
                   for k in rounds[0]["phases"] for v in [[x for r in rounds for x in r["phases"][k]]]},
        "per_round_mean": [mean(r["seconds"]) for r in rounds],
        "gc_seconds_per_update": mean(g["seconds"] for g in gcs),
        "gc_gen2_per_update": mean(g["gen2"] for g in gcs),
        "slowest": [{"seconds": t, "gc_seconds": g["seconds"], "gen2": g["gen2"]} for t, g in slowest],
        **harness.pooled_memory(rounds),
        "tokens_per_update": rounds[0]["tokens_per_update"][0], "threads": rounds[0]["threads"],
    }


def print_table(tokens: int, ours: dict | None, trl: dict | None) -> None:
    def row(*cells):
        return harness.table_row(*cells, widths=(30, 16, 16, 9))

    def pair(stat_o, stat_t, key, fmt="{:.3f}"):
        o = fmt.format(stat_o[key]) if stat_o else "-"
        t = fmt.format(stat_t[key]) if stat_t else "-"
        ratio = f"{stat_t[key] / stat_o[key]:.2f}x" if stat_o and stat_t and stat_o[key] else ""
        return o, t, ratio

    any_side = ours or trl
    print(f"\n{tokens} new tokens: 256 completions x {tokens} = {any_side['tokens_per_update']} tokens per update, "
          f"{any_side['threads']} torch threads, {any_side['seconds']['n']} timed updates per side")
    print(row("seconds per update", "llm_rl", "TRL 1.16", "TRL/ours"))
    print(row("-" * 30, "-" * 16, "-" * 16, "-" * 9))
    for key in ("mean", "median", "p99", "max", "min"):
        print(row(f"  {key}", *pair(ours and ours["seconds"], trl and trl["seconds"], key)))
    print(row("  mean w/o logging & loop", *pair(ours and ours["inner"], trl and trl["inner"], "mean")))
    print(row("phases (median; mean)", "", "", ""))

    def ph(side, k):
        return f"{side['phases'][k]['median']:.3f}; {side['phases'][k]['mean']:.3f}" if side and k in side["phases"] else "-"

    for label, ko, kt in [("  generate", "generate", "generate"), ("  reference forward", "reference", None),
                          ("  reward", "reward", "reward"), ("  rollout other (TRL)", None, "rollout_other"),
                          ("  train (fwd, bwd, AdamW)", "train", "train"), ("  rest (log, loop)", "rest", "rest")]:
        print(row(label, ph(ours, ko) if ko else "-", ph(trl, kt) if kt else "-"))
    for label, key, fmt in [("gc seconds / update", "gc_seconds_per_update", "{:.4f}"),
                            ("gen-2 collections / update", "gc_gen2_per_update", "{:.2f}"),
                            ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"), ("RSS after setup (MB)", "rss_after_setup_mb", "{:.0f}"),
                            ("peak - after setup (MB)", "peak_growth_mb", "{:.0f}")]:
        print(row(label, fmt.format(ours[key]) if ours else "-", fmt.format(trl[key]) if trl else "-"))
    for name, side in (("llm_rl", ours), ("TRL", trl)):
        if side:
            print(f"  slowest 1% {name}: " + ", ".join(f"{s['seconds']:.3f}s (gc {s['gc_seconds']:.3f}s, "
                                                        f"{s['gen2']} gen-2)" for s in side["slowest"]))


def make_record(a: argparse.Namespace, summary: dict, assets: dict, load: tuple, trl_version: str | None) -> dict:
    """The JSON last line (keys: benchmarks/README.md)."""
    record: dict = {"settings": {**SETTINGS, "model": MODEL, "tokens": a.tokens, "updates": a.updates,
                                 "warmup": a.warmup, "rounds": a.rounds, "threads": a.threads, "trl_optim": a.trl_optim},
                    "policy_params": assets["policy_params"]}
    for n in a.tokens:
        entry = {f"{side}_{k}": v for side in a.sides for k, v in summary[side, n].items()}
        entry["max_new_tokens"] = n
        if "ours" in a.sides and "trl" in a.sides:
            ratio = summary["trl", n]["seconds"]["mean"] / summary["ours", n]["seconds"]["mean"]
            entry["trl_over_ours"] = ratio
            entry["trl_over_ours_median"] = summary["trl", n]["seconds"]["median"] / summary["ours", n]["seconds"]["median"]
            entry["bar"] = BAR_SHORT if n <= 8 else BAR_LONG  # the bar: 1.5 at <= 8 tokens, 1.2 at 48
            entry["bar_met"] = ratio >= entry["bar"]
            record.setdefault("trl_over_ours", {})[label(n)] = ratio
        record[label(n)] = entry
    record.update({"load_average": {"before": load[0], "after": load[1]},
                   **harness.environment(("torch", "transformers", "accelerate")), "trl_version": trl_version})
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[6, 48], help="max_new_tokens settings (default 6 48)")
    p.add_argument("--sides", nargs="+", choices=["ours", "trl"], default=["ours", "trl"])
    p.add_argument("--updates", type=int, default=20, help="timed updates per side, setting and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    p.add_argument("--rounds", type=int, default=2, help="run every side this many times, interleaved")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each worker (0: torch default)")
    p.add_argument("--trl-python", "--trl_python", dest="trl_python", default=sys.executable,
                   help="interpreter for TRL's side; it needs trl 1.16.x (default: this one)")
    p.add_argument("--ours-python", "--ours_python", dest="ours_python", default=sys.executable,
                   help="interpreter for llm_rl's side (default: this one); llm_rl comes from this checkout")
    p.add_argument("--trl-optim", "--trl_optim", dest="trl_optim", default="adamw_torch",
                   choices=["adamw_torch", "adamw_torch_fused"],
                   help="TRL's optimizer: adamw_torch = llm_rl's torch.optim.AdamW (default); TRL's own default is fused")
    p.add_argument("--workdir", default=None, help="folder for the model, data and outputs (default: a temp folder)")
    harness.add_worker_args(p, list(WORKERS))
    p.add_argument("--_tokens", type=int, default=6, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        harness.worker_main(a, WORKERS)
        return
    if a.updates < 1 or a.warmup < 0 or a.rounds < 1 or min(a.tokens) < 1:
        p.error("--updates >= 1, --warmup >= 0, --rounds >= 1, --tokens >= 1")
    if max(a.tokens) + 8 > MODEL["n_positions"]:
        p.error(f"--tokens: at most {MODEL['n_positions'] - 8} (the model's positions)")
    trl_version = side_trl.check_grpo_python(a.trl_python) if "trl" in a.sides else None

    tmp = harness.open_workdir(a, "grpo_bench_")
    load_before = os.getloadavg()
    assets = harness.build_grpo_assets(Path(a.workdir) / "assets", SETTINGS["seed"])
    assets_file = harness.write_assets(a.workdir, assets)

    results = {(side, n): [] for n in a.tokens for side in a.sides}
    for round_ in range(a.rounds):
        for n in a.tokens:
            for side in harness.round_order(a.sides, round_):
                harness.announce(f"round {round_ + 1}/{a.rounds}: {side}, {n} tokens")
                results[side, n].append(spawn(side, n, a, assets_file, round_))
    load_after = os.getloadavg()
    summary = {key: summarize(rounds) for key, rounds in results.items()}

    print(f"\nGRPO update benchmark: GPT-2 {MODEL['n_layer']} x {MODEL['n_embd']} ({assets['policy_params'] / 1e6:.2f}M "
          f"params, {len(harness.GRPO_CHARS)}-character vocabulary), {SETTINGS['batch_prompts']} prompts x "
          f"{SETTINGS['num_generations']} completions, fp32 CPU; llm_rl (grpo) vs TRL {trl_version or '-'} GRPOTrainer")
    print(f"{a.rounds} round(s) x {a.updates} timed updates after {a.warmup} warm-up; load average (1, 5, 15 min) "
          f"before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}")
    print("seconds per update = one full loop iteration (llm_rl: difference of time/elapsed; TRL: on_step_end to "
          "on_step_end)")
    for n in a.tokens:
        print_table(n, summary.get(("ours", n)), summary.get(("trl", n)))
    print()
    harness.finish(make_record(a, summary, assets, (load_before, load_after), trl_version), tmp)


def label(tokens: int) -> str:
    return "short" if tokens <= 8 else "long" if tokens == 48 else f"tokens_{tokens}"


if __name__ == "__main__":
    main()
