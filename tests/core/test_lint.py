"""ruff, as configured in pyproject.toml ([tool.ruff]): the lint rules and the formatting, over the whole repository."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = next(folder for folder in Path(__file__).resolve().parents if (folder / "pyproject.toml").is_file())


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    """``ruff <args>`` from the repository root: this environment's (the dev extra's), else the one on PATH."""
    if importlib.util.find_spec("ruff") is not None:
        command = [sys.executable, "-m", "ruff"]
    elif shutil.which("ruff") is not None:
        command = ["ruff"]
    else:
        pytest.skip('ruff is not installed: pip install -e ".[dev]"')
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True)


def test_ruff_finds_no_lint_problems():
    result = ruff("check", "--no-fix", "--output-format", "concise", ".")
    assert result.returncode == 0, (
        f"ruff check . (ruff check --fix . fixes those marked [*]):\n{result.stdout}{result.stderr}"
    )


def test_the_code_is_formatted_as_ruff_formats_it():
    result = ruff("format", "--check", "--diff", ".")
    assert result.returncode == 0, (
        f"ruff format --check . (ruff format . rewrites them):\n{result.stdout}{result.stderr}"
    )
