"""TensorRT engines built from a bundle's ONNX graphs: the plan (pure logic), the builder and the runtime."""

from __future__ import annotations

import importlib
from types import ModuleType

from cfdeploy.errors import CfdeployError


def tensorrt_module(name: str) -> ModuleType:
    """``cfdeploy.trt.builder`` or ``.runtime``, or a one-line error where TensorRT is not installed."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as missing:
        raise CfdeployError(
            f"TensorRT is not installed here ({missing}); on Jetson it comes with JetPack, elsewhere `pip install tensorrt`"
        ) from None
    return importlib.import_module(f"cfdeploy.trt.{name}")
