"""The package layout: imports run one way, no path hacks, no huge files (static: parses, imports nothing).

    datamodules <- evaluation <- lightning_modules <- callbacks <- tools (<- train.py, tests, bench, notebooks)
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# each package may import itself and the packages listed here, nothing else of the project
ALLOWED = {
    "datamodules": set(),
    "evaluation": {"datamodules"},
    "lightning_modules": {"datamodules", "evaluation"},
    "callbacks": {"datamodules", "evaluation", "lightning_modules"},
    "tools": {"datamodules", "evaluation", "lightning_modules", "callbacks"},
}
PROJECT = set(ALLOWED) | {"train"}
MAX_LINES = 400
SKIP_DIRS = {"__pycache__", "build", "dist", "runs", "data", "wandb", "node_modules"}


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def repo_files() -> Iterator[Path]:
    """Every .py file of the repository (no virtual environment, hidden folder, build or run output)."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info"))
        yield from (Path(folder) / f for f in sorted(files) if f.endswith(".py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def project_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every absolute import of a project package, lazy ones included."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:  # relative imports stay inside their own package
            continue
        for name in names:
            if name.split(".")[0] in PROJECT:
                yield node.lineno, name


def test_the_packages_are_where_the_layout_says():
    for package in ALLOWED:
        assert (ROOT / package / "__init__.py").is_file(), f"{package}/ is not a package"


def test_packages_import_only_the_layers_below_them():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in package_files(package):
            for line, name in project_imports(path):
                top = name.split(".")[0]
                if top != package and top not in allowed:
                    may = ", ".join(sorted(allowed)) or "no other project package"
                    wrong.append(f"{rel(path)}:{line} imports {name} ({package} may import {may})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_nothing_outside_tests_imports_train():
    wrong = []
    for path in repo_files():
        if rel(path).startswith("tests/"):
            continue
        wrong += [f"{rel(path)}:{line} imports {name}" for line, name in project_imports(path) if name.split(".")[0] == "train"]
    assert not wrong, "train.py is only the entry point; import cli_main from tools.cli instead:\n" + "\n".join(wrong)


def _is_sys_path_edit(node: ast.AST) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (
        isinstance(func, ast.Attribute)
        and func.attr in {"insert", "append"}
        and isinstance(func.value, ast.Attribute)
        and func.value.attr == "path"
        and isinstance(func.value.value, ast.Name)
        and func.value.value.id == "sys"
    )


def test_no_file_edits_sys_path():
    wrong = []
    for path in repo_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        wrong += [f"{rel(path)}:{node.lineno} calls sys.path.{node.func.attr}" for node in ast.walk(tree) if _is_sys_path_edit(node)]
    assert not wrong, "run tools as `python -m tools.<name>` from the repository root instead:\n" + "\n".join(wrong)


def test_no_module_is_too_long():
    long = []
    for package in ALLOWED:
        for path in package_files(package):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                long.append(f"{rel(path)}: {lines} lines")
    assert not long, f"modules over {MAX_LINES} lines (split them):\n" + "\n".join(long)
