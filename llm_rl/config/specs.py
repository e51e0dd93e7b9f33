"""Objects named in a config as 'package.module:name' or 'path/to/file.py:name' (reward functions,
environments), imported with errors that say which spec failed and why."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from llm_rl.config.errors import UserError


def import_from_spec(spec: str, what: str, error: type[Exception] = UserError):
    """'package.module:name' or 'path/to/file.py:name' -> the object; `what` names it in errors
    ("reward function", "environment")."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise error(f"{what} {spec!r} must look like 'package.module:name' (module:function, module:Class) or "
                    "'path/to/file.py:name'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise error(f"{what} {spec!r}: file {path} not found")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise error(f"{what} {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise error(f"{what} {spec!r}: cannot import {module_name!r}: {e}") from e
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise error(f"{what} {spec!r}: {module_name} has no callable {attr!r}")
    return obj
