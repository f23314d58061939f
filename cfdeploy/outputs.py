"""Writing results safely: everything goes to a staging directory that is renamed into place at the end."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
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
        replace_directory(self.path, self.out)

    def write_png(self, name: str, pixels: np.ndarray) -> None:
        Image.fromarray(pixels).save(self.path / name)

    def write_json(self, name: str, content: dict[str, Any]) -> None:
        (self.path / name).write_text(json.dumps(content, indent=2, default=str) + "\n")

    def create_array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 ``.npy`` filled batch by batch, so large raw outputs never sit in memory."""
        return np.lib.format.open_memmap(self.path / name, mode="w+", dtype=np.float32, shape=shape)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_directory(new: Path, out: Path) -> None:
    """Put ``new`` at ``out``: the old directory is moved aside, and moved back if the swap fails.

    ``new`` gets ``out``'s permissions (or the umask's), not the private ones of a temporary directory.
    """
    new.chmod(out.stat().st_mode & 0o7777 if out.exists() else 0o777 & ~_umask())
    if not out.exists():
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    out.rename(old / out.name)
    try:
        new.rename(out)
    except BaseException:
        (old / out.name).rename(out)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: Path, content: bytes) -> None:
    """Write ``path`` via a temporary sibling and a rename, so readers never see half a file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False) as tmp:
        partial = Path(tmp.name)
        try:
            tmp.write(content)
            tmp.flush()
            os.fsync(tmp.fileno())
            os.fchmod(tmp.fileno(), 0o666 & ~_umask())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    partial.replace(path)


class DirectoryLock:
    """An exclusive lock on a directory that is about to change (``.NAME.lock`` beside it).

    Two ``cfdeploy`` processes writing one bundle at once (building engines, refitting) would
    otherwise interleave their files; the second one waits up to ``timeout`` seconds, then fails.
    """

    def __init__(self, directory: Path, timeout: float = 600.0) -> None:
        directory = directory.resolve()
        self.path = directory.parent / f".{directory.name}.lock"
        self.timeout = timeout
        self._handle: int | None = None

    def __enter__(self) -> "DirectoryLock":
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(handle)
                    raise CfdeployError(
                        f"{self.path}: another cfdeploy process is writing this bundle; gave up after {self.timeout:g}s"
                    ) from None
                time.sleep(0.2)
        self._handle = handle
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
            self._handle = None


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
