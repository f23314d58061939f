"""TensorRT engines built from a bundle's ONNX graphs: the plan (pure logic), the builder, CUDA helpers.

The runtime that runs them is a backend like the others: :mod:`cfdeploy.backends.tensorrt_backend`.
"""

from __future__ import annotations

from types import ModuleType

from cfdeploy.errors import missing_extra


def tensorrt_builder() -> ModuleType:
    """``cfdeploy.trt.builder``, or a one-line error where TensorRT is not installed."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as missing:
        raise missing_extra("tensorrt", "building engines", missing) from None
    from cfdeploy.trt import builder

    return builder
