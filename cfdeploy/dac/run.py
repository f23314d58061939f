"""A DAC run directory: what ``dac abduct`` writes and ``dac edit`` / ``dac export`` read.

    RUN/unet_lora.safetensors        U, the image's UNet LoRA (PEFT state dict)
    RUN/text_lora.safetensors        Δ, the text-encoder LoRA fitted on (I, P′)
    RUN/source_text_lora.safetensors T, variant ``t`` only
    RUN/edit_embeddings.safetensors  cond and uncond embeddings with Δ at −1 (what prediction needs)
    RUN/manifest.json                base model identity, prompts, settings, losses, versions
    RUN/checkpoint.pt                while a run is unfinished: its last save, for --resume

A run is complete when ``manifest.json`` exists; it is written last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfdeploy.errors import CfdeployError
from cfdeploy.inputs import read_json_object

MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint.pt"
UNET_LORA = "unet_lora.safetensors"
TEXT_LORA = "text_lora.safetensors"
SOURCE_TEXT_LORA = "source_text_lora.safetensors"
EDIT_EMBEDDINGS = "edit_embeddings.safetensors"
FORMAT = "cfdeploy-dac-run"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DacRun:
    """A complete run directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.manifest["settings"])

    @property
    def variant(self) -> str:
        return str(self.manifest["settings"]["variant"])

    def file(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise CfdeployError(f"{path}: missing from the DAC run")
        return path


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("cfdeploy", "numpy", "onnxruntime", "torch", "diffusers", "transformers", "peft"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def require_manifest(path: Path, expected: str) -> Path:
    """``path``'s manifest.json; a directory without one is refused saying whether it is an unfinished run."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CfdeployError(f"{path}: not a directory (expected {expected})")
    if not manifest_path.is_file():
        unfinished = (path / CHECKPOINT).is_file()
        reason = "an unfinished run: continue it with `cfdeploy dac abduct ... --resume`" if unfinished else f"not {expected}"
        raise CfdeployError(f"{path}: no {MANIFEST}, {reason}")
    return manifest_path


def read_run(path: Path) -> DacRun:
    """The complete run at ``path``; an unfinished or foreign directory is refused in one line."""
    manifest_path = require_manifest(path, "a DAC run")
    manifest = read_json_object(manifest_path, "a DAC run manifest")
    if manifest.get("format") != FORMAT:
        raise CfdeployError(f"{manifest_path}: not a cfdeploy DAC run manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CfdeployError(f"{manifest_path}: format version {manifest.get('format_version')}, this cfdeploy reads {FORMAT_VERSION}")
    for key in ("settings", "base_model", "image_sha256"):
        if key not in manifest:
            raise CfdeployError(f"{manifest_path}: no {key!r}")
    return DacRun(path, manifest)
