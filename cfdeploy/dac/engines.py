"""TensorRT for DAC bundles: ``cfdeploy dac build-engines`` and ``dac edit --bundle DACBUNDLE --backend tensorrt``.

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

from cfdeploy.bundle_files import engine_dir
from cfdeploy.dac.bundle import NETWORKS, DacBundle
from cfdeploy.errors import CfdeployError
from cfdeploy.outputs import DirectoryLock
from cfdeploy.trt.builder import BuiltEngine, build_wanted, wanted_key
from cfdeploy.trt.cuda import use_gpu
from cfdeploy.trt.engine import EngineSet
from cfdeploy.trt.log import LOGGER
from cfdeploy.trt.plan import BatchProfile, BuildSettings

BATCHES = {"text_encoder": 2, "unet": 2, "vae_decoder": 1}  # CFG runs uncond and cond together; one image is decoded


def build_settings(network: str, rebuild: bool) -> BuildSettings:
    batch = BATCHES[network]
    return BuildSettings(profile=BatchProfile(batch, batch, batch), rebuild=rebuild)


def build_dac_engines(
    bundle_path: Path, rebuild: bool = False, report: Callable[[str], None] = lambda message: None, device: str = "cuda"
) -> list[BuiltEngine]:
    """Build (or keep, when their keys match) the engines of a DAC bundle under ``BUNDLE/tensorrt``, on GPU ``device``."""
    DacBundle(bundle_path)  # a clear error for a wrong path before any lock file is made
    _, gpu = use_gpu(device)
    with DirectoryLock(bundle_path):
        bundle = DacBundle(bundle_path)
        contracts = bundle.contracts
        engines = engine_dir(bundle_path)
        engines.mkdir(exist_ok=True)
        wanted = [
            wanted_key(contracts[name], bundle.graph_sha256(name), build_settings(name, rebuild), gpu)
            for name in NETWORKS
        ]
        return build_wanted(
            engines, wanted, contracts, bundle.graph, lambda name: build_settings(name, rebuild), rebuild, report
        )


def refit_unet(engine: trt.ICudaEngine, weights: dict[str, np.ndarray]) -> None:
    """Set U's tensors in a refittable UNet engine (before any execution context uses it)."""
    refitter = trt.Refitter(engine, LOGGER)
    refittable = set(refitter.get_all_weights())
    absent = sorted(set(weights) - refittable)
    if absent:
        raise CfdeployError(
            f"the UNet engine has no refittable weight {absent[0]} ({len(absent)} of U's tensors); "
            "rebuild it with cfdeploy dac build-engines --rebuild"
        )
    for name, value in weights.items():
        if not refitter.set_named_weights(name, trt.Weights(value)):
            raise CfdeployError(f"the UNet engine refused the refit weight {name} of shape {value.shape}")
    missing = refitter.get_missing_weights()
    if missing or not refitter.refit_cuda_engine():
        raise CfdeployError(
            f"the UNet engine's refit failed (weights still missing: {', '.join(missing[:4]) or 'none'})"
        )


def tensorrt_networks(
    bundle: DacBundle, device: str = "cuda", unet_weights: dict[str, np.ndarray] | None = None
) -> EngineSet:
    """The bundle's engines on one CUDA stream with CUDA graphs; U refitted from ``unet_weights`` if given."""
    refit = {"unet": lambda engine: refit_unet(engine, unet_weights)} if unet_weights else None
    return EngineSet(
        engine_dir(bundle.path), bundle.contracts, bundle.graph_sha256, device, cuda_graphs=True, prepare=refit
    )


def describe(engines: EngineSet) -> dict[str, Any]:
    return {
        "backend": "tensorrt",
        "device": engines.device,
        "tensorrt": trt.__version__,
        "precisions": {name: contract.precision for name, contract in engines.contracts.items()},
    }
