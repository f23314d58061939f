"""TensorRT for DAC bundles: ``cfdeploy dac build-engines`` and ``dac edit DACBUNDLE --backend tensorrt``.

Each graph becomes an engine at a static batch (CFG's 2 for the text encoder and UNet, 1 for the VAE
decoder), in its contract's precision (the UNet fp16), keyed like CF-CLIP's engines by the graph and
its weights file, TensorRT, GPU, precision and profile. The UNet engine is built refittable, so another
run on the same base model is sampled by refitting its U into the engine in memory (by the initializer
names the bundle's refit map records), not by exporting and building again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt

from cfdeploy.backends.tensorrt_backend import Engine, close_engines
from cfdeploy.bundle import ENGINE_DIR
from cfdeploy.dac.bundle import NETWORKS, DacBundle, cuda_index
from cfdeploy.errors import CfdeployError
from cfdeploy.outputs import DirectoryLock
from cfdeploy.trt.builder import BuiltEngine, build_wanted, wanted_key
from cfdeploy.trt.cuda import call, gpu_identity
from cfdeploy.trt.log import LOGGER
from cfdeploy.trt.plan import BatchProfile, BuildSettings, check_runnable, engine_paths

BATCHES = {"text_encoder": 2, "unet": 2, "vae_decoder": 1}  # CFG runs uncond and cond together; one image is decoded


def build_settings(network: str, rebuild: bool) -> BuildSettings:
    batch = BATCHES[network]
    return BuildSettings(profile=BatchProfile(batch, batch, batch), rebuild=rebuild)


def build_dac_engines(bundle_path: Path, rebuild: bool = False, report: Callable[[str], None] = lambda message: None) -> list[BuiltEngine]:
    """Build (or keep, when their keys match) the engines of a DAC bundle under ``BUNDLE/tensorrt``."""
    DacBundle(bundle_path)  # a clear error for a wrong path before any lock file is made
    gpu = gpu_identity()
    with DirectoryLock(bundle_path):
        bundle = DacBundle(bundle_path)
        contracts = bundle.contracts
        engine_dir = bundle_path / ENGINE_DIR
        engine_dir.mkdir(exist_ok=True)
        wanted = [wanted_key(contracts[name], bundle.graph_sha256(name), build_settings(name, rebuild), gpu) for name in NETWORKS]
        return build_wanted(engine_dir, wanted, contracts, lambda name: bundle_path / contracts[name].filename,
                            lambda name: build_settings(name, rebuild), rebuild, report)


def refit_unet(engine: trt.ICudaEngine, weights: dict[str, np.ndarray]) -> None:
    """Set U's tensors in a refittable UNet engine (before any execution context uses it)."""
    refitter = trt.Refitter(engine, LOGGER)
    refittable = set(refitter.get_all_weights())
    absent = sorted(set(weights) - refittable)
    if absent:
        raise CfdeployError(f"the UNet engine has no refittable weight {absent[0]} ({len(absent)} of U's tensors); "
                            "rebuild it with cfdeploy dac build-engines --rebuild")
    for name, value in weights.items():
        if not refitter.set_named_weights(name, trt.Weights(value)):
            raise CfdeployError(f"the UNet engine refused the refit weight {name} of shape {value.shape}")
    missing = refitter.get_missing_weights()
    if missing or not refitter.refit_cuda_engine():
        raise CfdeployError(f"the UNet engine's refit failed (weights still missing: {', '.join(missing[:4]) or 'none'})")


class TensorRTNetworks:
    """The bundle's engines on one CUDA stream: ``networks(name, **inputs)``; U refitted from ``unet_weights`` if given."""

    def __init__(self, bundle: DacBundle, device: str = "cuda", unet_weights: dict[str, np.ndarray] | None = None) -> None:
        index = cuda_index(device)
        if index is None:
            raise CfdeployError(f"--device {device}: TensorRT engines run on a CUDA GPU (cuda or cuda:N)")
        call("cudaSetDevice", index)
        self.device = f"cuda:{index}"
        gpu = gpu_identity(index)
        engine_dir = bundle.path / ENGINE_DIR
        contracts = bundle.contracts
        self.stream = int(call("cudaStreamCreate"))
        runtime = trt.Runtime(LOGGER)
        self.engines: dict[str, Engine] = {}
        for name in NETWORKS:
            key = check_runnable(engine_dir, name, bundle.graph_sha256(name), trt.__version__, gpu)
            refit = (lambda engine: refit_unet(engine, unet_weights)) if name == "unet" and unet_weights else None
            self.engines[name] = Engine(engine_paths(engine_dir, name)[0], contracts[name], key, runtime, self.stream,
                                        cuda_graphs=True, prepare=refit)

    def describe(self) -> dict[str, Any]:
        return {"backend": "tensorrt", "device": self.device, "tensorrt": trt.__version__,
                "precisions": {name: engine.contract.precision for name, engine in self.engines.items()}}

    def __call__(self, network: str, **inputs: np.ndarray) -> np.ndarray:
        return self.engines[network](**inputs)

    def close(self) -> None:
        close_engines(self.engines, self.stream)
        self.stream = 0
