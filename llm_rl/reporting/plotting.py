"""Training curves from metrics.jsonl: the picture a user looks at after a run."""

from __future__ import annotations

from pathlib import Path

from llm_rl.reporting.metrics import read_metrics

PANELS = [
    ("score/mean", "mean score"),
    ("kl/per_sequence", "KL to reference (per sequence)"),
    ("entropy", "entropy (per token)"),
    ("loss/value", "value loss"),
    ("eval/accuracy", "held-out accuracy"),  # the demo's evaluation callback
]


def curve_panels(rows: list[dict]) -> list[tuple[str, str]]:
    """(metric, title) of every panel with data: the fixed ones, then eval/<decoding>/score of the
    config-driven evaluation (llm_rl.training.evaluation)."""
    panels = [(k, title) for k, title in PANELS if any(k in r for r in rows)]
    eval_scores = dict.fromkeys(k for r in rows for k in r if k.startswith("eval/") and k.endswith("/score"))
    return panels + [(k, f"held-out score ({k.split('/')[1]})") for k in eval_scores]


def plot_training_curves(metrics_file: str | Path, png_file: str | Path) -> Path:
    """One panel per metric against the update number; panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
    panels = curve_panels(rows)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 3.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        points = [(r["update"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO update", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_file, dpi=110)
    plt.close(fig)
    return Path(png_file)
