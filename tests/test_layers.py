"""The package's shape: layers that import only downwards, no import circle, functions short enough to read.

The layers, lowest first (ARCHITECTURE.md draws the same table). A module may import modules of its own
folder and of the layers listed before its own; folders on one line do not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "llm_rl"

LAYERS: list[tuple[str, ...]] = [
    ("version", "config"),  # typed sections, choices and variant tables, user errors; no torch
    ("algorithms",),  # pure tensor maths: ops, KL, advantages, losses, scores, targets
    ("models", "data"),  # the value-head model, loading, LoRA, pad policy | prompt datasets and their order
    ("sampling",),  # Rollout, the Sampler seam, HF generate, multi-turn episodes
    ("rewards",),  # reward functions, the reward model, phase 2's scorers, scoring files
    ("reporting",),  # model cards and the Hub, metrics files, plots
    ("training",),  # the run skeleton, PPOTrainer, RewardTrainer, checkpoints, evaluation, callbacks
    ("tasks",),  # built-in offline tasks (addition, preference pairs, the debugging-chatbot dialogue)
    ("demos",),  # `llm-rl demo`
    ("cli", "__init__"),  # the `llm-rl` command; the package's public names (loaded lazily)
]
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}
MAX_CODE_LINES = 60


def layer_of(module: str) -> str:
    """'llm_rl.sampling.hf' -> 'sampling'; 'llm_rl' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = ["llm_rl", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, modules: set[str]) -> set[str]:
    """The llm_rl modules `source` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("llm_rl"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("llm_rl"))
    return found


def package_imports() -> dict[str, set[str]]:
    sources = {module_name(path): path.read_text() for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(source, set(sources)) - {name} for name, source in sources.items()}


def upward_imports(imports: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every import that is not from the importer's folder or a lower layer."""
    wrong = []
    for module, targets in sorted(imports.items()):
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if there not in RANK:
                wrong.append(f"{target} (imported by {module}) is in no layer: add its folder to LAYERS")
            elif there != here and RANK[there] >= RANK.get(here, -1):
                wrong.append(f"{module} ({here}) imports {target} ({there}), which is not below it")
    return wrong


def import_circles(imports: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in imports.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(imports):
        if node not in index:
            visit(node)
    return circles


def code_lines(function: ast.FunctionDef, lines: list[str]) -> int:
    """Lines of a function that hold code: not blank, not only a comment, not its docstring."""
    body = function.body
    first = body[0]
    has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
        first.value.value, str)
    skip = set(range(first.lineno, first.end_lineno + 1)) if has_docstring else set()
    start = function.decorator_list[0].lineno if function.decorator_list else function.lineno
    return sum(
        1 for number in range(start, function.end_lineno + 1)
        if number not in skip and lines[number - 1].strip() and not lines[number - 1].strip().startswith("#")
    )


def long_functions(limit: int = MAX_CODE_LINES) -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # a nested function counts inside its parent too: both are reported when long
                count = code_lines(node, lines)
                if count > limit:
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({count} code lines)")
    return out


def test_every_folder_of_the_package_is_in_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert folders | modules <= set(RANK), f"not in LAYERS: {sorted((folders | modules) - set(RANK))}"


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(package_imports()) == []


def test_no_import_circle():
    assert import_circles(package_imports()) == []


@pytest.mark.parametrize("importer, source, expected", [
    ("llm_rl.algorithms.targets", "from llm_rl.sampling.rollout import Rollout", "not below it"),
    ("llm_rl.models.loading", "def f():\n    from llm_rl.data.prompts import PromptData", "not below it"),  # same rank
    ("llm_rl.config.sections", "import llm_rl.training.run", "not below it"),
    ("llm_rl.sampling.hf", "from llm_rl.newfolder.x import y", "is in no layer"),
])
def test_the_layer_check_finds_an_upward_import(importer, source, expected):
    modules = set(package_imports()) | {"llm_rl.newfolder.x"}
    imports = {importer: imported_modules(source, modules)}
    assert any(expected in problem for problem in upward_imports(imports))


def test_the_circle_check_finds_a_circle():
    imports = {"llm_rl.a": {"llm_rl.b"}, "llm_rl.b": {"llm_rl.c"}, "llm_rl.c": {"llm_rl.a"}, "llm_rl.d": {"llm_rl.a"}}
    assert import_circles(imports) == [["llm_rl.a", "llm_rl.b", "llm_rl.c"]]


def test_every_function_fits_on_a_screen():
    assert long_functions() == []


def test_code_lines_leave_out_docstrings_comments_and_blank_lines():
    source = 'def f(x):\n    """Doc\n    string."""\n\n    # why\n    y = x\n    return y\n'
    function = ast.parse(source).body[0]
    assert code_lines(function, source.splitlines()) == 3  # def, y = x, return y
