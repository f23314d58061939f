"""Backends run the stages of an edit on one runtime each; this is their one registry and factory.

The CLI, ``cfdeploy bench``, refit and the Python API all open backends here::

    backend = open_backend("onnxruntime", Path("engines/green_lipstick"))
    backend = open_backend("torch", Path("green_lipstick.pt"), clip_weights=Path("ViT-B-32.pt"), device="cuda")

A backend reads either a CF-CLIP checkpoint (torch runtimes) or an exported bundle (ONNX Runtime,
TensorRT). Its module is imported only when it is opened, so a core install (no torch) can open the
bundle backends, and a missing runtime is one line saying what to install. Over bundles, ONNX Runtime and
OpenVINO run the same graphs on the CPU; :func:`default_bundle_backend` picks between them.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfdeploy.errors import CfdeployError, missing_extra

if TYPE_CHECKING:
    from cfdeploy.editing import EditBackend


@dataclass(frozen=True)
class BackendInfo:
    """What a runtime reads, where it runs, which precisions it offers and which options it takes."""

    name: str
    source: str  # "checkpoint" (a CF-CLIP .pt) or "bundle" (a directory from `cfdeploy export`)
    implementation: str  # "module:Class", imported on first use
    devices: tuple[str, ...]
    precisions: tuple[str, ...]  # fp32 first: the default
    requires: str  # the package that must be importable
    options: tuple[str, ...]  # keyword options of the class's opener
    summary: str


BUNDLE_OPTIONS = ("cache_max", "expect_manifest")
BACKENDS: dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo(
            "torch",
            "checkpoint",
            "cfdeploy.backends.torch_backend:TorchBackend",
            ("cpu", "cuda"),
            ("fp32", "fp16", "bf16"),
            "torch",
            ("clip_weights", "device", "precision", "cuda_graphs", "encoder", "compile", "identity_weights"),
            "the exact PyTorch models; reduced precision is for the generator only",
        ),
        BackendInfo(
            "torch-reference",
            "checkpoint",
            "cfdeploy.backends.reference_backend:TorchReferenceBackend",
            ("cpu", "cuda"),
            ("fp32",),
            "torch",
            ("clip_weights", "device", "encoder", "identity_weights"),
            "the official formulation (grouped conv, upfirdn2d): the baseline users migrate from",
        ),
        BackendInfo(
            "onnxruntime",
            "bundle",
            "cfdeploy.backends.onnxruntime_backend:OnnxRuntimeBackend",
            ("cpu", "cuda"),
            ("fp32",),
            "onnxruntime",
            ("device", "providers", "threads", "session_cache", *BUNDLE_OPTIONS),
            "the bundle's ONNX graphs, torch-free; CUDA and TensorRT through onnxruntime-gpu's providers",
        ),
        BackendInfo(
            "openvino",
            "bundle",
            "cfdeploy.backends.openvino_backend:OpenVinoBackend",
            ("cpu", "gpu", "npu"),
            ("fp32", "bf16"),
            "openvino",
            ("device", "threads", "precision", "session_cache", *BUNDLE_OPTIONS),
            "the bundle's ONNX graphs on OpenVINO, torch-free; bf16 on CPUs with AMX or AVX-512 BF16 "
            "(GPU and NPU untested)",
        ),
        BackendInfo(
            "tensorrt",
            "bundle",
            "cfdeploy.backends.tensorrt_backend:TensorRTBackend",
            ("cuda",),
            ("fp32", "fp16", "mixed"),
            "tensorrt",
            ("device", "engines", "cuda_graphs", *BUNDLE_OPTIONS),
            "engines from `cfdeploy build-engines` on one CUDA stream, torch-free",
        ),
    )
}


@dataclass(frozen=True)
class Preset:
    """A backend with fixed options, under one name: what ``cfdeploy bench`` compares."""

    name: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("torch-reference", "torch-reference"),
        Preset("torch", "torch"),
        Preset("torch-bf16", "torch", {"precision": "bf16"}),
        Preset("torch-cuda", "torch", {"device": "cuda"}),
        Preset("torch-cuda-fp16", "torch", {"device": "cuda", "precision": "fp16", "cuda_graphs": True}),
        Preset("torch-cuda-compile", "torch", {"device": "cuda", "precision": "fp16", "compile": True}),
        Preset("onnxruntime", "onnxruntime", {"device": "cpu"}),
        Preset(
            "onnxruntime-cuda",
            "onnxruntime",
            {"device": "cuda", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
        ),
        Preset(
            "onnxruntime-tensorrt",
            "onnxruntime",
            {
                "device": "cuda",
                "providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            },
        ),
        Preset("openvino", "openvino", {"device": "cpu"}),
        Preset("openvino-bf16", "openvino", {"device": "cpu", "precision": "bf16"}),
        Preset("tensorrt", "tensorrt"),
    )
}


# CPU features under which OpenVINO's fp32 convolutions are clearly faster than ONNX Runtime's (1.3x for the 1024 px
# generator on Intel Xeons with AMX and AVX-512). On an AVX2-only AMD EPYC they measured 1.0-1.18x, too close to
# switch: ONNX Runtime stays the default there (benchmarks/results/openvino.json).
OPENVINO_FASTER_FEATURES = ("avx512f", "amx_tile")


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules as None: imports of it fail
        return False


def default_bundle_backend(
    features: frozenset[str], device: str | None, is_installed: Callable[[str], bool] = installed
) -> str:
    """The fastest exact backend installed for a bundle: ``openvino`` on the CPU where the CPU has AVX-512 or AMX
    and OpenVINO is installed, else ``onnxruntime``. Both are exact (fp32, within rel-L2 1e-5 of each other)."""
    on_cpu = device in (None, "cpu")
    fast_cpu = any(feature in features for feature in OPENVINO_FASTER_FEATURES)
    return "openvino" if on_cpu and fast_cpu and is_installed("openvino") else "onnxruntime"


def backend_info(name: str) -> BackendInfo:
    info = BACKENDS.get(name)
    if info is None:
        raise CfdeployError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    return info


def backend_class(info: BackendInfo) -> Any:
    """Import the backend's module; a missing runtime is one line naming what to install."""
    module_name, class_name = info.implementation.split(":")
    try:
        importlib.import_module(info.requires)
    except (ImportError, OSError) as missing:
        raise missing_extra(info.requires, f"the {info.name} backend", missing) from None
    return getattr(importlib.import_module(module_name), class_name)


