"""Reading and validating input files (numpy at the boundary; torch only for .pt latents).

Every reader here and in :mod:`cfdeploy.checkpoints` starts with :func:`require_file` (a FIFO or a
device would block or never end) and checks the sizes a file declares against the bytes it holds before
allocating anything.
"""

from __future__ import annotations

import io
import json
import math
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from cfdeploy.errors import CfdeployError

NON_REGULAR_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def require_file(path: Path) -> Path:
    """``path`` if it is a regular file (symlinks followed); anything else is refused before it is opened."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CfdeployError(f"{path}: no such file") from None
    except OSError as error:
        raise CfdeployError(f"{path}: cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in NON_REGULAR_KINDS if is_kind(mode)), "of an unknown kind")
        raise CfdeployError(f"{path}: not a regular file ({kind})")
    return path


def read_json_object(path: Path, what: str, limit: int = 4 << 20) -> dict[str, Any]:
    """The JSON object in ``path`` (at most ``limit`` bytes); anything else is one line saying what ``what`` needed."""
    require_file(path)
    if path.stat().st_size > limit:
        raise CfdeployError(f"{path}: {path.stat().st_size:,} bytes, too large for {what}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CfdeployError(f"{path}: not JSON ({error}); expected {what}") from None
    if not isinstance(content, dict):
        raise CfdeployError(f"{path}: expected {what} (a JSON object), found {type(content).__name__}")
    return content


@contextmanager
def memory_guard(path: Path) -> Iterator[None]:
    """Turn a MemoryError while reading ``path`` into one line naming it."""
    try:
        yield
    except MemoryError:
        raise CfdeployError(f"{path}: reading it needs more memory than this machine has") from None


def read_npy(path: Path, what: str = "array") -> np.ndarray:
    """A numeric ``.npy`` array; its header's shape × dtype is checked against the file size before allocating."""
    require_file(path)
    with memory_guard(path), path.open("rb") as file:
        return _read_npy_stream(file, path.stat().st_size, str(path), what)


def npy_from_bytes(content: bytes, source: str, what: str = "array") -> np.ndarray:
    """:func:`read_npy` for ``.npy`` bytes that came over the network (``source`` names them in errors)."""
    return _read_npy_stream(io.BytesIO(content), len(content), source, what)


def _read_npy_stream(file: BinaryIO, size: int, source: str, what: str) -> np.ndarray:
    try:
        version = np.lib.format.read_magic(file)
        read_header = NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise CfdeployError(f"{source}: .npy format version {version[0]}.{version[1]} is not read (1.0 and 2.0 are)")
        shape, _, dtype = read_header(file)
        if dtype.hasobject:
            raise CfdeployError(f"{source}: the .npy {what} holds Python objects (pickled), which are never loaded")
        declared = math.prod(shape) * dtype.itemsize
        held = size - file.tell()
        if declared > held:
            raise CfdeployError(
                f"{source}: the .npy header declares {what} {list(shape)} {dtype} ({declared:,} bytes) "
                f"but the file holds {held:,} bytes of data"
            )
        file.seek(0)
        return np.lib.format.read_array(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CfdeployError(f"{source}: not a readable .npy {what}: {error}") from None


def _read_array(path: Path, what: str) -> np.ndarray:
    if path.suffix == ".npy":
        return read_npy(path, what)
    try:
        from cfdeploy.checkpoints import safe_torch_load
    except ImportError:
        raise CfdeployError(f"{path}: reading torch-saved {what} needs the 'export' extra; save it as .npy") from None
    content = safe_torch_load(path)
    import torch

    if not isinstance(content, torch.Tensor):
        raise CfdeployError(f"{path}: expected a tensor of {what}, found a {type(content).__name__}")
    return content.detach().float().cpu().numpy()


def require_finite_array(array: np.ndarray, source: object, what: str) -> None:
    """Floating-point values with no NaN or inf, or one line naming ``source``."""
    if not np.issubdtype(array.dtype, np.floating):
        raise CfdeployError(f"{source}: expected floating-point {what}, found dtype {array.dtype}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise CfdeployError(f"{source}: {what} contain {int(bad.sum())} NaN/inf values")


def broadcast_latents(latents: np.ndarray, n_latent: int, style_dim: int, source: str) -> np.ndarray:
    """W+ ``[N, n, dim]`` as is; W ``[N, dim]`` repeated to every level."""
    if latents.ndim not in (2, 3) or latents.shape[-1] != style_dim:
        raise CfdeployError(
            f"{source}: expected latents [N,{n_latent},{style_dim}] (W+) or [N,{style_dim}] (W), "
            f"found {list(latents.shape)}"
        )
    if latents.ndim == 3 and latents.shape[1] != n_latent:
        raise CfdeployError(
            f"{source}: latents have {latents.shape[1]} levels, the generator needs {n_latent} "
            f"(shape {list(latents.shape)})"
        )
    if latents.shape[0] == 0:
        raise CfdeployError(f"{source}: latents are empty (shape {list(latents.shape)})")
    if latents.ndim == 2:
        latents = np.repeat(latents[:, None, :], n_latent, axis=1)
    return np.ascontiguousarray(latents, dtype=np.float32)


def load_latents(path: Path, n_latent: int, style_dim: int = 512) -> np.ndarray:
    """Latent codes from ``.npy`` or a torch-saved tensor, as float32 W+ ``[N, n_latent, dim]``."""
    latents = _read_array(path, "latents")
    require_finite_array(latents, path, "latents")
    return broadcast_latents(latents, n_latent, style_dim, str(path))


def load_text_embedding(path: Path, n_latents: int, dim: int = 512) -> np.ndarray:
    """Unnormalised CLIP text features ``[dim]`` or ``[1|N, dim]``, as float32 ``[1|N, dim]``."""
    return check_text_embedding(_read_array(path, "text features"), n_latents, dim, str(path))


def check_text_embedding(features: np.ndarray, n_latents: int, dim: int, source: str) -> np.ndarray:
    """Finite text features ``[dim]`` or ``[1|N, dim]`` as float32 ``[1|N, dim]``, or one line naming ``source``."""
    require_finite_array(features, source, "text features")
    if features.ndim == 1:
        features = features[None, :]
    if features.ndim != 2 or features.shape[1] != dim:
        raise CfdeployError(f"{source}: expected text features [{dim}] or [N,{dim}], found {list(features.shape)}")
    if features.shape[0] not in (1, n_latents):
        raise CfdeployError(
            f"{source}: {features.shape[0]} text embeddings match neither 1 (one prompt for all) "
            f"nor the {n_latents} latents"
        )
    return np.ascontiguousarray(features, dtype=np.float32)


def seeded_z(seed: int, count: int, style_dim: int = 512) -> np.ndarray:
    """Gaussian z for ``--seed/--num``, from numpy so every backend draws the same codes."""
    return np.random.default_rng(seed).standard_normal((count, style_dim)).astype(np.float32)
