"""Modules a reader can hold in mind: under 400 lines, functions under 40, in protocol,
backends and broker. The two exceptions are named, with their reason, in
docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 40
#: The frame table, and migration SQL text (docs/architecture.md, "Sizes").
LONG_MODULES = frozenset({"protocol/frames.py", "backends/postgres/migrations.py"})


def _modules() -> list[Path]:
    return sorted(
        p for package in ("protocol", "backends", "broker") for p in (ROOT / package).rglob("*.py")
    )


def test_no_module_is_over_400_lines_but_the_named_ones() -> None:
    long = {
        path.relative_to(ROOT).as_posix(): lines
        for path in _modules()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }

    assert set(long) <= LONG_MODULES, long


def test_no_function_is_over_40_lines() -> None:
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")

    assert long == []
