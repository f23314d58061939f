"""The one exception type users see: a one-line message naming the file and the problem."""

from __future__ import annotations

import math

# The extra that brings each package an extra installs: what `missing_extra(package, ...)` names where an option needs
# it, and the packages whose absence the CLI reports in one line. tests/core/test_extras.py checks that each extra brings them.
EXTRAS = {
    "torch": "export",
    "torchvision": "export",
    "open_clip": "export",
    "onnx": "export",
    "onnxscript": "export",
    "onnxslim": "export",
    "matplotlib": "bench",
    "cuda": "cuda",
    "openvino": "openvino",
    "dlib": "photos",
    "ray": "serve",
    "starlette": "serve",
    "diffusers": "dac",
    "transformers": "dac",
    "peft": "dac",
    "safetensors": "dac",
}
# The extra each command needs: `pip install "cfdeploy[<extra>]"` runs every path of the command, TensorRT aside (it
# comes with JetPack, or from NVIDIA's index). The core install alone runs the bundle paths: `edit --bundle`,
# `invert --bundle`, `inspect` of a bundle or array, `dac edit` of a DAC bundle. An option that needs another extra
# names it where it imports (`--landmarks-model`: photos, `bench --plot`: bench). tests/core/test_extras.py checks every
# command's imports against its extra's requirements.
COMMAND_EXTRAS = {
    "edit": "export",  # --checkpoint (the torch backend), --refine-steps, torch-saved --latents
    "demo": "export",
    "samples": "export",  # the dac group also needs the dac extra, and says so
    "embed": "export",
    "inspect": "export",  # checkpoints and CLIP weights
    "export": "export",
    "build-engines": "cuda",
    "refit": "export",
    "bench": "bench",  # export's packages, and matplotlib for --plot
    "invert": "export",  # --encoder
    "serve": "serve",
    "batch": "serve",
    "train": "export",
    "dac abduct": "dac",
    "dac edit": "dac",  # a run (PyTorch)
    "dac export": "dac",
    "dac build-engines": "cuda",
}


MAX_MESSAGE_CHARS = 500  # a message quotes what it refuses, but never a 1 MB field name back at its sender


def shortened(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters, saying how long it was."""
    if len(message) <= limit:
        return message
    suffix = f"… ({len(message):,} characters in all)"
    return message[: limit - len(suffix)] + suffix


class CfdeployError(Exception):
    """Bad input or environment; the CLI prints ``error: <message>`` and exits with code 2. Messages are kept short
    whatever they quote (:func:`shortened`)."""

    def __init__(self, message: str) -> None:
        super().__init__(shortened(message))


def missing_extra(
    package: str, needed_for: str, cause: BaseException | None = None, extra: str | None = None
) -> CfdeployError:
    """The error for a package a command needs but the install lacks, naming the extra to install: ``extra`` (the
    command's, from COMMAND_EXTRAS), else the package's own (EXTRAS)."""
    if package == "tensorrt":
        return CfdeployError(
            f"{needed_for} needs TensorRT, which is not installed here ({cause}); on Jetson it comes with JetPack, "
            "elsewhere `pip install tensorrt`"
        )
    extra = extra or EXTRAS.get(package, "export")
    return CfdeployError(f'{needed_for} needs {package}, which this install lacks: pip install "cfdeploy[{extra}]"')


FLOAT32_MAX = 3.4028234663852886e38  # the networks compute in float32: a larger value is inf there


def finite_in_float32(value: float) -> bool:
    """Whether ``value`` stays finite once converted to float32, the type the networks compute in."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def require_finite(**options: float | None) -> None:
    """Refuse nan, inf, and numbers that become inf in float32, where a number means a setting
    (``require_finite(strength=s)`` names ``--strength``)."""
    for name, value in options.items():
        if value is not None and not finite_in_float32(value):
            raise CfdeployError(
                f"--{name.replace('_', '-')} must be a finite number within float32's range, got {str(value)[:40]}"
            )


def require_range(low: int, high: int | None = None, **options: int | None) -> None:
    """Integer options checked in one line each (typer's own range check prints a usage box)."""
    for name, value in options.items():
        if value is not None and (value < low or (high is not None and value > high)):
            bound = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise CfdeployError(f"--{name.replace('_', '-')} must be {bound}, got {value}")
