"""Checkpoints that survive a crash: written to a temporary folder, then renamed.

    OUTPUT_DIR/checkpoint-<update>/
        model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl   (accelerate.save_state)
        trainer_state.json   update counter, data position, KL controller, minibatch-shuffle RNG

A folder counts as a checkpoint only once `trainer_state.json` is in it and it carries
its final name, so a crash while writing leaves the previous checkpoint the latest.
accelerate loads its files with `torch.load(weights_only=True)`; nothing is unpickled.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_dir(output_dir: Path, update: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{update}"


def temporary_dir(output_dir: Path, update: int) -> Path:
    return Path(output_dir) / f".tmp-{PREFIX}{update}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: Path) -> Optional[Path]:
    """'latest' -> newest complete checkpoint in output_dir (None if there is none); else the given path."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-N folder or 'latest'")
    return path


def finalize(tmp: Path, final: Path, state: dict) -> None:
    """Write the trainer state last, then move the folder to its final name (main process only)."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if final.exists():  # an earlier run's checkpoint of the same update (overwrite_output_dir)
        shutil.rmtree(final)
    tmp.rename(final)


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def rotate(output_dir: Path, keep: Optional[int]) -> None:
    """Delete all but the newest `keep` checkpoints."""
    if keep is None:
        return
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else list_checkpoints(output_dir):
        shutil.rmtree(old, ignore_errors=True)
