"""Checkpoints that survive a crash: written to a temporary folder, then renamed.

    OUTPUT_DIR/checkpoint-<update>/
        model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl   (accelerate.save_state)
        trainer_state.json   update counter, data position, KL controller, minibatch-shuffle RNG

A folder counts as a checkpoint only once `trainer_state.json` is in it and it carries
its final name, so a crash while writing leaves the previous checkpoint the latest.
accelerate loads its files with `torch.load(weights_only=True)`; nothing is unpickled.

With LoRA, `model.safetensors` holds the trainable parameters only (adapters and value head):
the frozen base comes back from `model_name_or_path` when the run resumes, so a checkpoint of a
7B model is megabytes, not 14 GB.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from llm_rl.config.errors import UserError

STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""

    label = "checkpoint error"


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
            found.append((update_of(path), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: Path) -> Optional[Path]:
    """'latest' -> newest complete checkpoint in output_dir (None if there is none); else the given path."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-N folder or 'latest'")
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


@contextlib.contextmanager
def quiet_shared_tensor_warning():
    """accelerate warns "Removed shared tensor" at every save of a model with tied weights (GPT-2's
    embeddings and LM head); safetensors stores such a pair once and restores it on load."""
    accelerate_logger = logging.getLogger("accelerate.utils.other")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        accelerate_logger.setLevel(level)


def save_trainable_only(accelerator, model: torch.nn.Module) -> None:
    """Make `accelerator.save_state` / `load_state` store only `model`'s trainable parameters.

    For a LoRA policy (frozen base, trainable adapters and value head). Needs the model's full
    state dict on one process: not for DeepSpeed or FSDP, which save through their own engines.
    """
    from safetensors.torch import load_file

    def is_ours(candidate) -> bool:
        return accelerator.unwrap_model(candidate) is accelerator.unwrap_model(model)

    def trainable_names(candidate) -> set[str]:
        return {name for name, p in candidate.named_parameters() if p.requires_grad}

    def keep_trainable(models, weights, output_dir):
        for i, candidate in enumerate(models):
            if is_ours(candidate):
                names = trainable_names(candidate)
                weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def load_trainable(models, input_dir):
        if not models or not is_ours(models[0]):  # accelerate numbers model files by position
            raise RuntimeError("save_trainable_only expects the policy to be the first prepared model")
        candidate = models.pop(0)  # loaded here, not by accelerate
        state = load_file(str(Path(input_dir) / "model.safetensors"))
        expected = trainable_names(candidate)
        if set(state) != expected:
            raise CheckpointError(
                f"{Path(input_dir) / 'model.safetensors'} holds {len(state)} tensors but the model trains "
                f"{len(expected)} (e.g. {sorted(set(state) ^ expected)[:3]}): it was written by another "
                "configuration (use_peft, lora_r, lora_target_modules)"
            )
        candidate.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


def unreadable_file(path: Path) -> Optional[tuple[Path, str]]:
    """The first file of checkpoint `path` that does not load, with the reason; None if all load.
    trainer_state.json first (ours, and the last written); accelerate's files as accelerate reads them
    (its `load` allows the numpy types of random_states_<rank>.pkl, which plain weights_only refuses)."""
    from accelerate.utils.other import load as accelerate_load
    from safetensors.torch import load_file

    files = sorted(Path(path).iterdir(), key=lambda f: (f.name != STATE_FILE, f.name))
    for file in files:
        try:
            if file.suffix == ".safetensors":
                load_file(str(file))
            elif file.suffix in (".bin", ".pkl", ".pt"):
                accelerate_load(file, map_location="cpu")
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except Exception as e:  # any failure to parse is the answer here
            return file, f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return None


def load_error(path: Path, error: Exception) -> Exception:
    """A CheckpointError naming the bad file of `path`, the checkpoints there are and the one to resume
    from instead; `error` itself when every file loads (the problem is elsewhere)."""
    bad = unreadable_file(path)
    if bad is None:
        return error
    file, reason = bad
    path = Path(path)
    others = [p for p in list_checkpoints(path.parent) if p != path]
    earlier = [p for p in others if update_of(p) < update_of(path)]
    offer = (f"resume from the previous checkpoint with --resume_from_checkpoint {earlier[-1]}"
             if earlier else "there is no earlier checkpoint to resume from")
    present = f" (checkpoints in {path.parent}: {', '.join(p.name for p in others)})" if others else ""
    return CheckpointError(f"{file} is unreadable ({reason}); {offer}{present}, or delete {path.name}")


def update_of(path: Path) -> int:
    """The update number in a checkpoint-N folder's name (-1 for any other name)."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else -1
