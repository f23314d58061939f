"""One TensorRT engine class and one engine set, for both editors' bundles.

Each :class:`Engine` owns device buffers sized for its profile's largest batch, allocated once, so
their addresses never change: static-batch engines are captured into a CUDA graph after a warm-up
run and replayed. Batches are cut to the profile's maximum and padded to its minimum. An
:class:`EngineSet` loads a bundle's engines by network name on one CUDA stream, each checked against
the key it was built under (graph, TensorRT, GPU), with an optional hook that sees an engine before
its execution context exists (a refit with other weights).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt

from cfdeploy.contracts import NetworkContract, TensorSpec
from cfdeploy.errors import CfdeployError
from cfdeploy.trt.cuda import DeviceBuffer, EventTimer, call, require_cudart, use_gpu
from cfdeploy.trt.log import LOGGER
from cfdeploy.trt.plan import (
    BatchProfile,
    EngineKey,
    batch_chunks,
    check_runnable,
    engine_paths,
    pad_batch,
)

Prepare = Callable[[trt.ICudaEngine], None]

_NUMPY_TYPES = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int64: np.int64}


def _concrete_shape(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    return tuple(batch if isinstance(dim, str) else dim for dim in spec.shape)


class Engine:
    """One engine: execution context, fixed device buffers, and a CUDA graph once static and warm."""

    def __init__(
        self,
        path: Path,
        contract: NetworkContract,
        key: EngineKey,
        runtime: trt.Runtime,
        stream: int,
        cuda_graphs: bool,
        prepare: Prepare | None = None,
    ) -> None:
        """``prepare`` sees the engine before its execution context is made (a refit with other weights)."""
        self.contract = contract
        self.profile = BatchProfile(*key.profile)
        self.stream = stream
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CfdeployError(f"{path}: TensorRT could not load the engine (built by another TensorRT?)")
        if prepare is not None:
            prepare(engine)
        self.engine = engine
        self.context = engine.create_execution_context()
        for spec in (*contract.inputs, *contract.outputs):
            found = engine.get_tensor_dtype(spec.name)
            if _NUMPY_TYPES.get(found) != np.dtype(spec.dtype):
                raise CfdeployError(f"{path}: tensor {spec.name} is {found}, the contract says {spec.dtype}")
        self.buffers: dict[str, DeviceBuffer] = {}
        for spec in (*contract.inputs, *contract.outputs):
            self.buffers[spec.name] = DeviceBuffer(self.nbytes(spec.name, self.profile.max))
            self.context.set_tensor_address(spec.name, self.buffers[spec.name].address)
        self.use_graph = cuda_graphs and self.profile.static
        self._graph: Any = None
        self._batch: int | None = None
        self.device_ms = 0.0
        self._timer = EventTimer()

    def nbytes(self, name: str, batch: int) -> int:
        spec = next(spec for spec in (*self.contract.inputs, *self.contract.outputs) if spec.name == name)
        return int(np.prod(_concrete_shape(spec, batch))) * np.dtype(spec.dtype).itemsize

    @property
    def batch(self) -> int | None:
        """The batch the context is set up for (what its buffers last held)."""
        return self._batch

    def _set_batch(self, batch: int) -> None:
        if batch != self._batch:
            for spec in self.contract.batched_inputs:
                if not self.context.set_input_shape(spec.name, _concrete_shape(spec, batch)):
                    raise CfdeployError(f"{self.contract.name}: engine refused batch {batch} ({self.profile.label()})")
            self._batch = batch

    def execute(self, batch: int) -> None:
        """Run on whatever the input buffers hold; a replayed CUDA graph where possible."""
        self._set_batch(batch)
        self._timer.begin(self.stream)
        if self._graph is not None:
            call("cudaGraphLaunch", self._graph, self.stream)
        else:
            if not self.context.execute_async_v3(self.stream):
                raise CfdeployError(f"{self.contract.name}: TensorRT execution failed")
            if self.use_graph:
                self._capture()
        self.device_ms += self._timer.end_ms(self.stream)

    def _capture(self) -> None:
        """Record one execution as a CUDA graph; if capture fails, keep running without one (as trtexec does)."""
        cudart = require_cudart()
        call("cudaStreamSynchronize", self.stream)
        call("cudaStreamBeginCapture", self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        launched = self.context.execute_async_v3(self.stream)
        error, graph = cudart.cudaStreamEndCapture(self.stream)
        if not launched or int(error) != 0 or graph is None:
            if graph is not None:
                cudart.cudaGraphDestroy(graph)
            cudart.cudaGetLastError()
            self.use_graph = False
            return
        try:
            self._graph = call("cudaGraphInstantiate", graph, 0)
        finally:
            call("cudaGraphDestroy", graph)

    def upload(self, name: str, array: np.ndarray, run_batch: int) -> None:
        """Copy ``array`` into the input buffer, padded along the batch to ``run_batch`` by repeating its last row."""
        spec = next(spec for spec in self.contract.inputs if spec.name == name)
        host = np.ascontiguousarray(array, np.dtype(spec.dtype))
        self.buffers[name].upload(
            pad_batch(host, run_batch) if spec in self.contract.batched_inputs else host, self.stream
        )

    def download(self, name: str, rows: int) -> np.ndarray:
        spec = next(spec for spec in self.contract.outputs if spec.name == name)
        out = np.empty(_concrete_shape(spec, rows), np.dtype(spec.dtype))
        return self.buffers[name].download(out, self.stream)

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        """Host in, host out (the single output), chunked to the profile."""
        batch = next(inputs[spec.name].shape[0] for spec in self.contract.batched_inputs)
        output = self.contract.outputs[0].name
        parts = []
        for start, stop, run_batch in batch_chunks(batch, self.profile):
            for spec in self.contract.inputs:
                value = inputs[spec.name]
                self.upload(spec.name, value[start:stop] if spec in self.contract.batched_inputs else value, run_batch)
            self.execute(run_batch)
            parts.append(self.download(output, stop - start))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        if self._graph is not None:
            call("cudaGraphExecDestroy", self._graph)
            self._graph = None
        self._timer.close()
        for buffer in self.buffers.values():
            buffer.free()
        self.buffers.clear()


class EngineSet:
    """A bundle's engines on one CUDA stream, by network name, each loaded on first use.

    Args:
        engine_dir: where the engines and their keys are (``BUNDLE/tensorrt``).
        contracts: the bundle's network contracts.
        graph_sha256: what each network's engine must have been built from.
        device: ``cuda`` or ``cuda:N``.
        cuda_graphs: replay static-batch engines as CUDA graphs.
        prepare: per network, a hook run on the engine before its execution context is made (a refit).
    """

    def __init__(
        self,
        engine_dir: Path,
        contracts: Mapping[str, NetworkContract],
        graph_sha256: Callable[[str], str],
        device: str = "cuda",
        cuda_graphs: bool = True,
        prepare: Mapping[str, Prepare] | None = None,
    ) -> None:
        self.engine_dir = engine_dir
        self.contracts = contracts
        self.graph_sha256 = graph_sha256
        self.cuda_graphs = cuda_graphs
        self.prepare = dict(prepare or {})
        self.device, self.gpu = use_gpu(device)
        self.stream = int(call("cudaStreamCreate"))
        self.runtime = trt.Runtime(LOGGER)
        self.engines: dict[str, Engine] = {}

    def engine(self, network: str) -> Engine:
        """The network's engine, after checking it was built for this graph, this TensorRT and this GPU."""
        loaded = self.engines.get(network)
        if loaded is None:
            key = check_runnable(self.engine_dir, network, self.graph_sha256(network), trt.__version__, self.gpu)
            loaded = Engine(
                engine_paths(self.engine_dir, network)[0],
                self.contracts[network],
                key,
                self.runtime,
                self.stream,
                self.cuda_graphs,
                self.prepare.get(network),
            )
            self.engines[network] = loaded
        return loaded

    def __call__(self, network: str, **inputs: np.ndarray) -> np.ndarray:
        return self.engine(network)(**inputs)

    def device_ms(self) -> dict[str, float]:
        """GPU time per network since the set was made, from CUDA events."""
        return {name: engine.device_ms for name, engine in self.engines.items()}

    def close(self) -> None:
        """Free the engines' buffers and graphs, then their stream."""
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()
        if self.stream:
            call("cudaStreamDestroy", self.stream)
            self.stream = 0
