"""Reading untrusted files without torch: regular-file checks, bounded JSON, ``.npy`` and safetensors as numpy.

Every reader starts with :func:`require_file` (a FIFO or a device would block or never end) and checks
the sizes a file declares against the bytes it holds before allocating anything. Both editors read their
inputs, runs and bundles through these functions, so a defence added here holds everywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cfdeploy.errors import CfdeployError

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
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
            raise CfdeployError(
                f"{source}: .npy format version {version[0]}.{version[1]} is not read (1.0 and 2.0 are)"
            )
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


def require_finite_array(array: np.ndarray, source: object, what: str) -> None:
    """Floating-point values that are finite in float32, the type the networks compute in (a float64 1e300 is inf
    there), or one line naming ``source``."""
    if not np.issubdtype(array.dtype, np.floating):
        raise CfdeployError(f"{source}: expected floating-point {what}, found dtype {array.dtype}")
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(array.astype(np.float32, copy=False))
    if bad.any():
        beyond = int((bad & np.isfinite(array)).sum())
        detail = f" ({beyond} beyond float32's range, ±3.4e38)" if beyond else ""
        raise CfdeployError(f"{source}: {what} contain {int(bad.sum())} NaN/inf values{detail}")


def read_regular(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file; raises ValueError saying what is wrong (callers name the file)."""
    if not path.is_file():
        raise ValueError("is not a regular file")
    with open(path, "rb") as handle:
        content = handle.read(limit + 1)
    if len(content) > limit:
        raise ValueError(f"is larger than {limit} bytes")
    return content


def npy_array(content: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A finite float32 array of exactly ``shape`` from ``.npy`` bytes; raises ValueError saying what is wrong.

    The header is checked before any data is read, so a declared shape can never size an allocation.
    """
    stream = io.BytesIO(content)
    try:
        found_shape, fortran_order, dtype = NPY_HEADER_READERS[np.lib.format.read_magic(stream)](stream)
    except (ValueError, KeyError, SyntaxError):
        raise ValueError("is not a .npy file of format 1.0 or 2.0 (or its header is malformed)") from None
    if found_shape != shape or dtype != np.dtype(np.float32):
        raise ValueError(f"holds {dtype} {list(found_shape)}, expected float32 {list(shape)}")
    data = stream.read()
    if len(data) != 4 * math.prod(shape):
        raise ValueError(f"has {len(data)} data bytes, expected {4 * math.prod(shape)} (truncated or padded)")
    array = np.frombuffer(data, np.float32).reshape(shape, order="F" if fortran_order else "C")
    if not np.isfinite(array).all():
        raise ValueError("holds NaN or infinite values")
    return np.array(array)


FileIdentity = tuple[int, int, int, int, int]
RECORD_NAME_LENGTH = 40
MAX_RECORD_BYTES = 4096
SETTLED_NS = 2_000_000_000  # a file changed more recently than this may change again within one timestamp tick
_HASHED: dict[FileIdentity, str] = {}


def file_identity(path: Path) -> FileIdentity:
    """What changes whenever a file's content does: its device, inode, size, modification and change times (no
    system call sets a change time back, so a file written since, even with its modification time restored, differs)."""
    status = path.stat()
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def streamed_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class HashRecord:
    """The sha256s that this user's earlier processes computed, kept by :func:`file_identity` in ``directory``, so a
    file left untouched since is not hashed again: a fresh process trusts the record where it would read gigabytes.

    This is weaker than hashing: it relies on the file system to change a file's identity whenever its content
    changes, which local Linux file systems do (FAT and some network mounts keep coarse or no change times). A file
    is recorded only when its identity was the same before and after hashing and, unless the caller wrote it itself,
    it had not changed for two seconds (a file changed twice within one timestamp tick keeps its times, so a file
    changed just now could change again unseen). Records name the file's identity, not its path, and are bounded
    (the oldest go first); one that cannot be read or names another identity is ignored.
    """

    def __init__(self, directory: Path, max_records: int = 4096) -> None:
        self.directory = directory
        self.max_records = max_records

    def _path(self, identity: FileIdentity) -> Path:
        return self.directory / hashlib.sha256(repr(identity).encode()).hexdigest()[:RECORD_NAME_LENGTH]

    def lookup(self, identity: FileIdentity) -> str | None:
        """The recorded sha256 of the file with this identity, if any."""
        path = self._path(identity)
        try:
            if not stat.S_ISREG(path.lstat().st_mode):
                return None
            with open(path, "rb") as handle:
                record = json.loads(handle.read(MAX_RECORD_BYTES + 1).decode("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("identity") != list(identity):
            return None
        found = record.get("sha256")
        return found if isinstance(found, str) and SHA256_HEX.fullmatch(found) else None

    def remember(self, path: Path, identity: FileIdentity, digest: str, written_here: bool = False) -> None:
        """Record ``digest`` for ``path``, hashed while it had ``identity``, if that identity still holds and is
        settled (``written_here``: this process wrote the file and is done with it, so no write can follow unseen)."""
        try:
            if file_identity(path) != identity:
                return
        except OSError:
            return
        if not written_here and time.time_ns() - max(identity[3], identity[4]) < SETTLED_NS:
            return
        record = json.dumps({"identity": list(identity), "sha256": digest}).encode()
        with suppress(OSError):
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor, partial = tempfile.mkstemp(prefix=".partial-", dir=self.directory)
            with open(descriptor, "wb") as handle:
                handle.write(record)
            os.replace(partial, self._path(identity))
            self._bound()

    def _bound(self) -> None:
        names = os.listdir(self.directory)
        if len(names) <= self.max_records:
            return
        aged = sorted((self.directory / name for name in names), key=lambda path: path.lstat().st_mtime)
        for path in aged[: len(names) - self.max_records // 2]:
            path.unlink(missing_ok=True)


def sha256_file(path: Path, record: HashRecord | None = None) -> str:
    """The file's sha256, read once per process: a file whose identity is unchanged is not read again (a base
    model's or a bundle's gigabytes are hashed once, however many times a command asks); with ``record``, not
    again in later processes either, as long as the file stays untouched."""
    identity = file_identity(path)
    found = _HASHED.get(identity) or (record.lookup(identity) if record is not None else None)
    if found is None:
        found = streamed_sha256(path)
        if record is not None:
            record.remember(path, identity, found)
    _HASHED[identity] = found
    return found


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A safetensors file's tensors as numpy arrays and its metadata, refused in one line if unreadable or not finite."""
    from safetensors import SafetensorError, safe_open

    require_file(path)
    try:
        with memory_guard(path), safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CfdeployError(f"{path}: not a safetensors file ({error})") from None
    for key, tensor in tensors.items():
        if not np.isfinite(tensor).all():
            raise CfdeployError(f"{path}: {key} holds NaN or infinite values")
    return tensors, metadata
