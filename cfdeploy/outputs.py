"""Writing results safely: everything goes to a staging directory that is renamed into place at the end."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from cfdeploy.errors import CfdeployError


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Generator output ``[B, 3, S, S]`` in about [-1, 1] → ``[B, S, S, 3]`` uint8, as the official code saves."""
    unit = (np.clip(images, -1.0, 1.0) + 1.0) / 2.0
    return np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to replace a user's non-empty directory (or a file) unless ``--force`` says so."""
    if out.exists() and not out.is_dir():
        raise CfdeployError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CfdeployError(f"{out}: directory is not empty (use --force to replace it)")


class StagedDirectory:
    """A temporary sibling of ``out`` that replaces it only when the block finishes without error."""

    def __init__(self, out: Path, force: bool) -> None:
        check_output_dir(out, force)
        self.out = out
        self.force = force
        out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))

    def __enter__(self) -> "StagedDirectory":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        check_output_dir(self.out, self.force)
        if self.out.exists():
            shutil.rmtree(self.out)
        self.path.rename(self.out)

    def write_png(self, name: str, pixels: np.ndarray) -> None:
        Image.fromarray(pixels).save(self.path / name)

    def write_json(self, name: str, content: dict[str, Any]) -> None:
        (self.path / name).write_text(json.dumps(content, indent=2, default=str) + "\n")

    def create_array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 ``.npy`` filled batch by batch, so large raw outputs never sit in memory."""
        return np.lib.format.open_memmap(self.path / name, mode="w+", dtype=np.float32, shape=shape)


def write_npy_atomic(path: Path, array: np.ndarray, force: bool) -> None:
    """Write ``path`` via a temporary file and a rename; an existing file needs ``force``."""
    if path.exists() and not force:
        raise CfdeployError(f"{path}: file exists (use --force to replace it)")
    if path.is_dir():
        raise CfdeployError(f"{path}: is a directory, expected a .npy file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False) as tmp:
        partial = Path(tmp.name)
        try:
            np.save(tmp, array)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    partial.replace(path)
