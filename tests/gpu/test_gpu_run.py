"""benchmarks/gpu/run.sh --dry-run: every step of the GPU run, on the CPU at tiny sizes, so the script is known to work
before a GPU minute is spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import early_result, early_run, prepare_early

ROOT = next(folder for folder in Path(__file__).resolve().parents if (folder / "pyproject.toml").is_file())
STEPS = [
    "install",
    "environment",
    "pytest_gpu",
    "backends_256",
    "backends_1024",
    "encoder_clip",
    "edit_e2e",
    "refine",
    "train_fp32",
    "train_bf16",
    "dac",
]
STEP_BUDGET_S = 1800  # longer than the rest of the test run: a step may wait for the CPU until the other tests end
TOTAL_BUDGET_S = 3600
RESULT_FILES = {
    "install": "install.json",
    "environment": "environment.json",
    "pytest_gpu": "pytest_gpu.xml",
    "backends_256": "backends_256.json",
    "backends_1024": "backends_1024.json",
    "encoder_clip": "encoder_clip.json",
    "edit_e2e": "edit_e2e.json",
    "refine": "refine.json",
    "train_fp32": "train_fp32.json",
    "train_bf16": "train_bf16.json",
    "dac": "dac.json",
}


def dry_run(directory: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """``run.sh RESULTS --dry-run``, started at the lowest priority once the tests are collected: it takes the CPU
    time the other tests leave (about 3 CPU-minutes: CLIP ViT-B/32, ArcFace and DAC at their own sizes in every
    step). Starved of the CPU, a step takes longer than on an idle machine, so its limits here are wide."""
    environment = {
        **os.environ,
        "CFDEPLOY_CACHE_DIR": str(directory / "cache"),
        "PYTHON": sys.executable,
        "GPU_RUN_DRY_BUDGET_S": os.environ.get("GPU_RUN_DRY_BUDGET_S", str(STEP_BUDGET_S)),
        "GPU_RUN_BUDGET_S": os.environ.get("GPU_RUN_BUDGET_S", str(TOTAL_BUDGET_S)),
    }
    done = early_run(
        ["bash", ROOT / "benchmarks" / "gpu" / "run.sh", directory / "results", "--dry-run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=directory,
    )
    return done, directory / "results"


prepare_early("gpu dry run", dry_run)


def test_the_dry_run_covers_every_step_and_each_succeeds(shared):
    done, results = early_result("gpu dry run", shared)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (results / "steps.jsonl").read_text().splitlines()]
    assert [step["step"] for step in steps] == STEPS
    failed = {step["step"]: step.get("stderr_tail", "")[-800:] for step in steps if not step["ok"]}
    assert not failed, failed
    for step, file in RESULT_FILES.items():
        assert (results / file).is_file(), f"{step}: no {file}"
    run = json.loads((results / "run.json").read_text())
    assert run["dry_run"] and run["failed"] == []
    assert json.loads((results / "environment.json").read_text())["dry_run"] is True
    rendered = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_backends.py"), "--render-run", str(results)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}"},
    )
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert "a dry run on the CPU" in rendered.stdout and "| dac | ok |" in rendered.stdout
