"""Config values that name things outside the config: trackers (`report_to`) and local paths.

`check_report_to` refuses an unknown tracker or one whose package is missing before any model
loads; `missing_local_path` tells a local path that does not exist from a Hub id, so a typo
fails at once instead of after a minute of Hub retries.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Optional

from llm_rl.config.errors import ConfigError

# accelerate's trackers and the package each needs; `report_to` is checked against them before any model loads
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow", "aim": "aim",
    "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio",
}
REPORT_TO_HELP = "accelerate trackers, comma-separated: none, all, tensorboard, wandb, mlflow, comet_ml, ..."


def check_report_to(report_to: str) -> None:
    """Raise ConfigError for an unknown tracker name or one whose package is not installed."""
    import importlib.util

    for name in (n.strip() for n in report_to.split(",") if n.strip()):
        if name in ("none", "all"):
            continue
        if name not in TRACKER_PACKAGES:
            close = difflib.get_close_matches(name, TRACKER_PACKAGES, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(f"report_to: unknown tracker {name!r}; one of none, all, {', '.join(TRACKER_PACKAGES)}.{hint}")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(
                f"report_to: {name} is not installed; `pip install {TRACKER_PACKAGES[name]}` or set report_to: none"
            )


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")


def looks_local(name: str, data: bool = False) -> bool:
    """A path, not a Hub id: starts with / ./ ../ ~, has more than one '/' (a Hub id has at most
    one), an OS separator other than '/', or (`data`) a data-file suffix."""
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or (data and name.lower().endswith(DATA_FILE_SUFFIXES))
    )


def missing_local_path(name: Optional[str], data: bool = False) -> Optional[str]:
    """What is wrong with `name` when it looks like a local path that does not exist; else None."""
    if name is None or Path(name).exists() or not looks_local(name, data):
        return None
    tilde = " (a leading ~ is not expanded in config values: write the full path)" if name.startswith("~") else ""
    return f"{name} does not exist{tilde}; it looks like a local path, so the Hub was not asked"
