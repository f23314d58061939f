"""The package type-checks, the TensorRT code against TensorRT's published Python API (tensorrt-stubs).

TensorRT's libraries cannot be installed on machines without NVIDIA's package host, so this is how
the builder and runtime are checked there: mypy over ``cfdeploy`` (pyproject.toml), strict for the
torch-free deploy path and the TensorRT code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import early_result, early_run, prepare_early

STUBS = "tensorrt-stubs==10.13.0.35.1"
ROOT = Path(__file__).resolve().parents[2]
# The published stubs have lines mypy cannot parse (a parameter named `in`; a required parameter after
# optional ones), and a syntax error stops mypy outright, so the temporary copy gets them repaired.
STUB_REPAIRS = [
    (re.compile(r"\bin: "), "in_: "),
    (re.compile(r"power: Weights = None, channel_axis: int\)"), "power: Weights = None, channel_axis: int = ...)"),
]


def type_check(directory: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess | None]:
    """pip's install of the stubs, and mypy's run over the package with them (None when the install failed)."""
    stubs = directory / "stubs"
    installed = early_run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(stubs), STUBS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if installed.returncode != 0:
        return installed, None
    api = stubs / "tensorrt_bindings" / "tensorrt.pyi"
    text = api.read_text()
    for pattern, replacement in STUB_REPAIRS:
        text = pattern.sub(replacement, text)
    api.write_text(text)
    result = early_run(
        [sys.executable, "-m", "mypy", "--no-incremental"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MYPYPATH": str(stubs)},
    )
    return installed, result


prepare_early("type check", type_check)  # mypy runs in its own process while the tests before this one run


def test_package_type_checks_with_tensorrt_against_the_published_api(shared):
    installed, result = early_result("type check", shared)
    if installed.returncode != 0 and re.search(
        r"NewConnectionError|Network is unreachable|name resolution", installed.stderr
    ):
        pytest.skip(f"the package registry is unreachable, so {STUBS} cannot be fetched")
    assert installed.returncode == 0, installed.stderr
    assert result is not None
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Success: no issues found in \d+ source files", result.stdout)
