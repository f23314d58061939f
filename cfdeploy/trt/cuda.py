"""The few CUDA runtime calls the TensorRT path needs, through NVIDIA's cuda-python (no torch).

cuda-python returns ``(error, *values)`` tuples; :func:`call` turns a failing one into a one-line
error naming the call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfdeploy.devices import parse_device
from cfdeploy.errors import CfdeployError

try:
    from cuda.bindings import runtime as cudart
except ImportError as missing:  # the 'cuda' extra; reported when a GPU path is asked for
    cudart = None
    CUDA_IMPORT_ERROR: str | None = str(missing)
else:
    CUDA_IMPORT_ERROR = None


def require_cudart() -> Any:
    if cudart is None:
        raise CfdeployError(f"the TensorRT path needs cuda-python (pip install -e '.[cuda]'): {CUDA_IMPORT_ERROR}")
    return cudart


def call(name: str, *args: Any) -> Any:
    """``cudart.<name>(*args)``, raising on a CUDA error; returns the value (or tuple of values)."""
    result = getattr(require_cudart(), name)(*args)
    error, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(error) != 0:
        raise CfdeployError(f"CUDA {name} failed: {cudart.cudaGetErrorString(error)[1].decode()} ({error})")
    return values[0] if len(values) == 1 else values


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """``(name, "major.minor")`` of a GPU: with the TensorRT version, what an engine is tied to."""
    count = call("cudaGetDeviceCount")
    if count <= device:
        raise CfdeployError(f"CUDA device {device} requested but {count} visible")
    properties = call("cudaGetDeviceProperties", device)
    name = properties.name.decode() if isinstance(properties.name, bytes) else str(properties.name)
    return name.rstrip("\x00").strip(), f"{properties.major}.{properties.minor}"


def memory_in_use_mb() -> float:
    free, total = call("cudaMemGetInfo")
    return float(total - free) / (1 << 20)


class DeviceBuffer:
    """A fixed device allocation; its address never changes, so CUDA graphs can capture it."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.address = int(call("cudaMalloc", max(nbytes, 1)))

    def upload(self, array: np.ndarray, stream: int) -> None:
        host = np.ascontiguousarray(array)
        if host.nbytes > self.nbytes:
            raise CfdeployError(f"input of {host.nbytes} bytes does not fit a {self.nbytes}-byte device buffer")
        kind = require_cudart().cudaMemcpyKind.cudaMemcpyHostToDevice
        call("cudaMemcpyAsync", self.address, host.ctypes.data, host.nbytes, kind, stream)
        call("cudaStreamSynchronize", stream)  # the host array may be freed once this returns

    def download(self, out: np.ndarray, stream: int) -> np.ndarray:
        kind = require_cudart().cudaMemcpyKind.cudaMemcpyDeviceToHost
        call("cudaMemcpyAsync", out.ctypes.data, self.address, out.nbytes, kind, stream)
        call("cudaStreamSynchronize", stream)
        return out

    def copy_from(self, source: DeviceBuffer, nbytes: int, stream: int) -> None:
        kind = require_cudart().cudaMemcpyKind.cudaMemcpyDeviceToDevice
        call("cudaMemcpyAsync", self.address, source.address, nbytes, kind, stream)

    def free(self) -> None:
        if self.address:
            call("cudaFree", self.address)
            self.address = 0


class EventTimer:
    """Device time between two points on a stream (what the GPU spent, not what Python waited)."""

    def __init__(self) -> None:
        self.start = call("cudaEventCreate")
        self.stop = call("cudaEventCreate")

    def begin(self, stream: int) -> None:
        call("cudaEventRecord", self.start, stream)

    def end_ms(self, stream: int) -> float:
        call("cudaEventRecord", self.stop, stream)
        call("cudaEventSynchronize", self.stop)
        return float(call("cudaEventElapsedTime", self.start, self.stop))

    def close(self) -> None:
        call("cudaEventDestroy", self.start)
        call("cudaEventDestroy", self.stop)


def use_gpu(device: str) -> tuple[str, tuple[str, str]]:
    """Make ``--device`` (cuda or cuda:N) the current GPU; its name and the GPU's identity. The CPU is refused."""
    parsed = parse_device(device)
    if parsed.index is None:
        raise CfdeployError(f"--device {device}: TensorRT engines run on a CUDA GPU (cuda or cuda:N)")
    call("cudaSetDevice", parsed.index)
    return str(parsed), gpu_identity(parsed.index)
