"""What an engine is built for, decided without TensorRT: precision, batch profile and the cache key.

An engine is only valid for the exact ONNX graph, TensorRT version, GPU model, precision and batch
profile it was built with, so each engine carries an :class:`EngineKey` beside it, and a runtime or
builder that wants a different key refuses the engine with a line naming what differs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cfdeploy.contracts import NetworkContract
from cfdeploy.errors import CfdeployError

PRECISIONS = ("fp32", "fp16", "mixed")
TIMING_CACHE = "timing.cache"
KEY_FORMAT = "cfdeploy-engine-key/1"
# Layers that carry nearly all the FLOPs; in a "mixed" engine only these may run in fp16.
HEAVY_LAYER_KINDS = frozenset({"CONVOLUTION", "DECONVOLUTION", "MATRIX_MULTIPLY"})
RGB_CHANNELS = 3
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine accepts; ``min == max`` makes a static engine (CUDA-graph capable)."""

    min: int
    opt: int
    max: int

    @property
    def static(self) -> bool:
        return self.min == self.max

    def label(self) -> str:
        return f"static batch {self.min}" if self.static else f"batch {self.min}..{self.max} (opt {self.opt})"


def batch_profile(
    min_batch: int = 1, opt_batch: int | None = None, max_batch: int = 8, static_batch: int | None = None
) -> BatchProfile:
    """The profile from ``--min/--opt/--max-batch`` or ``--static-batch``, checked for consistency."""
    if static_batch is not None:
        if static_batch < 1:
            raise CfdeployError(f"--static-batch must be 1 or more, got {static_batch}")
        return BatchProfile(static_batch, static_batch, static_batch)
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= min_batch <= opt <= max_batch:
        raise CfdeployError(
            f"batch profile needs 1 <= --min-batch <= --opt-batch <= --max-batch, got {min_batch}, {opt}, {max_batch}"
        )
    return BatchProfile(min_batch, opt, max_batch)


def batch_chunks(batch: int, profile: BatchProfile) -> list[tuple[int, int, int]]:
    """Split a batch into ``(start, stop, run_batch)`` calls the profile accepts; short calls are padded."""
    chunks = []
    for start in range(0, batch, profile.max):
        stop = min(batch, start + profile.max)
        chunks.append((start, stop, max(stop - start, profile.min)))
    return chunks


def pad_batch(array: np.ndarray, run_batch: int) -> np.ndarray:
    """``array`` with its last row repeated up to ``run_batch`` rows (what a profile's minimum needs)."""
    missing = run_batch - array.shape[0]
    return array if missing <= 0 else np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])


def network_precision(contract: NetworkContract, requested: str | None) -> str:
    """The precision a network's engine is built in: the contract's default, or ``--precision``.

    ``--precision`` applies to the networks whose contract allows reduced precision (CLIP text and the
    generator); the mappers and the mapping network stay fp32, because PixelNorm turns the small
    values they carry into inf/NaN in fp16.
    """
    if requested is None:
        return contract.precision
    if requested not in PRECISIONS:
        raise CfdeployError(f"unknown precision {requested!r} (expected {', '.join(PRECISIONS)})")
    return requested if contract.precision != "fp32" else "fp32"


def keeps_fp32(precision: str, layer_kind: str, output_channels: int | None) -> bool:
    """Whether a layer is pinned to fp32 in an engine of ``precision``.

    "mixed" runs only the heavy convolutions and matrix products in fp16; normalisation, style and
    demodulation arithmetic, and the layers that produce RGB (ToRGB and its skip upsampling) stay fp32.
    """
    if precision != "mixed":
        return False
    return layer_kind not in HEAVY_LAYER_KINDS or output_channels == RGB_CHANNELS


def parse_bytes(text: str) -> int:
    """``"2GiB"``, ``"512M"``, ``"1073741824"`` → bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise CfdeployError(f"--workspace {text!r}: expected a size such as 512MiB or 2GiB")
    unit = (match.group(2) or "").upper().replace("I", "").replace("B", "") or ""
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1 << 20:
        raise CfdeployError(f"--workspace {text!r}: at least 1MiB is needed")
    return value


@dataclass(frozen=True)
class BuildSettings:
    """What ``cfdeploy build-engines`` was asked for."""

    profile: BatchProfile
    precision: str | None = None  # None: each contract's default
    workspace_bytes: int | None = None
    networks: Sequence[str] | None = None  # None: every network in the bundle
    rebuild: bool = False
    engine_dir: Path | None = None  # None: BUNDLE/tensorrt


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine's validity depends on; stored as JSON beside the engine."""

    network: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: tuple[int, int, int]
    refittable: bool

    def as_dict(self) -> dict[str, Any]:
        return {"format": KEY_FORMAT, **asdict(self), "profile": list(self.profile)}

    @classmethod
    def from_dict(cls, content: dict[str, Any], source: Path) -> EngineKey:
        if not isinstance(content, dict) or content.get("format") != KEY_FORMAT:
            raise CfdeployError(f"{source}: not a cfdeploy engine key (expected format {KEY_FORMAT})")
        try:
            return cls(
                network=str(content["network"]),
                onnx_sha256=str(content["onnx_sha256"]),
                tensorrt_version=str(content["tensorrt_version"]),
                gpu_name=str(content["gpu_name"]),
                compute_capability=str(content["compute_capability"]),
                precision=str(content["precision"]),
                profile=(int(content["profile"][0]), int(content["profile"][1]), int(content["profile"][2])),
                refittable=bool(content["refittable"]),
            )
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise CfdeployError(f"{source}: engine key is incomplete ({type(error).__name__}: {error})") from None


