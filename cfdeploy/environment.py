"""What a run records about the machine it ran on: package versions and the CPU's cores."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Runtimes a result may depend on: module name → distribution.
RUNTIMES = {
    "torch": "torch",
    "open_clip": "open_clip_torch",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "peft": "peft",
    "tensorrt": "tensorrt",
    "openvino": "openvino",
}
# The CPU features that run bf16 natively: Intel AMX's bf16 tiles, or AVX-512's bf16 dot products. Elsewhere bf16
# would be emulated, slower than fp32.
BF16_FEATURES = ("amx_bf16", "avx512_bf16")


def versions() -> dict[str, str]:
    """cfdeploy's, numpy's and Python's versions, and those of the runtimes this process has imported (what ran)."""
    found = {
        "cfdeploy": package_version("cfdeploy"),
        "numpy": package_version("numpy"),
        "python": platform.python_version(),
    }
    for module, package in RUNTIMES.items():
        if module in sys.modules:
            found[module] = package_version(package, getattr(sys.modules[module], "__version__", "unknown"))
    return found


def package_version(package: str, default: str = "unknown") -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return default


def process_stat(pid: int) -> tuple[int, int]:
    """Process ``pid``'s parent pid and start time (clock ticks after boot), from ``/proc/PID/stat`` (Linux).

    Raises OSError where the process is gone or unreadable, ValueError or IndexError where the file is not as Linux
    writes it. The name in parentheses may hold spaces and parentheses itself, so the fields are read after its last
    ``)``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19])


def physical_cores() -> int:
    """Physical cores (hyper-threads share one core's FPU, so more intra-op threads only contend)."""
    try:
        cores = set()
        physical = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                physical = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not key and core is not None:
                cores.add((physical, core))
                physical = core = None
        if core is not None:
            cores.add((physical, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``flags`` on x86, ``Features`` on ARM); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_model(keys: tuple[str, ...] = ("model name",)) -> str:
    """The CPU's model from the first /proc/cpuinfo line starting with one of ``keys``, else Python's guess."""
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith(keys)
        )
    except (OSError, StopIteration):
        return platform.processor()


def cpu_signature(features: frozenset[str]) -> str:
    """The CPU's architecture, model and features as one string: what compiled graphs depend on."""
    return f"{platform.machine()} {cpu_model(('model name', 'CPU part'))} {' '.join(sorted(features))}"


def bf16_missing(features: frozenset[str]) -> str | None:
    """None where the CPU runs bf16 natively, else one clause saying what it lacks."""
    if any(feature in features for feature in BF16_FEATURES):
        return None
    return "this CPU has neither AMX (amx_bf16) nor AVX-512 BF16 (avx512_bf16), so bf16 would run slower than fp32"


def machine_info() -> dict[str, Any]:
    """The CPU, platform and installed runtimes, for benchmark reports (results from two machines do not compare)."""
    installed = {
        package: package_version(package, "")
        for package in ("cfdeploy", "numpy", "torch", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt")
    }
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "bf16": bf16_missing(cpu_features()) or "native",
        "versions": {key: value for key, value in installed.items() if value},
    }


def runtimes() -> dict[str, str]:
    """Each runtime cfdeploy can use, with its installed version or "not installed" (nothing heavy is imported)."""
    found = {}
    for package in (
        "onnxruntime",
        "onnxruntime-gpu",
        "openvino",
        "torch",
        "tensorrt",
        "cuda-python",
        "diffusers",
        "ray",
    ):
        installed = package_version(package, "")
        if installed or package not in ("onnxruntime-gpu", "cuda-python"):
            found[package] = installed or "not installed"
    return found
