"""A directory whose manifest hashes every file: the trust floor under both editors' bundles.

A bundle may come from anywhere. Opening one reads its manifest (bounded, strict UTF-8 JSON), refuses a
manifest other than a pinned sha256 (``--expect-manifest``), and keeps every path the manifest names
inside the directory (no ``..``, absolute paths or symlinks leading out). Files are checked against
their sha256 before first use, and what is used is what was hashed: graphs and arrays are read once
into memory, hashed, and those bytes are handed on (ONNX Runtime gets the graph and its external
weights from memory, so it reads no file after the check); a graph that a compiled-graph cache runs in
place of may be checked through the cache's record of earlier hashes instead (:class:`VerifiedFiles`).
The manifest's hashes guard against damage; pinning the manifest guards against a bundle someone else
rewrote, hashes and all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cfdeploy.errors import CfdeployError
from cfdeploy.files import SHA256_HEX, HashRecord, file_identity, memory_guard, read_regular, sha256_file

MAX_MANIFEST_BYTES = 16 << 20
ENGINE_DIR = "tensorrt"  # TensorRT engines built for a bundle live inside it
EXTERNAL_DATA_SUFFIX = ".data"  # a graph over protobuf's 2 GB keeps its weights in GRAPH.onnx.data


def show(value: Any) -> str:
    """A manifest value in a message: its repr, cut short (the manifest may be hostile)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def leads_outside(path: Path, root: Path) -> bool:
    """Whether ``path``, its symlinks resolved, lies outside ``root`` (a symlink loop counts as outside)."""
    try:
        return not path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return True


def confined(directory: Path, relative: Any, field_name: str, source: Path) -> str:
    """``relative`` if it names a path that stays inside ``directory``, symlinks resolved; else one line naming the
    manifest field."""
    if relative is None:
        raise CfdeployError(f"{source}: {field_name} is missing")
    if not isinstance(relative, str):
        raise CfdeployError(f"{source}: {field_name} must be a path inside the bundle, found {type(relative).__name__}")
    pure = PurePosixPath(relative)
    if not pure.parts or pure.is_absolute() or ".." in pure.parts or "\\" in relative or "\0" in relative:
        raise CfdeployError(
            f"{source}: {field_name} {show(relative)} leads outside the bundle (absolute, empty or with '..')"
        )
    if leads_outside(directory / relative, directory):
        raise CfdeployError(f"{source}: {field_name} {show(relative)} is a symlink leading outside the bundle")
    return relative


def engine_dir(bundle: Path) -> Path:
    """``BUNDLE/tensorrt``, where a bundle's engines live; refused if it is a symlink leading out of the bundle."""
    engines = bundle / ENGINE_DIR
    if leads_outside(engines, bundle):
        raise CfdeployError(f"{engines}: is a symlink leading outside the bundle")
    return engines


