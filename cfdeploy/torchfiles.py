"""Torch files that cannot run code: pickles through ``weights_only``, TorchScript archives read as zips.

No file is handed to a loader that can run code. Pickles go through ``torch.load(weights_only=True)`` with
the small allow-list real checkpoints need; OpenAI's TorchScript CLIP archive is read as the zip it is by
:func:`read_torchscript_state`, never by ``torch.jit.load``. Sizes a file declares are checked against the
bytes it holds before anything is allocated. The format loaders built on these are :mod:`cfdeploy.checkpoints`.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cfdeploy.errors import CfdeployError
from cfdeploy.files import memory_guard, require_file

# Classes real checkpoints contain besides tensors: rosinality's training checkpoints store ``args``.
ALLOWED_GLOBALS = (argparse.Namespace,)
MAX_LISTED_KEYS = 4
# torch stores a zip's entries uncompressed (TorchScript deflates only its small code files), so the sizes
# the entries declare add up to about the file's size. Far more is a lying header or a zip bomb.
MAX_ZIP_INFLATION = 2
ZIP_SLACK_BYTES = 1 << 20
# The storage classes a TorchScript pickle names, as the dtypes they stand for: the classes themselves are
# never handed to the pickle, which could call them to allocate.
STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "ByteStorage": torch.uint8,
    "CharStorage": torch.int8,
    "ShortStorage": torch.int16,
    "IntStorage": torch.int32,
    "LongStorage": torch.int64,
    "BoolStorage": torch.bool,
}


def _runs_code(global_name: str) -> str:
    return f"it references {global_name:.100}, which could run code (only weights are loaded)"


def check_zip_sizes(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse a zip whose entries declare far more bytes than the file holds, before any entry is read."""
    entries = archive.infolist()
    declared = sum(entry.file_size for entry in entries)
    file_size = path.stat().st_size
    if entries and declared > MAX_ZIP_INFLATION * file_size + ZIP_SLACK_BYTES:
        largest = max(entries, key=lambda entry: entry.file_size)
        raise CfdeployError(
            f"{path}: zip entry {largest.filename} declares {largest.file_size:,} bytes, far more than the "
            f"{file_size:,}-byte file holds (a zip bomb or a damaged header)"
        )


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives (OpenAI's CLIP ``.pt``) are zips carrying compiled code next to the data."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 2)[1:2] == ["code"] for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and the small allow-list real checkpoints need."""
    require_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_sizes(path, archive)
    except zipfile.BadZipFile:
        pass  # torch's older, non-zip format, or a damaged file that torch.load describes below
    try:
        with memory_guard(path), torch.serialization.safe_globals([*ALLOWED_GLOBALS]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except CfdeployError:
        raise
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:
            raise CfdeployError(f"{path}: refused to load: {_runs_code(found.group(1))}") from None
        raise CfdeployError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): bad pickle data"
        ) from None
    except Exception as error:  # torch raises RuntimeError, KeyError, EOFError… for damaged files
        detail = str(error).split(".")[0].strip() or type(error).__name__
        raise CfdeployError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {detail}") from None


class _Refused(Exception):
    """Raised while unpickling a TorchScript archive for anything that only code could restore."""


class ModuleRecord:
    """A TorchScript module as its archive pickles it: the class's name and the attribute dict, nothing else.

    No class of the archive is imported or run. A module whose scripted ``__setstate__`` would restore it
    pickles some other state than an attribute dict; that is refused rather than interpreted.
    """

    class_name = "__torch__"
    attributes: dict[str, Any]

    def __new__(cls) -> ModuleRecord:
        record = super().__new__(cls)
        record.attributes = {}
        return record

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not all(isinstance(name, str) for name in state):
            raise _Refused(
                f"{self.class_name:.100} restores its state with its own TorchScript code (__setstate__), "
                "which cfdeploy never runs"
            )
        self.attributes = state


def _rebuild_tensor(
    storage: torch.Tensor,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Mapping[Any, Any],
    metadata: Any = None,
) -> torch.Tensor:
    """What ``torch._utils._rebuild_tensor_v2`` stands for, for plain tensors only: a view of its storage."""
    if not isinstance(storage, torch.Tensor) or backward_hooks or metadata:
        raise ValueError("a tensor that is not plain data (hooks or Python state)")
    return storage.as_strided(size, stride, offset)


