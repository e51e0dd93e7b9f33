#!/usr/bin/env python
"""Seconds per PPO update of llm_rl, optionally against TRL 1.12's PPO and against a model-pass floor.

    python benchmarks/ppo_update.py                          # ours, default size (4 x 256 GPT-2)
    python benchmarks/ppo_update.py --compare trl --floor    # + TRL on the same models/data, + floor
    python benchmarks/ppo_update.py --size large             # ~26M-parameter policy (8 x 512)
    python benchmarks/ppo_update.py --tiny --updates 1 --warmup 0   # smoke run (seconds)

Everything is built offline: a WordLevel tokenizer over a synthetic vocabulary, GPT-2 policy and
reward models from configs, saved to a temporary folder and loaded back with `from_pretrained`,
and a jsonl file of random 16-token prompts. Each side (ours, TRL, floor) runs in its own
subprocess so its peak RSS is its own; `--rounds N` runs the sides N times, interleaved, and
takes medians over all timed updates of all rounds (useful on a shared, noisy machine).

The policy never emits EOS: the tokenizer's special tokens (<pad>, <eos>, <unk>) have ids
>= the model's vocab_size, so the model has no logit for them and every response is exactly
`max_new_tokens` long, on both sides (TRL: stop_token None; checked per update).

This file is the driver: options, the sequence of runs, the table and the JSON last line (see README.md for
its keys). The sides are side_llm_rl.py, side_trl.py and side_floor.py; what they share is harness.py.
See benchmarks/README.md for what is measured and every setting of both sides.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:  # run as `python benchmarks/ppo_update.py` (its folder on sys.path) or imported as benchmarks.ppo_update
    from . import harness, side_floor, side_llm_rl, side_trl
except ImportError:
    import harness
    import side_floor
    import side_llm_rl
    import side_trl

SIDES = ["ours", "trl", "floor"]
WORKERS = {"ours": side_llm_rl.ppo_worker, "trl": side_trl.ppo_worker, "floor": side_floor.floor_worker}


def spawn(side: str, a: argparse.Namespace, assets_file: Path, round_: int) -> dict:
    result_file = Path(a.workdir) / f"result_{side}_{round_}.json"
    cmd = harness.worker_command(sys.executable, __file__, side, assets_file, result_file, round_)
    cmd += ["--updates", str(a.updates), "--warmup", str(a.warmup), "--size", a.size, "--workdir", a.workdir,
            "--profile_top", str(a.profile_top)]
    if a.tiny:
        cmd.append("--tiny")
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    if a.profile and a.profile_side == side:
        cmd += ["--profile", a.profile, "--profile_side", side]
    return harness.run_worker(cmd, result_file, f"the {side} worker")


def summarize(results: dict[str, list[dict]]) -> dict:
    """Pool timed updates of every round per side; medians."""
    median, out = harness.median, {}
    for side, rounds in results.items():
        if side == "floor":
            passes = {k: median([x for r in rounds for x in r["passes"][k]]) for k in rounds[0]["passes"]}
            out[side] = {"passes": passes, "seconds": sum(passes.values()),
                         # one epoch, one minibatch: the training forward can give the old log-probs and values
                         "seconds_fused": sum(v for k, v in passes.items() if k != "policy_value_forward"),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds)}
            continue
        seconds = harness.stats(harness.pooled(rounds, "update_seconds"))
        memory = harness.pooled_memory(rounds)
        out[side] = {
            "seconds": seconds["median"], "min": seconds["min"], "max": seconds["max"], "n": seconds["n"],
            "per_round_median": [median(r["update_seconds"]) for r in rounds],
            "phases": {k: median([x for r in rounds for x in r["phases"][k]]) for k in rounds[0]["phases"]},
            "tokens_per_update": rounds[0]["tokens_per_update"],
            "peak_rss_mb": memory["peak_rss_mb"],
            "rss_after_setup_mb": memory["rss_after_setup_mb"],
            "peak_growth_mb": memory["peak_growth_mb"],
            "peak_rss_process_mb": max(r["peak_rss_process_mb"] for r in rounds),
            "checks": rounds[0]["checks"],
            "threads": rounds[0]["threads"],
        }
    return out


def print_table(summary: dict, settings: dict, meta: dict) -> None:
    def row(*cells):
        return harness.table_row(*cells, widths=(34, 14, 14, 10))

    ours, trl = summary["ours"], summary.get("trl")
    print()
    print(f"PPO update benchmark: {meta['size']} size, policy {meta['policy_params'] / 1e6:.2f}M params, "
          f"reward model {meta['reward_params'] / 1e6:.2f}M, batch {settings['batch_size']}, "
          f"prompt {settings['prompt_len']} + {settings['max_new_tokens']} new tokens, fp32 CPU, "
          f"{ours['threads']} torch threads")
    print(f"timed updates per side: {ours['n']} ({meta['rounds']} round(s) x {settings['updates']}, "
          f"after {settings['warmup']} warm-up each); load average before/after: {meta['load_before']} / "
          f"{meta['load_after']}")
    print()
    print(row("median seconds", "llm_rl", "TRL 1.12" if trl else "", "TRL/ours" if trl else ""))
    print(row("-" * 34, "-" * 14, "-" * 14 if trl else "", "-" * 10 if trl else ""))

    def line(label, ours_v, trl_v, fmt="{:.3f}"):
        o = fmt.format(ours_v) if ours_v is not None else "-"
        t = fmt.format(trl_v) if trl_v is not None else ("-" if trl else "")
        ratio = f"{trl_v / ours_v:.2f}x" if trl and trl_v and ours_v else ""
        print(row(label, o, t, ratio))

    def both(key, fmt):  # llm_rl's and (with --compare) TRL's figure
        return fmt.format(ours[key]), fmt.format(trl[key]) if trl else ""

    tp = trl["phases"] if trl else {}
    line("update (end to end)", ours["seconds"], trl["seconds"] if trl else None)
    line("  generation", ours["phases"]["generate"], tp.get("generate"))
    line("  scoring + reference (+GAE)", ours["phases"]["score_ref"], tp.get("score_ref"))
    line("    of which time/forward", ours["phases"]["forward"], None)
    line("    of which time/reward", ours["phases"]["reward"], None)
    line("  training (fwd+bwd+AdamW)", ours["phases"]["train"], tp.get("train"))
    if trl:
        line("  TRL gc.collect() per update", None, tp.get("gc_collect"))
    line("  rest (metrics, logging, loop)", ours["phases"]["rest"], tp.get("rest"))
    line("fastest update", ours["min"], trl["min"] if trl else None)
    print(row("per-round medians", " ".join(f"{x:.2f}" for x in ours["per_round_median"]),
              " ".join(f"{x:.2f}" for x in trl["per_round_median"]) if trl else ""))
    print(row("generated tokens / s", f"{ours['tokens_per_update'] / ours['seconds']:.0f}",
              f"{trl['tokens_per_update'] / trl['seconds']:.0f}" if trl else ""))
    print(row("peak RSS (MB)", *both("peak_rss_mb", "{:.0f}"),
              f"{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f} o/t" if trl else ""))
    print(row("RSS after setup (MB)", *both("rss_after_setup_mb", "{:.0f}")))
    print(row("peak - RSS after setup (MB)", *both("peak_growth_mb", "{:.0f}"),
              f"{ours['peak_growth_mb'] / trl['peak_growth_mb']:.2f} o/t" if trl and trl["peak_growth_mb"] > 0 else ""))
    if "floor" in summary:
        f = summary["floor"]
        print()
        print("floor: model passes alone (median seconds)")
        for k, v in f["passes"].items():
            print(row(f"  {k}", f"{v:.3f}"))
        print(row("  sum = floor", f"{f['seconds']:.3f}"))
        print(row("  llm_rl update / floor", f"{ours['seconds'] / f['seconds']:.2f}x"))
        print(row("  floor w/o no-grad policy+value fwd", f"{f['seconds_fused']:.3f}"))
        print(row("  llm_rl update / that floor", f"{ours['seconds'] / f['seconds_fused']:.2f}x"))
        if trl:
            print(row("  TRL update / floor", f"{trl['seconds'] / f['seconds']:.2f}x"))
    print()
    print(f"checks: ours tokens/update {sorted(set(ours['checks']['tokens_per_update']))}, "
          f"RM sequence lengths {ours['checks']['reward_model_seq_len']}"
          + (f"; TRL tokens/update {sorted(set(trl['checks']['tokens_per_update']))}, "
             f"RM sequence lengths {trl['checks']['reward_model_seq_len']}" if trl else ""))
    print()


def make_record(summary: dict, settings: dict, assets: dict, load: tuple[float, float]) -> dict:
    """The JSON last line (keys: benchmarks/README.md)."""
    ours = summary["ours"]
    record = {
        "seconds_per_update": ours["seconds"],
        "tokens_per_second": ours["tokens_per_update"] / ours["seconds"],
        "peak_rss_mb": ours["peak_rss_mb"],
        "phases": ours["phases"],
        "update_seconds_min": ours["min"],
        "update_seconds_max": ours["max"],
        "per_round_median": ours["per_round_median"],
        "tokens_per_update": ours["tokens_per_update"],
        "rss_after_setup_mb": ours["rss_after_setup_mb"],
        "peak_rss_growth_mb": ours["peak_growth_mb"],
    }
    if "trl" in summary:
        t = summary["trl"]
        record.update({
            "trl_seconds_per_update": t["seconds"],
            "trl_tokens_per_second": t["tokens_per_update"] / t["seconds"],
            "trl_over_ours": t["seconds"] / ours["seconds"],
            "trl_peak_rss_mb": t["peak_rss_mb"],
            "rss_ratio_ours_over_trl": ours["peak_rss_mb"] / t["peak_rss_mb"],
            "trl_rss_after_setup_mb": t["rss_after_setup_mb"],
            "trl_peak_rss_growth_mb": t["peak_growth_mb"],
            "trl_phases": t["phases"],
            "trl_per_round_median": t["per_round_median"],
        })
    if "floor" in summary:
        f = summary["floor"]
        record.update({"floor_seconds": f["seconds"], "floor_passes": f["passes"],
                       "update_over_floor": ours["seconds"] / f["seconds"],
                       "floor_seconds_fused": f["seconds_fused"],
                       "update_over_floor_fused": ours["seconds"] / f["seconds_fused"]})
        if "trl" in summary:
            record["trl_update_over_floor"] = summary["trl"]["seconds"] / f["seconds"]
    record.update({"settings": settings, "policy_params": assets["policy_params"],
                   "load_average": [round(load[0], 2), round(load[1], 2)], **harness.environment()})
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["default", "large"], default="default")
    p.add_argument("--tiny", action="store_true", help="minimal models (1 x 32), batch 2, 4 new tokens: smoke test")
    p.add_argument("--updates", type=int, default=10, help="timed updates per side (K)")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    p.add_argument("--rounds", type=int, default=1, help="run every side this many times, interleaved")
    p.add_argument("--compare", choices=["trl"], default=None)
    p.add_argument("--floor", action="store_true", help="also time the bare model passes of one update")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each worker (0: torch default)")
    p.add_argument("--profile", choices=["cprofile", "torch"], default=None, help="profile the timed updates")
    p.add_argument("--profile_side", choices=["ours", "trl"], default="ours")
    p.add_argument("--profile_top", type=int, default=30)
    p.add_argument("--workdir", default=None, help="folder for models, data and outputs (default: a temp folder)")
    harness.add_worker_args(p, SIDES)
    a = p.parse_args(argv)
    if a._worker:
        harness.worker_main(a, WORKERS)
        return
    if a.updates < 1 or a.warmup < 0 or a.rounds < 1:
        p.error("--updates >= 1, --warmup >= 0, --rounds >= 1")
    if a.compare == "trl":
        try:
            import trl  # noqa: F401
        except ImportError:
            p.error("--compare trl needs TRL: pip install trl==1.12.0")

    size_name = "tiny" if a.tiny else a.size
    size = harness.SIZES[size_name]
    tmp = harness.open_workdir(a, "ppo_bench_")
    load_before = os.getloadavg()[0]
    assets = harness.build_ppo_assets(Path(a.workdir) / "assets", size, harness.PPO_SETTINGS["seed"])
    assets["size"] = size
    assets_file = harness.write_assets(a.workdir, assets)

    sides = ["ours"] + (["trl"] if a.compare else []) + (["floor"] if a.floor else [])
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for round_ in range(a.rounds):
        for side in harness.round_order(sides, round_):
            harness.announce(f"round {round_ + 1}/{a.rounds}: {side}")
            results[side].append(spawn(side, a, assets_file, round_))
    load_after = os.getloadavg()[0]
    summary = summarize(results)

    settings = {
        "size": size_name, "n_layer": size["n_layer"], "n_embd": size["n_embd"], "vocab": size["vocab"],
        "reward_model": f"{size['rm_layer']}x{size['rm_embd']}", "batch_size": size["batch_size"],
        "prompt_len": size["prompt_len"], "max_new_tokens": size["max_new_tokens"], "updates": a.updates,
        "warmup": a.warmup, "rounds": a.rounds, "threads": summary["ours"]["threads"], **harness.PPO_SETTINGS,
    }
    meta = {"size": size_name, "policy_params": assets["policy_params"], "reward_params": assets["reward_params"],
            "rounds": a.rounds, "load_before": f"{load_before:.2f}", "load_after": f"{load_after:.2f}"}
    print_table(summary, settings, meta)
    for side in sides:
        for r in results[side]:
            if r.get("profile"):
                print(f"----- profile of {side} (timed updates) -----")
                print(r["profile"])
    harness.finish(make_record(summary, settings, assets, (load_before, load_after)), tmp)


if __name__ == "__main__":
    main()
