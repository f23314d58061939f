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

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from cfdeploy.bundle_files import leads_outside
from cfdeploy.errors import CfdeployError, require_finite, require_range
from cfdeploy.files import read_json_object, read_tensors

MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint.pt"
UNET_LORA = "unet_lora.safetensors"
TEXT_LORA = "text_lora.safetensors"
SOURCE_TEXT_LORA = "source_text_lora.safetensors"
EDIT_EMBEDDINGS = "edit_embeddings.safetensors"
FORMAT = "cfdeploy-dac-run"
FORMAT_VERSION = 1
VARIANTS = ("plain", "t")
DESCRIBED_SETTINGS = ("prompt", "target", "eta", "resolution", "variant")  # what edit.json repeats of a run
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float)}


@dataclass(frozen=True)
class AbductSettings:
    """The official hyper-parameters by default (DAC's scripts): 1000 + 1000 steps, ranks 512 and 4, η 0.8, lr 1e-4."""

    prompt: str
    target: str
    unet_steps: int = 1000
    text_steps: int = 1000
    rank: int = 512
    text_rank: int = 4
    eta: float = 0.8
    lr: float = 1e-4
    seed: int = 42
    resolution: int = 512
    variant: str = "plain"
    save_every: int = 250

    def __post_init__(self) -> None:
        require_range(
            1,
            None,
            unet_steps=self.unet_steps,
            text_steps=self.text_steps,
            rank=self.rank,
            text_rank=self.text_rank,
            save_every=self.save_every,
        )
        require_range(0, 2**63 - 1, seed=self.seed)
        require_range(8, 4096, resolution=self.resolution)
        require_finite(eta=self.eta, lr=self.lr)
        if not 0.0 <= self.eta <= 1.0:
            raise CfdeployError(f"--eta must be from 0 to 1 (the paper uses 0.4 to 0.8), got {self.eta}")
        if self.lr <= 0:
            raise CfdeployError(f"--lr must be positive, got {self.lr}")
        if self.variant not in VARIANTS:
            raise CfdeployError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for option, text in (("--source-text", self.prompt), ("--text", self.target)):
            if not text.strip():
                raise CfdeployError(f"{option} is empty")

    @classmethod
    def from_manifest(cls, recorded: Any, source: Path) -> AbductSettings:
        """The settings a manifest records, checked for type and range as the CLI checks them."""
        if not isinstance(recorded, dict):
            raise CfdeployError(f"{source}: 'settings' is not a table")
        values: dict[str, Any] = {}
        for setting in fields(cls):
            value = recorded.get(setting.name)
            if isinstance(value, bool) or not isinstance(value, _FIELD_TYPES[str(setting.type)]):
                raise CfdeployError(f"{source}: settings.{setting.name} is {value!r}, expected a {setting.type}")
            values[setting.name] = value
        try:
            return cls(**values)
        except CfdeployError as error:
            raise CfdeployError(f"{source}: recorded settings refused: {error}") from None


@dataclass(frozen=True)
class DacRun:
    """A complete run directory and its manifest."""

    path: Path
    manifest: dict[str, Any]
    settings: AbductSettings

    def file(self, name: str) -> Path:
        """One of the run's files; a symbolic link leading out of the run is refused, as in a bundle."""
        path = self.path / name
        if path.is_symlink() and leads_outside(path, self.path):
            raise CfdeployError(f"{path}: a symbolic link leading out of the DAC run (to {os.readlink(path)})")
        if not path.is_file():
            raise CfdeployError(f"{path}: missing from the DAC run")
        return path


def read_edit_embeddings(run: DacRun, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(cond, uncond) at β = 1 as abduct stored them, each checked to be of ``shape``."""
    path = run.file(EDIT_EMBEDDINGS)
    stored, _ = read_tensors(path)
    for key in ("cond", "uncond"):
        found = stored[key].shape if key in stored else None
        if found != shape:
            raise CfdeployError(
                f"{path}: expected {key!r} of shape {shape}, found {'nothing' if found is None else found}"
            )
    return stored["cond"], stored["uncond"]


def require_manifest(path: Path, expected: str) -> Path:
    """``path``'s manifest.json; a directory without one is refused saying whether it is an unfinished run."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CfdeployError(f"{path}: not a directory (expected {expected})")
    if not manifest_path.is_file():
        unfinished = (path / CHECKPOINT).is_file()
        reason = (
            "an unfinished run: continue it with `cfdeploy dac abduct ... --resume`"
            if unfinished
            else f"not {expected}"
        )
        raise CfdeployError(f"{path}: no {MANIFEST}, {reason}")
    return manifest_path


def read_run(path: Path) -> DacRun:
    """The complete run at ``path``; an unfinished or foreign directory is refused in one line."""
    manifest_path = require_manifest(path, "a DAC run")
    manifest = read_json_object(manifest_path, "a DAC run manifest")
    if manifest.get("format") != FORMAT:
        raise CfdeployError(f"{manifest_path}: not a cfdeploy DAC run manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CfdeployError(
            f"{manifest_path}: format version {manifest.get('format_version')}, this cfdeploy reads {FORMAT_VERSION}"
        )
    if not isinstance(manifest.get("base_model"), dict) or not isinstance(manifest.get("image_sha256"), str):
        raise CfdeployError(f"{manifest_path}: damaged (expected a 'base_model' table and an 'image_sha256' string)")
    return DacRun(path, manifest, AbductSettings.from_manifest(manifest.get("settings"), manifest_path))
