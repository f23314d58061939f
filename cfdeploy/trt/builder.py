"""``cfdeploy build-engines``: TensorRT engines from a bundle's ONNX graphs, cached by :class:`EngineKey`.

Every network is parsed from its ONNX file, built with the precision its contract names (or
``--precision``), one optimisation profile over its batched inputs, a shared timing cache and, for the
per-prompt mappers, the refit flag. Engines and their keys are written atomically under a lock on the
bundle, so two builds into one bundle cannot interleave.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import tensorrt as trt

from cfdeploy.bundle import Bundle
from cfdeploy.bundle_files import VerifiedGraph
from cfdeploy.contracts import NetworkContract
from cfdeploy.errors import CfdeployError
from cfdeploy.files import sha256_file
from cfdeploy.outputs import DirectoryLock, write_atomic
from cfdeploy.trt.cuda import gpu_identity, use_gpu
from cfdeploy.trt.log import LOGGER
from cfdeploy.trt.plan import (
    TIMING_CACHE,
    BuildSettings,
    EngineKey,
    engine_paths,
    keeps_fp32,
    key_mismatches,
    network_precision,
    plan_builds,
    read_key,
)

# Never pinned: shape and integer plumbing, and casts (forcing their output type would override the cast).
_NEVER_PINNED = frozenset({trt.LayerType.CONSTANT, trt.LayerType.SHAPE, trt.LayerType.CAST, trt.LayerType.ASSERTION})
_FLOAT_TYPES = (trt.float32, trt.float16)


@dataclass(frozen=True)
class BuiltEngine:
    network: str
    path: Path
    key: EngineKey
    seconds: float | None  # None: an up-to-date engine was kept


class BuildProgress(trt.IProgressMonitor):
    """Forwards TensorRT's build phases to a callback (the CLI's progress line)."""

    def __init__(self, report: Callable[[str], None]) -> None:
        trt.IProgressMonitor.__init__(self)
        self.report = report

    def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
        self.report(f"{phase_name} ({num_steps} steps)")

    def step_complete(self, phase_name: str, step: int) -> bool:
        return True

    def phase_finish(self, phase_name: str) -> None:
        return None


def prefixed(report: Callable[[str], None], network: str) -> Callable[[str], None]:
    return lambda message: report(f"{network}: {message}")


def wanted_key(contract: NetworkContract, onnx_sha256: str, settings: BuildSettings, gpu: tuple[str, str]) -> EngineKey:
    profile = settings.profile
    return EngineKey(
        network=contract.name,
        onnx_sha256=onnx_sha256,
        tensorrt_version=trt.__version__,
        gpu_name=gpu[0],
        compute_capability=gpu[1],
        precision=network_precision(contract, settings.precision),
        profile=(profile.min, profile.opt, profile.max),
        refittable=contract.refittable,
    )


def _layer_output_channels(layer: trt.ILayer) -> int | None:
    if layer.num_outputs == 0:
        return None
    shape = layer.get_output(0).shape
    return int(shape[1]) if len(shape) > 1 else None


def apply_precision(network: trt.INetworkDefinition, config: trt.IBuilderConfig, precision: str) -> int:
    """Set builder flags for ``precision``; in "mixed", pin the sensitive layers to fp32. Returns pinned count."""
    config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: parity with the CPU reference
    if precision == "fp32":
        return 0
    config.set_flag(trt.BuilderFlag.FP16)
    if precision != "mixed":
        return 0
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if _pinnable(layer) and keeps_fp32(precision, layer.type.name, _layer_output_channels(layer)):
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
            pinned += 1
    return pinned


def _pinnable(layer: trt.ILayer) -> bool:
    """Only layers computing floating-point activations can be pinned (as Polygraphy's precision tools do)."""
    if layer.type in _NEVER_PINNED or layer.num_outputs == 0:
        return False
    outputs = [layer.get_output(index) for index in range(layer.num_outputs)]
    return all(out.dtype in _FLOAT_TYPES and out.is_execution_tensor and not out.is_shape_tensor for out in outputs)


def parse_onnx(graph: VerifiedGraph) -> tuple[trt.Builder, trt.INetworkDefinition, trt.OnnxParser]:
    """Parse a verified graph's bytes. External weights are the one thing read by path: TensorRT's parser opens
    ``GRAPH.onnx.data`` beside ``graph.path`` itself, so the bundle verifies that file just before (see
    :meth:`~cfdeploy.bundle_files.VerifiedFiles.graph`)."""
    builder = trt.Builder(LOGGER)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, LOGGER)
    if not parser.parse(graph.content, str(graph.path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise CfdeployError(f"{graph.path}: TensorRT could not parse the graph: {errors}")
    return builder, network, parser


def build_engine(
    graph: VerifiedGraph,
    contract: NetworkContract,
    key: EngineKey,
    settings: BuildSettings,
    timing_cache_path: Path,
    report: Callable[[str], None],
) -> bytes:
    """Serialized engine for one network."""
    builder, network, _parser = parse_onnx(graph)
    config = builder.create_builder_config()
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if key.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    apply_precision(network, config, key.precision)
    profile = builder.create_optimization_profile()
    for spec in contract.batched_inputs:
        rest = [int(dim) for dim in spec.shape[1:]]
        profile.set_shape(
            spec.name,
            trt.Dims([key.profile[0], *rest]),
            trt.Dims([key.profile[1], *rest]),
            trt.Dims([key.profile[2], *rest]),
        )
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache_path.read_bytes() if timing_cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        report(f"timing cache {timing_cache_path} is from another TensorRT or GPU; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    config.progress_monitor = BuildProgress(report)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CfdeployError(f"{graph.path}: TensorRT failed to build the {contract.name} engine (see the log above)")
    write_atomic(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def build_engines(
    bundle_path: Path,
    settings: BuildSettings,
    report: Callable[[str], None] = lambda message: None,
    device: str = "cuda",
) -> list[BuiltEngine]:
    """Build (or keep, when their keys match) the engines of a bundle on GPU ``device``; refuse mismatches without
    ``rebuild``."""
    bundle_path = bundle_path.resolve()
    Bundle(bundle_path)  # a clear error for a wrong path before any lock file is made
    _, gpu = use_gpu(device)
    with DirectoryLock(bundle_path):
        bundle = Bundle(bundle_path)
        contracts = bundle.contracts
        names = list(settings.networks or [name for name in contracts if bundle.has_network(name)])
        unknown = [name for name in names if name not in contracts or not bundle.has_network(name)]
        if unknown:
            raise CfdeployError(
                f"{bundle_path}: no graph for {', '.join(unknown)} (have: {', '.join(bundle.manifest['networks'])})"
            )
        engine_dir = settings.engine_dir or bundle.engine_dir
        engine_dir.mkdir(parents=True, exist_ok=True)
        # keyed on the manifest's hashes; a graph is read (and its hash verified) only if it is built
        wanted = [wanted_key(contracts[name], bundle.network_sha256(name), settings, gpu) for name in names]
        return build_wanted(
            engine_dir, wanted, contracts, bundle.network, lambda name: settings, settings.rebuild, report
        )


def build_wanted(
    engine_dir: Path,
    wanted: list[EngineKey],
    contracts: Mapping[str, NetworkContract],
    graph: Callable[[str], VerifiedGraph],
    settings: Callable[[str], BuildSettings],
    rebuild: bool,
    report: Callable[[str], None],
) -> list[BuiltEngine]:
    """Build the engines of ``wanted`` that are missing or stale (refusing mismatches without ``rebuild``), keep the
    rest; each engine is written with its key, the key last. The caller holds the bundle's lock."""
    to_build = plan_builds(engine_dir, wanted, rebuild)
    built = []
    for key in wanted:
        engine_path, key_path = engine_paths(engine_dir, key.network)
        if key not in to_build:
            report(f"{key.network}: engine is up to date")
            built.append(BuiltEngine(key.network, engine_path, key, None))
            continue
        network_settings = settings(key.network)
        report(f"{key.network}: building {key.precision} engine, {network_settings.profile.label()}")
        started = time.perf_counter()
        engine = build_engine(
            graph(key.network),
            contracts[key.network],
            key,
            network_settings,
            engine_dir / TIMING_CACHE,
            prefixed(report, key.network),
        )
        key_path.unlink(missing_ok=True)  # an engine without a key is refused, never trusted
        write_atomic(engine_path, engine)
        write_atomic(key_path, json_text(key).encode())
        seconds = time.perf_counter() - started
        report(f"{key.network}: built in {seconds:.1f}s ({len(engine) / 2**20:.1f} MiB)")
        built.append(BuiltEngine(key.network, engine_path, key, seconds))
    return built


def json_text(key: EngineKey) -> str:
    return json.dumps(key.as_dict(), indent=2) + "\n"


def refit_engine(engine_dir: Path, network: str, onnx_path: Path) -> EngineKey:
    """Load new weights from ``onnx_path`` into a refittable engine and store it under an updated key."""
    engine_path, key_path = engine_paths(engine_dir, network)
    key = read_key(key_path)
    if key is None or not engine_path.is_file():
        raise CfdeployError(f"{engine_path}: no engine with a key to refit")
    if not key.refittable:
        raise CfdeployError(
            f"{engine_path}: was built without the refit flag (rebuild it with cfdeploy build-engines --rebuild)"
        )
    gpu = gpu_identity()
    here = replace(key, tensorrt_version=trt.__version__, gpu_name=gpu[0], compute_capability=gpu[1])
    problems = key_mismatches(key, here)
    if problems:
        raise CfdeployError(f"{engine_path}: cannot be refitted here: {'; '.join(problems)}")
    runtime = trt.Runtime(LOGGER)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise CfdeployError(f"{engine_path}: TensorRT could not load the engine")
    refitter = trt.Refitter(engine, LOGGER)
    parser_refitter = trt.OnnxParserRefitter(refitter, LOGGER)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        raise CfdeployError(f"{onnx_path}: its weights do not fit the {network} engine (different architecture?)")
    missing = refitter.get_missing_weights()
    if missing or not refitter.refit_cuda_engine():
        raise CfdeployError(f"{engine_path}: refit failed (weights still missing: {', '.join(missing[:4]) or 'none'})")
    refitted = replace(key, onnx_sha256=sha256_file(onnx_path))
    key_path.unlink(missing_ok=True)
    write_atomic(engine_path, bytes(engine.serialize()))
    write_atomic(key_path, json_text(refitted).encode())
    return refitted
