"""A run's output folder: does it hold a run, and what overwriting it removes.

A folder holds a run once work was completed there: `metrics.jsonl` has a row or a checkpoint
exists. A run that failed at or before its first update leaves at most an empty `metrics.jsonl`;
the fixed rerun reuses that folder without any flag (otherwise the error that stopped the first
run would also block the second).

`overwrite_output_dir` removes what llm_rl writes (the names in `WRITTEN`) and nothing else, so
a new run never inherits an old checkpoint (`resume_from_checkpoint: latest` would pick it) or an
old `model.safetensors` (a LoRA run writes an adapter instead, and loaders prefer the full model).
Other files, such as the demo's `warm_start/` and `data/`, stay where they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from llm_rl.config.errors import ConfigError
from llm_rl.reporting.metrics import read_metrics
from llm_rl.training import checkpoint

METRICS_FILE = "metrics.jsonl"
WRITTEN = (
    f"{checkpoint.PREFIX}*", f".tmp-{checkpoint.PREFIX}*",  # checkpoints, finished or not
    METRICS_FILE, "completions.jsonl", "curves.png", "README.md", "config.yaml", "reward_config.yaml",
    "eval_results.json", "value_head.safetensors",
    # the saved model: transformers or peft weights, configs, tokenizer files
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "adapter_model.safetensors", "adapter_config.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


def completed_work(output_dir: Path) -> list[str]:
    """What shows that a run completed work in `output_dir` (empty: the folder is free)."""
    output_dir = Path(output_dir)
    found = []
    metrics = output_dir / METRICS_FILE
    rows = len(read_metrics(metrics)) if metrics.is_file() else 0
    if rows:
        found.append(f"{METRICS_FILE} ({rows} rows)")
    found += [path.name for path in checkpoint.list_checkpoints(output_dir)]
    return found


def clean(output_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Remove everything llm_rl writes (and the `extra` names, e.g. a tracker folder); returns what went."""
    output_dir = Path(output_dir)
    removed = []
    for pattern in (*WRITTEN, *extra):
        for path in sorted(output_dir.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    return removed


def check_reuse(output_dir: Path, overwrite: bool, resume_spec: Optional[str]) -> None:
    """Refuse a run in a folder that holds one, unless it resumes or overwrites it (ConfigError naming
    what is there). Called before any model loads, and again by `prepare`."""
    if overwrite:
        return
    found = completed_work(output_dir)
    if not found:
        return
    if resume_spec is None:
        raise ConfigError(
            f"{output_dir} already holds a run ({', '.join(found)}); resume it with resume_from_checkpoint: "
            "latest, choose another output_dir, "
            "or set overwrite_output_dir: true (removes the files llm_rl wrote there)"
        )
    if resume_spec == "latest" and not checkpoint.list_checkpoints(output_dir):
        raise ConfigError(
            f"resume_from_checkpoint: latest found no checkpoint in {output_dir}, which holds a run "
            "without one; set overwrite_output_dir: true to start over, or choose another output_dir"
        )


def prepare(accelerator, output_dir: Path, overwrite: bool, resuming: bool, extra: tuple[str, ...] = ()) -> None:
    """Check that `output_dir` may take this run, then (main process) create it, clean it when
    overwriting, and start an empty metrics.jsonl unless resuming.

    Raises ConfigError naming what is in the way when the folder holds a completed run and the
    config neither resumes nor overwrites it.
    """
    output_dir = Path(output_dir)
    problem = None
    try:
        check_reuse(output_dir, overwrite or resuming, None)
    except ConfigError as e:
        problem = e
    accelerator.wait_for_everyone()  # every process looks before the main process writes
    if problem:
        raise problem
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if overwrite and not resuming:
            removed = clean(output_dir, extra)
            if removed:
                print(f"[llm_rl] overwrite_output_dir: removed {len(removed)} files of an earlier run from {output_dir}")
        if not resuming:
            (output_dir / METRICS_FILE).write_text("")
    accelerator.wait_for_everyone()
