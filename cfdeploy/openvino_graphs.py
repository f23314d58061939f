"""OpenVINO compiled models over a bundle's verified graphs: ``graphs(name, **inputs)``, like ONNX Runtime's sessions.

OpenVINO reads an ONNX graph from memory (the verified bytes, never the bundle's file again), but not its external
weights: from memory it would look for them relative to the working directory. A graph that has external weights,
or whose bytes could name some (they hold the word ``location``, the key every external reference needs), is
therefore written with its verified weights into a new private temporary directory and read from there, where
OpenVINO resolves references only inside that directory; the directory is removed once the model is read.

Compiled models are kept in the verified :class:`~cfdeploy.graph_cache.GraphCache` (OpenVINO's exported blobs,
checked against their sha256 where they lie, then mapped rather than copied into the process), so the next process
skips reading and compiling.

Decisions (the device name, each network's precision) are pure functions here; the OpenVINO calls are in
:class:`CompiledGraphs`.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from cfdeploy.bundle_files import VerifiedGraph
from cfdeploy.environment import bf16_missing, cpu_features, cpu_signature, physical_cores
from cfdeploy.errors import CfdeployError
from cfdeploy.graph_cache import GraphCache, entry_parts

COMPILED_BLOB = "compiled.blob"
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
# bf16 where it pays and keeps its rule (images within 40 dB PSNR of fp32, encoder codes within rel-L2 1e-2): the
# convolution networks. The others are small or run once per prompt, and every image depends on them: kept fp32.
BF16_NETWORKS = ("generator", "encoder")
KEPT_FP32 = "fp32: small or run once per prompt, kept exact"


def openvino_device(device: str, available: Sequence[str]) -> str:
    """OpenVINO's name for ``--device`` (``cpu`` → ``CPU``; ``gpu``, ``gpu.1``, ``npu`` where OpenVINO finds them)."""
    name = device.upper()
    if name in available or (name in ("GPU", "NPU") and any(found.split(".")[0] == name for found in available)):
        return name
    raise CfdeployError(
        f"--device {device}: the openvino backend runs on OpenVINO's devices; this machine has "
        f"{', '.join(name.lower() for name in available) or 'none'}"
    )


def precision_refusal(precision: str, device: str, features: frozenset[str]) -> str | None:
    """Why ``precision`` cannot run on ``device`` here (one line), or None."""
    if precision not in OPENVINO_PRECISIONS:
        return f"--precision {precision}: the openvino backend offers {', '.join(OPENVINO_PRECISIONS)}"
    if precision == "bf16" and device != "CPU":
        return f"--precision bf16: the openvino backend runs bf16 on the CPU only, not {device}"
    missing = bf16_missing(features) if precision == "bf16" else None
    return f"--precision bf16: {missing}; use fp32" if missing else None


def network_precision(network: str, precision: str) -> tuple[str, str]:
    """The precision a network runs in under ``--precision precision``, and why."""
    if precision == "fp32":
        return "fp32", "fp32: as asked"
    if network in BF16_NETWORKS:
        return precision, f"{precision}: as asked"
    return "fp32", KEPT_FP32


def openvino_reason(error: Exception) -> str:
    """OpenVINO's error on one line: its end, which names the cause (its start is the call stack's files)."""
    return " ".join(str(error).split())[-300:]


def may_name_external_data(graph: VerifiedGraph) -> bool:
    """Whether OpenVINO could look for weights outside the graph's bytes: it has external weights, or its bytes
    hold ``location``, the key an external reference needs (random weights hold it about once per 10^10 graphs)."""
    return bool(graph.external) or b"location" in graph.content


