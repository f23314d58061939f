"""ONNX Runtime sessions over verified graphs, for both editors' bundles.

One place decides a session's providers (from ``--device``, or ``--providers`` as an expert override), its
threads, the options of each provider (TensorRT's engine cache and fp16 where a network's contract allows
reduced precision; CUDA's exhaustive convolution search), initializer overrides (another run's weights in
place of the graph's own) and the one-line message for a graph ONNX Runtime cannot load. Every graph
comes from :class:`~cfdeploy.bundle_files.VerifiedGraph` bytes, external weights included, so ONNX Runtime
reads no bundle file after its hash was checked. On the CPU, each graph's optimised form (weights already re-laid out
for the CPU's convolutions) is kept in the verified :class:`~cfdeploy.graph_cache.GraphCache`, so the next process
loads it without optimising again: its graph as checked bytes, its weights mapped from the entry once checked there
(entries are never changed in place), so a process neither copies them nor keeps a private copy of the GB.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cfdeploy.bundle_files import EXTERNAL_DATA_SUFFIX, VerifiedGraph
from cfdeploy.devices import CPU_PROVIDER, CUDA_PROVIDER, TENSORRT_PROVIDER, onnxruntime_providers
from cfdeploy.environment import cpu_features, cpu_signature, physical_cores
from cfdeploy.errors import CfdeployError
from cfdeploy.graph_cache import GraphCache, entry_parts

OPTIMIZED_GRAPH = "graph.onnx"  # a cache entry's optimised graph, and its external weights if it has any
OPTIMIZED_WEIGHTS = OPTIMIZED_GRAPH + EXTERNAL_DATA_SUFFIX


def load_failure(error: Exception) -> str:
    """ONNX Runtime's load error as one readable clause."""
    message = " ".join(str(error).split())
    if "model_path must not be empty" in message or "external data" in message.lower():
        return "it reads external data files the manifest does not list (only files it hashes are read)"
    return message.split(") ")[-1][:300] if "onnxruntime::" in message else message[:300]


