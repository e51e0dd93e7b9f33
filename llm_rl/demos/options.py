"""The demos' options and the addition demo's config, without torch: `llm-rl demo` checks its
arguments and config overrides before the heavy imports, so a mistake is reported at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llm_rl.config.sections import Config

DEMO_CONFIG = Path(__file__).parents[1] / "tasks" / "addition_ppo.yaml"
DIALOGUE_CONFIG = Path(__file__).parents[1] / "tasks" / "dialogue_ppo.yaml"


@dataclass
class DemoOptions:
    output_dir: str = "outputs/demo"
    seed: int = 0
    warm_start_steps: int = 1500  # at most; stops once it reaches warm_start_accuracy
    warm_start_accuracy: float = 0.45  # greedy exact match on training problems that ends the warm start
    max_updates: Optional[int] = None  # default from the YAML recipe
    num_digits: int = 2
    num_heldout: int = 500
    overwrite: bool = False
    prepare_only: bool = False  # build the warm start and data, then stop (for recipes/configs/addition.yaml)


@dataclass
class DialogueOptions:
    output_dir: str = "outputs/demo_dialogue"
    seed: int = 0
    max_updates: Optional[int] = None  # default from the YAML recipe (80)
    warm_start_steps: int = 300
    overwrite: bool = False
    prepare_only: bool = False  # build the warm start and the rows, then stop (for recipes/configs/dialogue.yaml)
    num_heldout: int = 20  # held-out bug reports evaluated (at most 20)


def demo_config(options: DemoOptions, overrides: Optional[list[str]]) -> Config:
    """llm_rl/tasks/addition_ppo.yaml with the command line's overrides, pointed at the demo's folders."""
    out_dir = Path(options.output_dir)
    config = Config.from_yaml(DEMO_CONFIG, overrides)
    config.set_values({"model_name_or_path": str(out_dir / "warm_start"),
                       "dataset_name": str(out_dir / "data" / "train.jsonl"), "seed": options.seed,
                       "output_dir": str(out_dir), "overwrite_output_dir": options.overwrite})
    if options.max_updates is not None:
        config.set_values({"max_updates": options.max_updates})
    config.validate()
    return config
