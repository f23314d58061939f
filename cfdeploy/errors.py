"""The one exception type users see: a one-line message naming the file and the problem."""

from __future__ import annotations

import math

EXTRAS = {"torch": "export", "open_clip": "export", "onnx": "export", "matplotlib": "bench", "cuda": "cuda", "dlib": "photos", "ray": "serve", "diffusers": "dac", "transformers": "dac", "peft": "dac", "safetensors": "dac"}


class CfdeployError(Exception):
    """Bad input or environment; the CLI prints ``error: <message>`` and exits with code 2."""


def missing_extra(package: str, needed_for: str, cause: BaseException | None = None, extra: str | None = None) -> CfdeployError:
    """The error for a package a command needs but the install lacks, naming the extra to install (``extra``, when the
    command's group needs more than the package's own extra)."""
    if package == "tensorrt":
        return CfdeployError(
            f"{needed_for} needs TensorRT, which is not installed here ({cause}); on Jetson it comes with JetPack, "
            "elsewhere `pip install tensorrt`"
        )
    extra = extra or EXTRAS.get(package, "export")
    return CfdeployError(f"{needed_for} needs {package}, which this install lacks: pip install \"cfdeploy[{extra}]\"")


def require_finite(**options: float | None) -> None:
    """Refuse nan and inf where a number means a setting (``require_finite(strength=s)`` names ``--strength``)."""
    for name, value in options.items():
        if value is not None and not math.isfinite(value):
            raise CfdeployError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def require_range(low: int, high: int | None = None, **options: int | None) -> None:
    """Integer options checked in one line each (typer's own range check prints a usage box)."""
    for name, value in options.items():
        if value is not None and (value < low or (high is not None and value > high)):
            bound = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise CfdeployError(f"--{name.replace('_', '-')} must be {bound}, got {value}")