def provider_options(
    providers: Sequence[str], base: Sequence[dict[str, Any]], precision: str, engine_cache: Path | None
) -> list[dict[str, Any]]:
    """Per-provider options for one network's session.

    TensorRT's provider caches its engines and timing data under ``engine_cache`` (ONNX Runtime keys them by the
    graph's name and nodes, not its weights: ``cfdeploy refit`` clears them) and runs fp16 where the network's
    contract allows reduced precision ("mixed" becomes plain fp16 there: the provider has no per-layer pinning);
    CUDA's provider searches convolution algorithms exhaustively once, since edits run the same shapes.
    """
    options = []
    for provider, given in zip(providers, base, strict=True):
        extra: dict[str, Any] = {}
        if provider == TENSORRT_PROVIDER:
            if engine_cache is not None:
                engine_cache.mkdir(parents=True, exist_ok=True)
                extra = {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(engine_cache),
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": str(engine_cache),
                }
            extra["trt_fp16_enable"] = "True" if precision != "fp32" else "False"
        elif provider == CUDA_PROVIDER:
            extra = {"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "True"}
        options.append({**given, **extra})
    return options


class Sessions:
    """A bundle's graphs as ONNX Runtime sessions on one device, each created on first use: ``sessions(name, **inputs)``.

    Args:
        graph: the verified graph of a network, by name; or the path of a graph this process has just written itself
            (an export's own check), which ONNX Runtime then reads from there, external weights included, sparing
            this process a copy of its bytes (bundles are read through :class:`~cfdeploy.bundle_files.VerifiedFiles`).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        providers: an expert override of the providers ``device`` picks.
        threads: intra-op threads (default: the physical cores).
        precision: a network's reduced-precision allowance (TensorRT's provider), by name.
        engine_cache: where TensorRT's provider keeps its engines.
        initializers: per network, tensors that replace the graph's initializers of those names.
        digest: a network's graph sha256 (the manifest's); with ``cache``, what cache entries are keyed on.
        check: checks a network's graph files against ``digest`` (raising if they differ), beside each cache read.
        cache: where optimised graphs are kept between processes (CPU provider only, graphs without initializer
            overrides); None: optimise in every process.
    """

    def __init__(
        self,
        graph: Callable[[str], VerifiedGraph | Path],
        device: str = "cpu",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        precision: Callable[[str], str] = lambda name: "fp32",
        engine_cache: Path | None = None,
        initializers: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        digest: Callable[[str], str] | None = None,
        check: Callable[[str], object] | None = None,
        cache: GraphCache | None = None,
    ) -> None:
        self.graph = graph
        self.device = device
        self.providers, self._base_options = onnxruntime_providers(device, ort.get_available_providers(), providers)
        self.threads = threads or physical_cores()
        self.precision = precision
        self.engine_cache = engine_cache
        # ONNX Runtime reads the replacing values from these OrtValues: they are kept alive here
        self._initializers = {
            network: {
                name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in values.items()
            }
            for network, values in (initializers or {}).items()
        }
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.digest = digest
        self.check = check
        self.cache = cache if digest is not None and check is not None and self.providers == [CPU_PROVIDER] else None

    def session(self, network: str) -> ort.InferenceSession:
        session = self._sessions.get(network)
        if session is None:
            session = self._sessions[network] = self._open(network)
        return session

    def _options(self, level: ort.GraphOptimizationLevel, external: Mapping[str, bytes]) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 4  # errors come back as exceptions; its own log would add lines
        # weights are packed for the matrix kernels on the session's threads, not one: a cached 1024 px edit's four
        # sessions load in 0.29 s rather than 0.33-0.40 s on 2 cores, packed identically
        options.add_session_config_entry("session.prepack.enable_parallel", "1")
        if external:
            names = list(external)
            buffers = [np.frombuffer(external[name], np.uint8) for name in names]
            options.add_external_initializers_from_files_in_memory(names, buffers, [len(buffer) for buffer in buffers])
        return options

    def _cache_parts(self, network: str) -> dict[str, Any] | None:
        """What the network's cached optimised graph depends on, or None where it is not cached."""
        if self.cache is None or self.digest is None or network in self._initializers:
            return None
        settings = {"level": "all", "providers": list(self.providers), "weights": "mapped"}
        return entry_parts(
            "onnxruntime", ort.__version__, self.digest(network), cpu_signature(cpu_features()), settings
        )

    def _open(self, network: str) -> ort.InferenceSession:
        parts = self._cache_parts(network)
        if parts is not None:
            assert self.cache is not None and self.check is not None
            cached = self.cache.load_checking(network, parts, self.check, in_place=(OPTIMIZED_WEIGHTS,))
            if cached is not None:
                try:
                    return self._from_cache(cached, self.cache.entry_path(parts))
                except Exception as error:  # ONNX Runtime's exceptions share no class but Exception
                    if self.cache.entry_path(parts).is_dir():
                        self.cache.refuse(
                            network, parts, f"ONNX Runtime cannot load it ({' '.join(str(error).split())[:300]})"
                        )
                    else:  # evicted by another process between its check and its use: made again, as on a miss
                        self.cache.outcomes[network] = "miss"
            return self._optimise_into_cache(network, parts)
        return self._optimise(network, None)

    def _optimise_into_cache(self, network: str, parts: dict[str, Any]) -> ort.InferenceSession:
        """:meth:`_optimise`, its optimised graph stored in the cache; where it cannot be stored (a full disk, a
        read-only cache) that is a warning, and the session is used all the same."""
        assert self.cache is not None
        session = None
        try:
            with self.cache.staging() as staging:
                try:
                    session = self._optimise(network, staging / OPTIMIZED_GRAPH)
                except CfdeployError:
                    # ONNX Runtime writes the optimised graph as it loads: the graph, or the cache's disk, failed
                    session = self._optimise(network, None)  # raises again where the graph is at fault
                    self.cache.on_warning(
                        f"{self.cache.root}: could not store a compiled graph (ONNX Runtime failed to write it)"
                    )
                    return session
                self.cache.commit(parts, staging)  # ONNX Runtime's own files, renamed into place with their sha256
        except OSError as error:
            self.cache.on_warning(f"{self.cache.root}: could not store a compiled graph ({error.strerror or error})")
        return session if session is not None else self._optimise(network, None)

    def _from_cache(self, cached: dict[str, bytes], entry: Path) -> ort.InferenceSession:
        """A session over a cached optimised graph: optimised already, so ONNX Runtime optimises nothing again. Its
        weights, checked where they lie, are mapped by ONNX Runtime from the entry rather than copied in."""
        options = self._options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL, {})
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(entry))
        return ort.InferenceSession(cached[OPTIMIZED_GRAPH], options, providers=self.providers)

    def _optimise(self, network: str, save_to: Path | None) -> ort.InferenceSession:
        """A session over the network's verified graph, fully optimised (its optimised form written to ``save_to``)."""
        graph = self.graph(network)
        path, source, external = (
            (graph, str(graph), {}) if isinstance(graph, Path) else (graph.path, graph.content, graph.external)
        )
        options = self._options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, external)
        if save_to is not None:
            options.optimized_model_filepath = str(save_to)
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", OPTIMIZED_WEIGHTS
            )
        for name, value in self._initializers.get(network, {}).items():
            options.add_initializer(name, value)
        provider_settings = provider_options(
            self.providers, self._base_options, self.precision(network), self.engine_cache
        )
        try:
            session = ort.InferenceSession(
                source, options, providers=self.providers, provider_options=provider_settings
            )
        except Exception as error:  # ONNX Runtime has one exception class per failure, none shared but Exception
            raise CfdeployError(f"{path}: ONNX Runtime cannot load this graph: {load_failure(error)}") from None
        if session.get_providers()[0] != self.providers[0]:
            raise CfdeployError(
                f"--device {self.device}: ONNX Runtime could not start {self.providers[0]} (its CUDA libraries?)"
            )
        return session

    def __call__(self, network: str, **inputs: np.ndarray) -> np.ndarray:
        output: np.ndarray = self.session(network).run(None, inputs)[0]
        return output

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "onnxruntime",
            "device": self.device,
            "providers": list(self.providers),
            "threads": self.threads,
            "session_cache": dict(self.cache.outcomes) if self.cache is not None else "off",
        }
