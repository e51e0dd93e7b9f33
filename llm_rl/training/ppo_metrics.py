"""What one PPO update reports: the rollout's metrics over every process, sample completions, the summary line.

Totals are summed over processes in one collective and divided afterwards, so means and variances are
exact, not means of per-process means. README's "Metrics" section explains every key.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from llm_rl.algorithms.scores import Scores
from llm_rl.algorithms.targets import Targets
from llm_rl.sampling.rollout import Rollout


def rollout_metrics(rollout: Rollout, scores: Scores, targets: Targets, global_sum, kl_beta: float) -> dict[str, float]:
    """What the rollout produced, over all processes: totals are summed in one collective and
    divided afterwards, so means and variances are exact, not means of per-process means."""
    mask = targets.loss_mask.float()
    kept = scores.valid
    totals = {
        "rows": torch.tensor(float(len(rollout))),
        "kept": kept.float().sum(),
        "tokens": mask.sum(),
        "ended": rollout.ended.float().sum(),
        "score": scores.sequence.float()[kept].sum(),
        "kl": targets.kl.sum(),
        "token_reward": (targets.token_rewards * mask).sum(),
        **{f"reward/{k}": torch.tensor(v * float(kept.sum())) for k, v in scores.means.items()},
        "reward/invalid": (~kept).float().sum(),
    }
    if rollout.num_turns is not None:  # multi-turn episodes
        totals.update({"turns": rollout.num_turns.float().sum(), "episode_reward": rollout.turn_scores.sum()})
    if rollout.values is not None:
        values, returns = rollout.values, targets.returns
        totals.update({
            "value": (values * mask).sum(),
            "return": (returns * mask).sum(),
            "return_sq": (returns**2 * mask).sum(),
            "residual_sq": ((returns - values) ** 2 * mask).sum(),
        })
    g = global_sum(totals)
    kept_rows, tokens = max(g["kept"], 1.0), max(g["tokens"], 1.0)
    out = {
        "score/mean": g["score"] / kept_rows,
        "response/length": g["tokens"] / kept_rows,
        "response/eos_rate": g["ended"] / g["rows"],
        "response/tokens": g["tokens"],
        "token_reward/mean": g["token_reward"] / tokens,
        "reward/invalid": g["reward/invalid"],
        **{k: v / kept_rows for k, v in g.items() if k.startswith("reward/") and k != "reward/invalid"},
    }
    if rollout.ref_logprobs is not None:  # no reference is taken when nothing reads it (kl_coef 0)
        out.update({"kl/per_sequence": g["kl"] / kept_rows, "kl/per_token": g["kl"] / tokens,
                    "kl/beta": kl_beta})
    if rollout.num_turns is not None:
        out.update({
            "episode/turns": g["turns"] / g["rows"],
            "episode/return": g["episode_reward"] / g["rows"],  # undiscounted sum of the turn rewards
            "episode/turn_reward": g["episode_reward"] / max(g["turns"], 1.0),
            "episode/done_rate": g["ended"] / g["rows"],
        })
    if rollout.values is not None:
        var_returns = g["return_sq"] / tokens - (g["return"] / tokens) ** 2
        out["value/mean"] = g["value"] / tokens
        out["value/explained_variance"] = 1.0 - (g["residual_sq"] / tokens) / max(var_returns, 1e-8)
    return out


def mismatch_metrics(rollout: Rollout, targets: Targets, global_sum, global_max,
                     cap: Optional[float] = None) -> dict[str, float]:
    """How far a rollout engine's own log-probs (`Rollout.sampler_logprobs`) are from the trainer's old
    log-probs of the same tokens, over the actions of every process:

        mismatch/kl                      E[exp(r) - 1 - r], r = log pi_train - log pi_engine: the k3 estimate of
                                         KL(engine || trainer) per token, with tokens sampled by the engine
        mismatch/max_abs_logprob_diff    max |r|
        mismatch/over_cap_fraction       share of tokens whose ratio exp(r) is above `cap` (the correction's
                                         clip_max; None: not logged)
        mismatch/importance_weight_{min,mean,max}   the correction's weights (`Targets.importance_weights`)

    Empty when the engine reports none (HF generate samples from the training model itself)."""
    if rollout.sampler_logprobs is None:
        return {}
    mask = targets.loss_mask.bool()
    ratio_log = torch.nan_to_num(rollout.logprobs - rollout.sampler_logprobs, nan=0.0).masked_fill(~mask, 0.0)
    sums = {"kl": (ratio_log.exp() - 1 - ratio_log).sum(), "tokens": mask.float().sum()}
    if cap is not None:
        sums["over_cap"] = ((ratio_log.exp() > cap) & mask).float().sum()
    weights = targets.importance_weights
    if weights is not None:
        sums["weight"] = (weights * mask).sum()
    g = global_sum(sums)
    tokens = max(g["tokens"], 1.0)
    out = {"mismatch/kl": g["kl"] / tokens, "mismatch/max_abs_logprob_diff": global_max(ratio_log.abs().max())}
    if cap is not None:
        out["mismatch/over_cap_fraction"] = g["over_cap"] / tokens
    if weights is not None:
        big = torch.finfo(weights.dtype).max
        out["mismatch/importance_weight_mean"] = g["weight"] / tokens
        out["mismatch/importance_weight_max"] = global_max(weights.masked_fill(~mask, 0.0).max())
        out["mismatch/importance_weight_min"] = -global_max(-weights.masked_fill(~mask, big).min())
    return out


def completion_rows(rollout: Rollout, scores: Scores, targets: Targets, count: int) -> list[dict]:
    """The first `count` samples of this process's rollout: prompt, completion, each reward, the score and
    the mean advantage over the response tokens (for completions.jsonl and the trackers)."""
    count = min(count, len(rollout))
    mask = targets.loss_mask[:count].float()
    advantages = ((targets.advantages[:count] * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return [
        {"prompt": rollout.prompts[i], "completion": rollout.completions[i],
         **{f"reward/{name}": float(values[i]) for name, values in scores.per_reward.items()},
         "score": float(scores.sequence[i]), "advantage": advantages[i]}
        for i in range(count)
    ]


def summary_line(metrics: dict) -> str:
    """The line printed every logging_steps: the update's headline numbers."""
    keys = [("score/mean", "score"), ("episode/return", "return"), ("episode/turns", "turns"),
            ("kl/per_sequence", "kl"), ("kl/beta", "beta"), ("entropy", "ent"), ("loss/policy", "pg"),
            ("loss/value", "vf"), ("policy/clipfrac", "clip"), ("response/length", "len"), ("time/update", "s")]
    parts = [f"update {metrics['update']}"]
    parts += [f"{short} {metrics[k]:.4g}" for k, short in keys if k in metrics and math.isfinite(metrics[k])]
    parts += [f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("eval/")]
    return " | ".join(parts)