_FIELD_WORDS = {
    "network": "network",
    "onnx_sha256": "ONNX graph sha256",
    "tensorrt_version": "TensorRT version",
    "gpu_name": "GPU",
    "compute_capability": "compute capability",
    "precision": "precision",
    "profile": "batch profile (min, opt, max)",
    "refittable": "refittable",
}


def key_mismatches(found: EngineKey, wanted: EngineKey) -> list[str]:
    """Each field that differs, as "what: engine has X, wanted Y"."""
    problems = []
    for name, words in _FIELD_WORDS.items():
        have, want = getattr(found, name), getattr(wanted, name)
        if have != want:
            if name == "onnx_sha256":
                have, want = f"{have[:12]}…", f"{want[:12]}…"
            problems.append(f"{words}: engine has {have}, wanted {want}")
    return problems


def engine_paths(engine_dir: Path, network: str) -> tuple[Path, Path]:
    """The serialized engine and its key file."""
    return engine_dir / f"{network}.engine", engine_dir / f"{network}.key.json"


def read_key(key_path: Path) -> EngineKey | None:
    if not key_path.is_file():
        return None
    try:
        content = json.loads(key_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CfdeployError(f"{key_path}: not valid JSON: {error}") from None
    return EngineKey.from_dict(content, key_path)


def check_engine(engine_dir: Path, wanted: EngineKey) -> Path:
    """The engine file for ``wanted``, or a one-line refusal naming what is missing or differs."""
    engine_path, key_path = engine_paths(engine_dir, wanted.network)
    if not engine_path.is_file():
        raise CfdeployError(f"{engine_path}: no engine for {wanted.network} (build it with cfdeploy build-engines)")
    found = read_key(key_path)
    if found is None:
        raise CfdeployError(f"{key_path}: missing, so {engine_path.name} cannot be checked (rebuild with --rebuild)")
    _refuse_mismatch(engine_path, found, wanted)
    return engine_path


def _refuse_mismatch(engine_path: Path, found: EngineKey, wanted: EngineKey) -> None:
    problems = key_mismatches(found, wanted)
    if problems:
        raise CfdeployError(f"{engine_path}: built for something else: {'; '.join(problems)} (rebuild with --rebuild)")


def check_runnable(
    engine_dir: Path, network: str, onnx_sha256: str, tensorrt_version: str, gpu: tuple[str, str]
) -> EngineKey:
    """At run time any precision and profile will do, but not another graph, TensorRT or GPU; returns the key."""
    engine_path, key_path = engine_paths(engine_dir, network)
    found = read_key(key_path) if engine_path.is_file() else None
    if found is None:
        raise CfdeployError(
            f"{engine_path}: no engine (with its key) for {network}; build it with cfdeploy build-engines"
        )
    wanted = replace(
        found, onnx_sha256=onnx_sha256, tensorrt_version=tensorrt_version, gpu_name=gpu[0], compute_capability=gpu[1]
    )
    _refuse_mismatch(engine_path, found, wanted)
    return found


def plan_builds(engine_dir: Path, wanted: list[EngineKey], rebuild: bool) -> list[EngineKey]:
    """The engines to build: all of ``wanted`` except up-to-date ones.

    Decided for every network before anything is built, so a mismatch is refused at once rather than
    after minutes of building; with ``rebuild``, mismatched and unreadable keys are simply rebuilt.
    """
    to_build, refused = [], []
    for key in wanted:
        engine_path, key_path = engine_paths(engine_dir, key.network)
        if not engine_path.is_file():
            to_build.append(key)
            continue
        try:
            existing = read_key(key_path)
        except CfdeployError:
            if not rebuild:
                raise
            existing = None
        problems = key_mismatches(existing, key) if existing is not None else ["no key file"]
        if not problems:
            continue
        if not rebuild:
            refused.append(f"{engine_path.name}: {'; '.join(problems)}")
        to_build.append(key)
    if refused:
        raise CfdeployError(f"{engine_dir}: engines exist for something else: {' | '.join(refused)} (use --rebuild)")
    return to_build
