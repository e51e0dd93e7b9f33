"""The errors a user has to fix (config, data, reward, checkpoint, model loading).

`llm-rl` prints a `UserError` on one line, under its `label`, and exits 2 without a traceback;
`loading` turns the OSError/ValueError of a failed model or tokenizer load into a ModelLoadError
naming the config key.
"""

from __future__ import annotations

import contextlib
from typing import Optional


class UserError(ValueError):
    """A mistake in what a user gave (config, data, reward, checkpoint): `llm-rl` prints the message
    on one line and exits 2, without a traceback. Subclasses name the kind in `label`."""

    label = "error"


class ConfigError(UserError):
    """A config value a user has to fix; the message says which key and how."""

    label = "config error"


class ModelLoadError(UserError):
    """A model or tokenizer that did not load; the message names the config key and the path or id."""

    label = "model error"


class OutOfMemoryError(UserError):
    """A run that ran out of device (or host) memory; the message names the keys that lower what it needs.
    Raised from torch's OutOfMemoryError (or an allocator's RuntimeError), which is its `__cause__`."""

    label = "out of memory"


@contextlib.contextmanager
def loading(key: str, name: Optional[str]):
    """Report a failed load of `name` (given as `key`) as a ModelLoadError naming both. transformers,
    peft and the Hub client say "not found / cannot read" with OSError or ValueError (transformers 5:
    a folder without tokenizer files); our own UserErrors pass through unchanged."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{key} {name!r} did not load: {' '.join(str(e).split())[:500]}") from e