class CompiledGraphs:
    """A bundle's graphs as OpenVINO compiled models on one device, each compiled (or imported) on first use.

    Args:
        graph: the verified graph of a network, by name.
        digest: a network's graph sha256 (the manifest's): what cache entries are keyed on.
        check: checks a network's graph files against ``digest`` (raising if they differ), beside each cache read.
        device: ``cpu``, or an OpenVINO device it reports (``gpu``, ``npu``).
        threads: inference threads on the CPU (default: the physical cores).
        precision: ``fp32`` (exact), or ``bf16`` on CPUs that run it natively (per network: :func:`network_precision`).
        cache: where compiled models are kept between processes; None: compile in every process.
        features: the CPU's feature flags (default: this CPU's), which decide whether bf16 is allowed.
    """

    def __init__(
        self,
        graph: Callable[[str], VerifiedGraph],
        digest: Callable[[str], str],
        check: Callable[[str], object],
        device: str = "cpu",
        threads: int | None = None,
        precision: str = "fp32",
        cache: GraphCache | None = None,
        features: frozenset[str] | None = None,
    ) -> None:
        self.core = ov.Core()
        self.device = openvino_device(device, self.core.available_devices)
        self.features = cpu_features() if features is None else features
        refusal = precision_refusal(precision, self.device, self.features)
        if refusal:
            raise CfdeployError(refusal)
        self.graph = graph
        self.digest = digest
        self.check = check
        self.threads = threads or physical_cores()
        self.precision = precision
        self.cache = cache
        self._compiled: dict[str, tuple[ov.InferRequest, threading.Lock]] = {}
        self._blobs: list[np.ndarray] = []  # imported blobs' memory, which the compiled models may read from
        self._lock = threading.Lock()

    def config(self, network: str) -> dict[str, Any]:
        """The compile settings of one network: its precision, and on the CPU the threads and one stream."""
        precision, _ = network_precision(network, self.precision)
        settings: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision]}
        if self.device == "CPU":
            settings |= {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        return settings

    def request(self, network: str) -> tuple[ov.InferRequest, threading.Lock]:
        with self._lock:
            found = self._compiled.get(network)
            if found is None:
                found = self._compiled[network] = (self._open(network).create_infer_request(), threading.Lock())
        return found

    def _open(self, network: str) -> ov.CompiledModel:
        config = self.config(network)
        if self.cache is None:
            return self._compile(network, config)
        settings = {"device": self.device, **config}
        parts = entry_parts("openvino", ov.__version__, self.digest(network), cpu_signature(self.features), settings)
        if self.cache.load_checking(network, parts, self.check, in_place=(COMPILED_BLOB,)) is not None:
            entry = self.cache.entry_path(parts)
            try:
                # copy-on-write: a Tensor shares writable memory only, and as nothing writes it, its pages stay the
                # file cache's (an entry is never changed in place, and a mapped file outlives its removal)
                blob = np.memmap(entry / COMPILED_BLOB, np.uint8, mode="c")
                imported = self.core.import_model(ov.Tensor(blob, shared_memory=True), self.device, config)
            except (OSError, ValueError, RuntimeError) as error:  # OpenVINO's exceptions are RuntimeErrors
                if entry.is_dir():
                    self.cache.refuse(network, parts, f"OpenVINO cannot import it ({openvino_reason(error)})")
                else:  # evicted by another process between its check and its use: compiled again, as on a miss
                    self.cache.outcomes[network] = "miss"
            else:
                self._blobs.append(blob)
                return imported
        compiled = self._compile(network, config)
        self.cache.put(parts, {COMPILED_BLOB: compiled.export_model().getvalue()})
        return compiled

    def _compile(self, network: str, config: dict[str, Any]) -> ov.CompiledModel:
        graph = self.graph(network)
        try:
            if may_name_external_data(graph):
                return self._compile_in_private_directory(graph, config)
            return self.core.compile_model(self.core.read_model(graph.content), self.device, config)
        except RuntimeError as error:  # OpenVINO's exceptions (its frontends' and plugins') are RuntimeErrors
            raise CfdeployError(f"{graph.path}: OpenVINO cannot load this graph: {openvino_reason(error)}") from None

    def _compile_in_private_directory(self, graph: VerifiedGraph, config: dict[str, Any]) -> ov.CompiledModel:
        """Compile a graph and its weights from verified bytes written to a new directory only this user can open;
        compiled before the directory goes, as OpenVINO reads large external weights only when it compiles."""
        with tempfile.TemporaryDirectory(prefix="cfdeploy-openvino-") as private:
            directory = Path(private)
            (directory / graph.path.name).write_bytes(graph.content)
            for name, content in graph.external.items():
                (directory / name).write_bytes(content)
            model = self.core.read_model(str(directory / graph.path.name), config={"ENABLE_MMAP": False})
            return self.core.compile_model(model, self.device, config)

    def __call__(self, network: str, **inputs: np.ndarray) -> np.ndarray:
        request, lock = self.request(network)
        with lock:  # one request per network: its output buffer is reused by the next call
            request.infer(inputs)
            output: np.ndarray = request.get_output_tensor(0).data.copy()
        return output

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "openvino",
            "openvino": ov.__version__,
            "device": self.device,
            "threads": self.threads,
            "precision": self.precision,
            "networks": {network: network_precision(network, self.precision)[1] for network in self._compiled},
            "session_cache": dict(self.cache.outcomes) if self.cache is not None else "off",
        }
