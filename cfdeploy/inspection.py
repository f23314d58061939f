"""``cfdeploy inspect``: say what a file is, validating it with the same strict loaders an edit uses."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cfdeploy.bundle_files import MAX_MANIFEST_BYTES
from cfdeploy.errors import CfdeployError, missing_extra
from cfdeploy.files import read_json_object, read_npy, require_file

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _parameters(module: Any) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _describe_array(array: np.ndarray) -> dict[str, Any]:
    shape = list(array.shape)
    if array.ndim == 3:
        meaning = f"W+ latents: {shape[0]} codes x {shape[1]} levels"
    elif array.ndim == 2 and shape[1] == 512:
        meaning = f"{shape[0]} W latents or {shape[0]} CLIP text embeddings"
    elif array.ndim == 1 and shape[0] == 512:
        meaning = "one CLIP text embedding (or one W code)"
    else:
        meaning = "array of unknown meaning"
    return {"kind": "array", "shape": shape, "dtype": str(array.dtype), "meaning": meaning}


# The CPU features that decide which backend and precision to use (docs/performance.md#which-backend-on-which-cpu).
DECIDING_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "bf16")


def system_report() -> dict[str, Any]:
    """This machine as the backends see it: the CPU and its deciding features, the runtimes installed, OpenVINO's and
    ONNX Runtime's devices, whether bf16 runs natively, and the backend ``edit --bundle`` picks."""
    import onnxruntime

    from cfdeploy.backends import default_bundle_backend
    from cfdeploy.environment import bf16_missing, cpu_features, machine_info, physical_cores, runtimes

    features = cpu_features()
    machine = machine_info()
    try:
        import openvino

        openvino_devices = ", ".join(openvino.Core().available_devices)
    except ImportError:
        openvino_devices = 'not installed (pip install "cfdeploy[openvino]")'
    return {
        "cpu": machine["cpu"],
        "cores": f"{physical_cores()} physical, {machine['logical_cpus']} logical",
        "cpu features": " ".join(name for name in DECIDING_FEATURES if name in features) or "none of note",
        "bf16": bf16_missing(features) or "native (AMX or AVX-512 BF16): --backend openvino --precision bf16",
        "runtimes": ", ".join(f"{package} {version}" for package, version in runtimes().items()),
        "onnxruntime providers": ", ".join(onnxruntime.get_available_providers()),
        "openvino devices": openvino_devices,
        "edit --bundle runs on": default_bundle_backend(features, None),
    }


def inspect_file(path: Path) -> dict[str, Any]:
    """A flat description of a checkpoint (CF-CLIP, StyleGAN2, e4e), CLIP weights file, or latent/embedding array."""
    if path.is_dir():
        return _describe_bundle(path)
    require_file(path)
    if path.suffix == ".npy":
        return _describe_array(read_npy(path))
    try:
        import torch

        from cfdeploy.checkpoints import load_cfclip, load_clip, load_e4e, load_stylegan2
        from cfdeploy.torchfiles import is_torchscript_archive, safe_torch_load
    except ModuleNotFoundError as missing:
        raise missing_extra(missing.name or "torch", f"inspecting {path}") from None

    if path.suffix == ".safetensors":
        return _describe_clip(load_clip(path), "safetensors state dict")
    if path.suffix not in TORCH_SUFFIXES and not zipfile.is_zipfile(path):
        raise CfdeployError(
            f"{path}: not a file cfdeploy knows (expected a bundle directory, a .npy array, a torch "
            f"checkpoint {'/'.join(TORCH_SUFFIXES)} or .safetensors CLIP weights)"
        )
    if is_torchscript_archive(path):
        return _describe_clip(load_clip(path), "TorchScript archive (OpenAI)")
    content = safe_torch_load(path)
    if isinstance(content, torch.Tensor):
        return _describe_array(content.numpy())
    state = content.get("state_dict") if isinstance(content, dict) else None
    if isinstance(state, dict) and any(str(key).startswith("encoder.") for key in state):
        e4e = load_e4e(path)
        return {
            "kind": "e4e encoder checkpoint",
            "resolution": e4e.generator.config.size,
            "n_latent": e4e.n_latent,
            "dataset_type": e4e.opts.get("dataset_type"),
            "start_from_latent_avg": bool(e4e.opts.get("start_from_latent_avg", False)),
            "parameters": {"encoder": _parameters(e4e.encoder), "generator": _parameters(e4e.generator)},
        }
    if isinstance(state, dict) and any(str(key).startswith("decoder.") for key in state):
        checkpoint = load_cfclip(path)
        return {
            "kind": "CF-CLIP checkpoint",
            "resolution": checkpoint.size,
            "n_latent": checkpoint.n_latent,
            "trained_description": checkpoint.description,
            "source_text": checkpoint.source_text,
            "w_space": bool(checkpoint.opts.get("w_space", False)),
            "mapper_groups": list(checkpoint.mapper_config.groups),
            "parameters": {
                "generator": _parameters(checkpoint.generator),
                "mapper": _parameters(checkpoint.mapper),
                "text_mapper": _parameters(checkpoint.text_mapper),
            },
        }
    if isinstance(content, dict) and "g_ema" in content:
        stylegan = load_stylegan2(path)
        return {
            "kind": "StyleGAN2 checkpoint (rosinality)",
            "resolution": stylegan.generator.config.size,
            "n_latent": stylegan.generator.config.n_latent,
            "latent_avg": stylegan.latent_avg is not None,
            "training_state": sorted(str(key) for key in content if key not in ("g_ema", "latent_avg")),
            "parameters": {"generator": _parameters(stylegan.generator)},
        }
    if isinstance(content, dict) and ("token_embedding.weight" in content or "state_dict" in content):
        return _describe_clip(load_clip(path), "state dict")
    raise CfdeployError(f"{path}: not a CF-CLIP, StyleGAN2, e4e or CLIP file cfdeploy knows")


