"""tests/HOSTILE.md cannot rot: every test it names exists, and every test of the files it indexes in full is named."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
INDEX = TESTS / "HOSTILE.md"
NODE_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
FULL_FILE = re.compile(r"^- `(tests/[\w/]+\.py)`$", re.MULTILINE)


def defined_tests(relative: str) -> set[str]:
    """The module's top-level test functions, read from its source (nothing is imported or run)."""
    tree = ast.parse((TESTS.parent / relative).read_text(), relative)
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_index_names_exists():
    text = INDEX.read_text()
    named = NODE_ID.findall(text)
    assert len(named) > 100, "the index lists one test per line in backquotes: tests/FILE.py::test_name"
    missing = [f"{path}::{name}" for path, name in named if name not in defined_tests(path)]
    assert missing == [], f"named in {INDEX.name} but not found: {missing}"


def test_every_test_of_the_files_indexed_in_full_is_named():
    text = INDEX.read_text()
    named = set(NODE_ID.findall(text))
    files = FULL_FILE.findall(text)
    assert len(files) >= 6
    unlisted = sorted(f"{path}::{name}" for path in files for name in defined_tests(path) if (path, name) not in named)
    assert unlisted == [], f"add a line for each to {INDEX.name}: {unlisted}"
