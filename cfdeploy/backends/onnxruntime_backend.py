"""The ONNX Runtime backend: runs a bundle's graphs with no torch and no open_clip in the process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from cfdeploy.backends.bundle_backend import BundleBackend
from cfdeploy.bundle import ORT_ENGINE_CACHE, Bundle
from cfdeploy.errors import CfdeployError

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


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


def choose_providers(requested: Sequence[str] | None) -> list[str]:
    available = ort.get_available_providers()
    if requested:
        unknown = [name for name in requested if name not in available]
        if unknown:
            raise CfdeployError(f"ONNX Runtime providers {', '.join(unknown)} are not available here (have: {', '.join(available)})")
        return list(requested)
    return [name for name in PREFERRED_PROVIDERS if name in available]


def provider_options(providers: Sequence[str], precision: str, cache_dir: Path) -> list[dict[str, str]]:
    """Per-provider options for one network's session.

    TensorRT's provider caches its engines and timing data under ``cache_dir`` (ONNX Runtime keys them
    by the graph's name and nodes, not its weights: ``cfdeploy refit`` clears them) and runs fp16 where
    the network's contract allows reduced precision ("mixed" becomes plain fp16 there: the provider has
    no per-layer pinning); CUDA's provider searches convolution algorithms exhaustively once, since
    edits run the same shapes.
    """
    options = []
    for provider in providers:
        if provider == "TensorrtExecutionProvider":
            options.append({
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(cache_dir),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(cache_dir),
                "trt_fp16_enable": "True" if precision != "fp32" else "False",
            })
        elif provider == "CUDAExecutionProvider":
            options.append({"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "True"})
        else:
            options.append({})
    return options


def load_failure(error: Exception) -> str:
    """ONNX Runtime's load error as one readable clause."""
    message = " ".join(str(error).split())
    if "model_path must not be empty" in message or "external data" in message.lower():
        return "it reads external data files, which bundles never use (only files the manifest hashes are read)"
    return message.split(") ")[-1][:300] if "onnxruntime::" in message else message[:300]


class OnnxRuntimeBackend(BundleBackend):
    """Each stage of the edit as an ONNX Runtime session over the bundle's graphs (created on first use)."""

    name = "onnxruntime"

    def __init__(
        self, bundle: Bundle, providers: Sequence[str] | None = None, threads: int | None = None, cache_max: int | None = None
    ) -> None:
        super().__init__(bundle, cache_max)
        self.providers = choose_providers(providers)
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.options.intra_op_num_threads = threads or physical_cores()
        self.options.log_severity_level = 4  # errors come back as exceptions; its own log would add lines
        self._sessions: dict[str, ort.InferenceSession] = {}

    @classmethod
    def from_bundle(
        cls,
        path: Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        cache_max: int | None = None,
        expect_manifest: str | None = None,
    ) -> "OnnxRuntimeBackend":
        """Open the bundle at ``path`` (pinned to a manifest sha256 if ``expect_manifest``)."""
        return cls(Bundle(path, expect_manifest=expect_manifest), providers, threads, cache_max)

    def run(self, network: str, **inputs: np.ndarray) -> np.ndarray:
        session = self._sessions.get(network)
        if session is None:
            cache_dir = self.bundle.engine_dir / ORT_ENGINE_CACHE
            if "TensorrtExecutionProvider" in self.providers:
                cache_dir.mkdir(parents=True, exist_ok=True)
            options = provider_options(self.providers, self.bundle.contracts[network].precision, cache_dir)
            path, graph = self.bundle.network_bytes(network)
            try:
                # From the verified bytes, not the path: ONNX Runtime then reads no file the manifest does not hash
                # (a graph asking for external data fails here instead).
                session = ort.InferenceSession(
                    graph, self.options, providers=self.providers, provider_options=options
                )
            except Exception as error:  # ONNX Runtime has one exception class per failure, none shared but Exception
                raise CfdeployError(f"{path}: ONNX Runtime cannot load this graph: {load_failure(error)}") from None
            self._sessions[network] = session
        output: np.ndarray = session.run(None, inputs)[0]
        return output