def _describe_bundle(path: Path) -> dict[str, Any]:
    from cfdeploy.bundle import MANIFEST, Bundle
    from cfdeploy.dac.bundle import BUNDLE_FORMAT

    if _manifest_format(path / MANIFEST) == BUNDLE_FORMAT:
        return _describe_dac_bundle(path)
    bundle = Bundle(path)
    manifest = bundle.manifest
    return {
        "kind": "cfdeploy bundle",
        "manifest_sha256": bundle.manifest_sha256,
        "format_version": manifest["format_version"],
        "resolution": bundle.size,
        "n_latent": bundle.n_latent,
        "trained_description": bundle.description,
        "networks": list(manifest["networks"]),
        "worst_parity_rel_l2": max(
            (
                result["rel_l2"]
                for network in manifest["networks"].values()
                for result in network.get("parity", {}).values()
            ),
            default=None,
        ),
        "precomputed_prompts": list(manifest.get("prompts", {})),
        "refits": len(manifest.get("refits", [])),
        "tensorrt_engines": _describe_engines(bundle),
        "created": manifest.get("created"),
        "exported_with": manifest.get("versions", {}),
    }


def _manifest_format(manifest: Path) -> Any:
    """The ``format`` a bundle manifest declares (None where it cannot be read: the bundle's own check says why)."""
    try:
        return read_json_object(manifest, "a bundle manifest", MAX_MANIFEST_BYTES).get("format")
    except CfdeployError:
        return None


def _describe_dac_bundle(path: Path) -> dict[str, Any]:
    from cfdeploy.dac.bundle import DacBundle

    bundle = DacBundle(path)
    manifest = bundle.manifest
    recorded = manifest.get("parity")
    parity: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    return {
        "kind": "cfdeploy DAC bundle",
        "manifest_sha256": bundle.manifest_sha256,
        "format_version": manifest["format_version"],
        "target": bundle.settings.target,
        "source_description": bundle.settings.prompt,
        "resolution": bundle.settings.resolution,
        "unet": bundle.unet_mode,
        "networks": list(manifest.get("networks", {})),
        "worst_parity_rel_l2": max(
            (
                entry["rel_l2"]
                for entry in parity.values()
                if isinstance(entry, dict) and isinstance(entry.get("rel_l2"), (int, float))
            ),
            default=None,
        ),
        "exported_with": manifest.get("versions", {}),
    }


def _describe_engines(bundle: Any) -> dict[str, str]:
    """What each stored TensorRT engine was built for, and whether the bundle's graph has changed since."""
    from cfdeploy.trt.plan import BatchProfile, engine_paths, read_key

    described = {}
    for network in bundle.manifest["networks"]:
        key = read_key(engine_paths(bundle.engine_dir, network)[1])
        if key is None:
            continue
        stale = "" if key.onnx_sha256 == bundle.network_sha256(network) else "; stale: the graph changed since"
        described[network] = (
            f"{key.precision}, {BatchProfile(*key.profile).label()}, TensorRT {key.tensorrt_version}, "
            f"{key.gpu_name} (compute {key.compute_capability}){stale}"
        )
    return described


def _describe_clip(clip: Any, file_format: str) -> dict[str, Any]:
    from cfdeploy.models.clip_text import CLIP_ARCHITECTURE, is_text_tower_key

    text_parameters = sum(value.numel() for key, value in clip.clip.state_dict().items() if is_text_tower_key(key))
    return {
        "kind": "CLIP weights",
        "architecture": CLIP_ARCHITECTURE,
        "format": file_format,
        "visual_weights": clip.has_visual_weights,
        "parameters": {"text_tower": text_parameters},
    }