class _ArchiveUnpickler(pickle.Unpickler):
    """One pickle of a TorchScript archive: tensors and :class:`ModuleRecord` s, every other global refused."""

    def __init__(self, archive: zipfile.ZipFile, root: str, name: str) -> None:
        super().__init__(io.BytesIO(archive.read(f"{root}/{name}.pkl")))
        self.archive = archive
        self.tensor_dir = f"{root}/{name}"
        self.storages: dict[str, torch.Tensor] = {}
        self.record_types: dict[str, type[ModuleRecord]] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if module.split(".")[0] == "__torch__":
            if qualified not in self.record_types:
                self.record_types[qualified] = type(qualified, (ModuleRecord,), {"class_name": qualified})
            return self.record_types[qualified]
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if qualified == "torch._utils._rebuild_tensor_v2":
            return _rebuild_tensor
        if qualified == "collections.OrderedDict":
            return collections.OrderedDict
        raise _Refused(_runs_code(qualified))

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """``('storage', dtype, key, location, numel)`` → the entry ``<root>/<pickle>/<key>`` as a flat tensor."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"unknown persistent id {pid!r:.80}")
        _, dtype, key, _, numel = pid
        if not (isinstance(dtype, torch.dtype) and isinstance(key, str) and "/" not in key and isinstance(numel, int)):
            raise ValueError(f"malformed storage id {pid!r:.80}")
        if key not in self.storages:
            entry = self.archive.getinfo(f"{self.tensor_dir}/{key}")
            if entry.file_size != numel * dtype.itemsize:
                raise ValueError(
                    f"{entry.filename} holds {entry.file_size:,} bytes, not the {numel:,} {dtype} declared"
                )
            data = bytearray(self.archive.read(entry))
            self.storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _flatten(record: ModuleRecord, prefix: str, state: dict[str, torch.Tensor], seen: set[int]) -> None:
    """The dotted names of a module tree's tensor attributes (for a traced module, its parameters and buffers),
    a module's own before its submodules', as ``state_dict()`` lists them."""
    seen.add(id(record))
    attributes = record.attributes.items()
    state.update((prefix + name, value) for name, value in attributes if isinstance(value, torch.Tensor))
    for name, value in attributes:
        if isinstance(value, ModuleRecord) and id(value) not in seen:
            _flatten(value, f"{prefix}{name}.", state, seen)


def read_torchscript_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive (what ``state_dict()`` gives), read without TorchScript.

    The archive is a zip: ``<root>/data.pkl`` pickles the module tree, each tensor's bytes are the entry
    ``<root>/data/<key>``; ``constants.pkl`` (tensors in ``<root>/constants/``) is checked the same way.
    Its ``code/`` is never read.
    """
    require_file(path)
    try:
        with memory_guard(path), zipfile.ZipFile(path) as archive:
            check_zip_sizes(path, archive)
            names = archive.namelist()
            root = names[0].split("/", 1)[0]
            byteorder = archive.read(f"{root}/byteorder").decode() if f"{root}/byteorder" in names else "little"
            if byteorder != sys.byteorder:
                raise CfdeployError(
                    f"{path}: its tensors are stored {byteorder!r:.20}-endian, this machine is {sys.byteorder}-endian"
                )
            module = _ArchiveUnpickler(archive, root, "data").load()
            if f"{root}/constants.pkl" in names:
                _ArchiveUnpickler(archive, root, "constants").load()
    except _Refused as refusal:
        raise CfdeployError(f"{path}: refused to load: {refusal}") from None
    except CfdeployError:
        raise
    except Exception as error:  # a damaged zip or pickle raises almost anything
        raise CfdeployError(
            f"{path}: not a readable TorchScript archive (truncated or corrupt?): {type(error).__name__}: {error}"
        ) from None
    if not isinstance(module, ModuleRecord):
        raise CfdeployError(f"{path}: not a TorchScript module: its data.pkl holds a {type(module).__name__}")
    state: dict[str, torch.Tensor] = {}
    _flatten(module, "", state, set())
    return state


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """One hash over names, dtypes, shapes and values: equal weights hash equal whichever file holds them."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else "")


def describe(content: Any) -> str:
    if isinstance(content, dict):
        return "a dict with keys " + listed([str(key) for key in content])
    return f"a {type(content).__name__}"


def tensor_dict(content: Any, source: Path, what: str) -> dict[str, torch.Tensor]:
    """``content`` if it is a dict of named tensors; otherwise one line saying what it is instead."""
    if not isinstance(content, dict):
        raise CfdeployError(f"{source}: expected {what} as a dict of tensors, found {describe(content)}")
    wrong = [
        str(key) for key, value in content.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
    if wrong:
        raise CfdeployError(f"{source}: expected {what} as a dict of tensors; not tensors: {listed(wrong)}")
    return content


def require_finite_weights(state: Mapping[str, torch.Tensor], source: Path, prefix: str = "") -> None:
    """Refuse NaN or inf in any floating-point weight, naming the first such key (they make every image black).

    A finite float64 sum proves a tensor finite in one cheap pass (NaN and inf propagate into it); only a
    tensor whose sum is not finite is checked element by element.
    """
    for key, value in state.items():
        if not value.is_floating_point() or bool(torch.isfinite(value.sum(dtype=torch.float64))):
            continue
        if not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            raise CfdeployError(f"{source}: {prefix}{key} has {count} NaN/inf values")