def open_backend(name: str, source: Path, **options: Any) -> EditBackend:
    """Open backend ``name`` over ``source`` (a checkpoint or a bundle, as the backend reads).

    Args:
        name: a key of :data:`BACKENDS`.
        source: the CF-CLIP checkpoint file (torch backends) or the bundle directory (the others).
        **options: the backend's options (:attr:`BackendInfo.options`); ``None`` means the default.

    Returns:
        An :class:`~cfdeploy.editing.EditBackend`.

    Raises:
        CfdeployError: an unknown backend, an option it does not take, its runtime not installed,
            or a bad source or option value (checked by the backend itself).
    """
    info = backend_info(name)
    given = {key: value for key, value in options.items() if value is not None}
    foreign = [key for key in given if key not in info.options]
    if foreign:
        flags = ", ".join("--" + key.replace("_", "-") for key in foreign)
        takes = ", ".join("--" + key.replace("_", "-") for key in info.options)
        raise CfdeployError(f"{flags}: not an option of the {name} backend (it takes {takes})")
    implementation = backend_class(info)
    if info.source == "checkpoint":
        return implementation.from_checkpoint(source, **given)  # type: ignore[no-any-return]
    return implementation.from_bundle(source, **given)  # type: ignore[no-any-return]


def open_preset(name: str, source: Path, **options: Any) -> EditBackend:
    """Open a :data:`PRESETS` entry; ``options`` add to its fixed ones (e.g. ``clip_weights``)."""
    preset = PRESETS.get(name)
    if preset is None:
        raise CfdeployError(f"unknown backend {name!r} (known: {', '.join(PRESETS)})")
    info = backend_info(preset.backend)
    accepted = {key: value for key, value in options.items() if key in info.options}
    backend = open_backend(preset.backend, source, **{**accepted, **preset.options})
    backend.name = name
    return backend