def read_manifest(
    path: Path, name: str, what: str, hint: str, expect_manifest: str | None
) -> tuple[dict[str, Any], str]:
    """The manifest ``path/name`` as a JSON object and its sha256, checked against ``expect_manifest`` if pinned."""
    manifest_path = path / name
    if path.is_file():
        raise CfdeployError(f"{path}: a file, not a bundle directory ({hint})")
    if not path.is_dir():
        raise CfdeployError(f"{path}: no such bundle directory")
    if not os.path.lexists(manifest_path):
        raise CfdeployError(f"{manifest_path}: missing; not {what} ({hint})")
    if leads_outside(manifest_path, path):
        raise CfdeployError(f"{manifest_path}: is a symlink leading outside the bundle")
    try:
        raw = read_regular(manifest_path, MAX_MANIFEST_BYTES)
    except ValueError as why:
        raise CfdeployError(f"{manifest_path}: {why}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if expect_manifest is not None:
        pinned = expect_manifest.strip().lower()
        if not SHA256_HEX.fullmatch(pinned):
            raise CfdeployError(f"pinned manifest sha256 {show(expect_manifest)}: expected 64 hex digits")
        if digest != pinned:
            raise CfdeployError(f"{manifest_path}: sha256 {digest[:12]}… is not the pinned {pinned[:12]}…")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CfdeployError(f"{manifest_path}: not UTF-8 text (byte {error.start})") from None
    except ValueError as error:
        raise CfdeployError(f"{manifest_path}: not valid JSON: {error}") from None
    except RecursionError:
        raise CfdeployError(f"{manifest_path}: JSON nested too deeply") from None
    if not isinstance(manifest, dict):
        raise CfdeployError(f"{manifest_path}: not {what} manifest (a JSON object), found {type(manifest).__name__}")
    return manifest, digest


def check_file_table(directory: Path, files: Any, source: Path) -> dict[str, str]:
    """The manifest's ``files`` table: every path confined to ``directory``, every digest a sha256."""
    if not isinstance(files, dict):
        raise CfdeployError(f"{source}: files must be an object, found {type(files).__name__}")
    for relative, digest in files.items():
        field_name = f"files[{show(confined(directory, relative, 'files entry', source))}]"
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise CfdeployError(f"{source}: {field_name} is not a sha256 (64 lowercase hex digits): {show(digest)}")
    return files


@dataclass(frozen=True)
class VerifiedGraph:
    """An ONNX graph's bytes and its external weights' bytes, each checked against the manifest."""

    path: Path
    content: bytes
    external: dict[str, bytes] = field(default_factory=dict)  # external data file name (as the graph names it) → bytes


class VerifiedFiles:
    """The files a bundle's manifest lists: each checked before use, hashed once per process.

    With :attr:`hashes` set (a compiled-graph cache is in use), a file checked but not read, whose cached compiled
    form runs instead, is not hashed again while it stays untouched since a process of this user hashed it (see
    :class:`~cfdeploy.files.HashRecord`); a file that is read is always hashed, and recorded for those checks.
    """

    def __init__(self, path: Path, manifest_name: str, files: dict[str, str]) -> None:
        self.path = path
        self.source = path / manifest_name
        self.files = files
        self.hashes: HashRecord | None = None
        self._verified: set[str] = set()

    def _listed_path(self, relative: str) -> Path:
        if self.files.get(relative) is None:
            raise CfdeployError(f"{self.source}: lists no file {relative!r}")
        path = self.path / relative
        if not os.path.lexists(path):
            raise CfdeployError(f"{path}: missing from the bundle")
        if (path.is_symlink() and leads_outside(path, self.path)) or not path.is_file():
            raise CfdeployError(f"{path}: not a regular file inside the bundle")
        return path

    def _check_digest(self, path: Path, relative: str, found: str) -> None:
        expected = self.files[relative]
        if found != expected:
            raise CfdeployError(
                f"{path}: sha256 {found[:12]}… differs from the manifest's {expected[:12]}… (file changed or damaged)"
            )
        self._verified.add(relative)

    def file(self, relative: str) -> Path:
        """The path of a listed file, after checking it exists and its sha256 matches (for readers that re-read it,
        such as TensorRT's parser; everything else uses :meth:`read_bytes`)."""
        path = self._listed_path(relative)
        if relative not in self._verified:
            self._check_digest(path, relative, sha256_file(path, self.hashes))
        return path

    def read_bytes(self, relative: str, limit: int | None = None) -> bytes:
        """A listed file's content, read once and checked: what is used is exactly what was hashed."""
        path = self._listed_path(relative)
        identity = file_identity(path)
        try:
            with memory_guard(path):
                content = read_regular(path, limit) if limit is not None else path.read_bytes()
        except ValueError as why:
            raise CfdeployError(f"{path}: {why}") from None
        digest = hashlib.sha256(content).hexdigest()
        self._check_digest(path, relative, digest)
        if self.hashes is not None:
            self.hashes.remember(path, identity, digest)
        return content

    def graph_digest(self, relative: str) -> str:
        """What a graph's compiled forms (engines, cached optimised graphs) are keyed on, from the manifest: its
        sha256, combined with its weights file's where the manifest lists ``GRAPH.onnx.data`` (the .onnx alone does
        not change with the weights); no file is read."""
        graph = self.digest(relative)
        weights = self.files.get(f"{relative}{EXTERNAL_DATA_SUFFIX}")
        return graph if weights is None else hashlib.sha256(f"{graph}{weights}".encode()).hexdigest()

    def graph(self, relative: str) -> VerifiedGraph:
        """A graph and, where the manifest lists ``GRAPH.onnx.data``, its external weights, all verified."""
        external = f"{relative}{EXTERNAL_DATA_SUFFIX}"
        weights = {PurePosixPath(external).name: self.read_bytes(external)} if external in self.files else {}
        return VerifiedGraph(self.path / relative, self.read_bytes(relative), weights)

    def digest(self, relative: str) -> str:
        """The sha256 the manifest records for a listed file (what engines are keyed on); the file is not read."""
        if relative not in self.files:
            raise CfdeployError(f"{self.source}: lists no file {relative!r}")
        return self.files[relative]
