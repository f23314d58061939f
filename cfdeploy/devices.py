"""``--device``: ``cpu``, ``cuda`` or ``cuda:N``, parsed here once and honoured by every runtime.

PyTorch gets a ``torch.device``, ONNX Runtime its providers with the GPU's ``device_id``, TensorRT the GPU
ordinal to make current. A device a runtime cannot use is refused in one line, before anything is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cfdeploy.errors import CfdeployError

if TYPE_CHECKING:
    import torch

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
_DEVICE = re.compile(r"(cpu)|cuda(?::(\d{1,4}))?")


@dataclass(frozen=True)
class Device:
    """A parsed ``--device``: ``index`` is None on the CPU and the GPU ordinal on CUDA."""

    index: int | None = None

    @property
    def is_cuda(self) -> bool:
        return self.index is not None

    def __str__(self) -> str:
        return "cpu" if self.index is None else f"cuda:{self.index}"


def parse_device(text: str | Device) -> Device:
    """``cpu``, ``cuda`` (GPU 0) or ``cuda:N``; anything else is refused in one line."""
    if isinstance(text, Device):
        return text
    match = _DEVICE.fullmatch(str(text).strip().lower())
    if match is None:
        raise CfdeployError(f"--device {str(text)[:40]!r}: expected cpu, cuda or cuda:N")
    return Device(None if match.group(1) else int(match.group(2) or 0))


def torch_device(text: str | Device) -> torch.device:
    """The ``torch.device`` for ``--device``, after checking this torch sees that GPU."""
    import torch

    device = parse_device(text)
    if not device.is_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CfdeployError(f"--device {text}: this torch sees no CUDA GPU")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise CfdeployError(f"--device {text}: this machine has {count} CUDA GPU(s), numbered from 0")
    return torch.device(str(device))


def onnxruntime_providers(
    text: str | Device, available: Sequence[str], requested: Sequence[str] | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """ONNX Runtime's providers and their options for ``--device``.

    ``cpu`` is the CPU provider alone; ``cuda:N`` is TensorRT's provider (where installed), then CUDA's, on GPU N,
    with the CPU's for what they do not run. ``requested`` (``--providers``, an expert override) replaces that
    choice, still placed on GPU N.
    """
    device = parse_device(text)
    if requested:
        unknown = [name for name in requested if name not in available]
        if unknown:
            raise CfdeployError(
                f"ONNX Runtime providers {', '.join(unknown)} are not available here (have: {', '.join(available)})"
            )
        providers = list(requested)
    elif device.is_cuda:
        if CUDA_PROVIDER not in available:
            raise CfdeployError(
                f"--device {text}: this ONNX Runtime has no CUDA provider "
                f"(has {', '.join(available)}); install onnxruntime-gpu"
            )
        providers = [name for name in (TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER) if name in available]
    else:
        providers = [CPU_PROVIDER]
    gpu = {"device_id": str(device.index or 0)}
    return providers, [dict(gpu) if name in (TENSORRT_PROVIDER, CUDA_PROVIDER) else {} for name in providers]
