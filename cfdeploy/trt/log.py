"""The one TensorRT logger of the process (builder, refitter and runtime share it)."""

from __future__ import annotations

import tensorrt as trt

LOGGER = trt.Logger(trt.Logger.WARNING)
