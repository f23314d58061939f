"""A deploy bundle: ONNX graphs, tokenizer data and a manifest, the unit users copy to a target machine.

Torch-free. This module owns the bundle's layout and its manifest both ways: :func:`write_manifest`
for the exporter and refit, :class:`Bundle` for everything that reads one. A bundle may come from
anywhere, so opening one checks the whole manifest (each malformed field is one line naming it),
keeps every path it names inside the bundle (no ``..``, no absolute paths, no symlink leading out),
and checks every listed file against its sha256 before first use. The hashes guard against damage;
pinning the manifest itself (``expect_manifest``) guards against a bundle rewritten by someone else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cfdeploy.bundle_files import (
    EXTERNAL_DATA_SUFFIX,
    VerifiedFiles,
    VerifiedGraph,
    confined,
    engine_dir,
    read_manifest,
    show,
)
from cfdeploy.contracts import NetworkContract, network_contracts
from cfdeploy.errors import CfdeployError
from cfdeploy.files import SHA256_HEX, npy_array, read_regular
from cfdeploy.outputs import npy_bytes, write_atomic
from cfdeploy.tokenizer import VOCAB_FILENAME

FORMAT = "cfdeploy-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_VOCAB = f"tokenizer/{VOCAB_FILENAME}"
MEAN_W = "mean_w.npy"
PROMPTS_DIR = "prompts"
CACHE_DIR = "cache"
ORT_ENGINE_CACHE = "onnxruntime"  # ONNX Runtime's TensorRT provider caches its own engines here, inside ENGINE_DIR

MAX_NPY_HEADER_BYTES = 4096
# Upper bounds of opts: a StyleGAN2 is at most a few thousand pixels, levels and channels wide.
DIMENSION_LIMITS = {"size": 8192, "n_latent": 64, "style_dim": 4096}
OPTIONAL_OBJECTS = ("prompts", "source", "weights", "export", "versions")
OPTIONAL_TEXT_OPTS = ("description", "source_text")
DEFAULT_CACHE_ENTRIES = 256  # at 1024 px an entry is 37 KB: about 9 MB of prompts
_log = logging.getLogger(__name__)


def prompt_key(prompt: str) -> str:
    try:
        encoded = prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise CfdeployError(f"prompt {prompt!r} is not valid UTF-8 text") from None
    return hashlib.sha256(encoded).hexdigest()[:32]


def prompt_file(prompt: str) -> str:
    """Where the exporter stores a precomputed prompt's ``t_w``, relative to the bundle."""
    return f"{PROMPTS_DIR}/{prompt_key(prompt)}.npy"


def without_clip_message(where: object, prompts: Iterable[str]) -> str:
    """Why a bundle exported ``--without-clip`` cannot edit a prompt: one message for edit, batch and serve."""
    stored = ", ".join(repr(prompt) for prompt in prompts) or "none"
    return (
        f"{where}: exported --without-clip, so it edits only the prompts precomputed at export ({stored}) "
        "or --text-embedding features"
    )


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Check ``manifest`` against the schema :class:`Bundle` reads, then write it atomically.

    Atomic replacement also means a manifest hard-linked to another bundle's (refit's staging) is
    never written through.
    """
    check_manifest(manifest, directory)
    write_atomic(directory / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _spec_text(specs: Any) -> str:
    if not isinstance(specs, list) or not all(isinstance(spec, dict) for spec in specs):
        return show(specs)
    return ", ".join(f"{spec.get('name')} {spec.get('shape')}" for spec in specs)


class _ManifestCheck:
    """The schema of format version 1; each problem is one line naming the manifest file and the field."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.source = directory / MANIFEST

    def fail(self, field: str, problem: str) -> CfdeployError:
        return CfdeployError(f"{self.source}: {field} {problem}")

    def object_field(self, parent: dict[str, Any], name: str, field: str, required: bool = True) -> dict[str, Any]:
        if name not in parent:
            if required:
                raise self.fail(field, "is missing")
            return {}
        value = parent[name]
        if not isinstance(value, dict):
            raise self.fail(field, f"must be an object, found {_kind(value)}")
        return value

    def inside(self, relative: Any, field: str) -> str:
        """``relative`` if it names a path that stays inside the bundle, symlinks resolved."""
        return confined(self.directory, relative, field, self.source)

    def listed(self, relative: Any, field: str, files: dict[str, Any]) -> None:
        if self.inside(relative, field) not in files:
            raise self.fail(field, f"{show(relative)} is not listed in files, so it cannot be verified")

    def sha256(self, digest: Any, field: str) -> None:
        if not isinstance(digest, str):
            raise self.fail(field, f"must be a sha256 string, found {_kind(digest)}")
        if not SHA256_HEX.fullmatch(digest):
            raise self.fail(field, f"is not a sha256 (64 lowercase hex digits): {show(digest)}")

    def dimension(self, opts: dict[str, Any], name: str) -> int:
        if name not in opts:
            raise self.fail(f"opts.{name}", "is missing")
        value, limit = opts[name], DIMENSION_LIMITS[name]
        if type(value) is not int or not 1 <= value <= limit:
            raise self.fail(f"opts.{name}", f"must be a whole number from 1 to {limit}, found {show(value)}")
        return value

    def network(self, name: str, entry: Any, contract: NetworkContract | None, files: dict[str, Any]) -> None:
        field = f"networks.{name}"
        if contract is None:
            raise self.fail("networks", f"has an unknown graph {show(name)} (format version {FORMAT_VERSION} has none)")
        if not isinstance(entry, dict):
            raise self.fail(field, f"must be an object, found {_kind(entry)}")
        self.listed(entry.get("file"), f"{field}.file", files)
        if entry["file"] != contract.filename:
            raise self.fail(f"{field}.file", f"must be {contract.filename}, found {show(entry['file'])}")
        for kind in ("inputs", "outputs"):
            expected = [spec.as_dict() for spec in getattr(contract, kind)]
            if entry.get(kind) != expected:
                raise self.fail(
                    f"{field}.{kind}",
                    f"is {_spec_text(entry.get(kind))}, which disagrees with opts (size, n_latent, style_dim): "
                    f"expected {_spec_text(expected)}",
                )
        parity = self.object_field(entry, "parity", f"{field}.parity", required=False)
        for batch, result in parity.items():
            rel_l2 = result.get("rel_l2") if isinstance(result, dict) else None
            if isinstance(rel_l2, bool) or not isinstance(rel_l2, (int, float)) or not math.isfinite(rel_l2):
                raise self.fail(f"{field}.parity.{batch}.rel_l2", f"must be a finite number, found {show(rel_l2)}")

    def __call__(self, manifest: Any) -> dict[str, NetworkContract]:
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise CfdeployError(f"{self.source}: not a cfdeploy bundle manifest (format {show(found)})")
        version = manifest.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise CfdeployError(
                f"{self.source}: bundle format version {show(version)}, this cfdeploy reads version {FORMAT_VERSION}"
            )
        files = self.object_field(manifest, "files", "files")
        opts = self.object_field(manifest, "opts", "opts")
        networks = self.object_field(manifest, "networks", "networks")
        tokenizer = self.object_field(manifest, "tokenizer", "tokenizer")
        optional = {name: self.object_field(manifest, name, name, required=False) for name in OPTIONAL_OBJECTS}
        if not isinstance(manifest.get("refits", []), list):
            raise self.fail("refits", f"must be a list, found {_kind(manifest['refits'])}")
        for relative, digest in files.items():
            self.sha256(digest, f"files[{show(self.inside(relative, 'files entry'))}]")
        for name in ("generator_sha256", "encoder_generator_sha256"):
            if name in optional["weights"]:
                self.sha256(optional["weights"][name], f"weights.{name}")
        for name in OPTIONAL_TEXT_OPTS:
            if not isinstance(opts.get(name), (str, type(None))):
                raise self.fail(f"opts.{name}", f"must be text, found {_kind(opts[name])}")
        size, n_latent, style_dim = (self.dimension(opts, name) for name in ("size", "n_latent", "style_dim"))
        contracts = network_contracts(size, n_latent, style_dim, with_encoder=True, with_identity=True)
        for name, entry in networks.items():
            self.network(name, entry, contracts.get(name), files)
        self.listed(tokenizer.get("vocab"), "tokenizer.vocab", files)
        self.listed(manifest.get("mean_w"), "mean_w", files)
        for prompt, relative in optional["prompts"].items():
            self.listed(relative, f"prompts[{show(prompt)}]", files)
        return contracts


def check_manifest(manifest: Any, directory: Path) -> dict[str, NetworkContract]:
    """Refuse a manifest that is not format version 1 or names a path outside ``directory``; returns its contracts."""
    return _ManifestCheck(directory)(manifest)


def _array_limit(shape: tuple[int, ...]) -> int:
    return 4 * math.prod(shape) + MAX_NPY_HEADER_BYTES


class Bundle:
    """An exported bundle directory, opened read-only: the manifest is checked on open, files before first use.

    Args:
        path: the bundle directory.
        expect_manifest: if given, the sha256 ``manifest.json`` must have (``cfdeploy inspect`` prints it).

    Raises:
        CfdeployError: not a bundle, a malformed manifest, a path leading outside, or another manifest than pinned.
    """

    def __init__(self, path: Path, expect_manifest: str | None = None) -> None:
        manifest, self.manifest_sha256 = read_manifest(
            path, MANIFEST, "a cfdeploy bundle", "make one with cfdeploy export", expect_manifest
        )
        self._contracts = check_manifest(manifest, path)
        self.path = path
        self.manifest: dict[str, Any] = manifest
        self.files = VerifiedFiles(path, MANIFEST, manifest["files"])

    @property
    def opts(self) -> dict[str, Any]:
        return self.manifest["opts"]  # type: ignore[no-any-return]

    @property
    def size(self) -> int:
        return int(self.opts["size"])

    @property
    def n_latent(self) -> int:
        return int(self.opts["n_latent"])

    @property
    def style_dim(self) -> int:
        return int(self.opts["style_dim"])

    @property
    def description(self) -> str | None:
        return self.opts.get("description")

    @property
    def contracts(self) -> dict[str, NetworkContract]:
        """The contracts of every graph a bundle of this size has (those present: :meth:`has_network`)."""
        return self._contracts

    @property
    def engine_dir(self) -> Path:
        return engine_dir(self.path)

    def _array(self, relative: str, shape: tuple[int, ...]) -> np.ndarray:
        content = self.files.read_bytes(relative, _array_limit(shape))
        try:
            return npy_array(content, shape)
        except ValueError as why:
            raise CfdeployError(f"{self.path / relative}: {why}") from None

    def has_network(self, name: str) -> bool:
        return name in self.manifest["networks"]

    def _network_file(self, name: str) -> str:
        if not self.has_network(name):
            raise CfdeployError(f"{self.path}: bundle has no {name!r} graph")
        return self.manifest["networks"][name]["file"]  # type: ignore[no-any-return]

    def network(self, name: str) -> VerifiedGraph:
        """A graph's verified bytes (ONNX Runtime gets these, not a path to re-read)."""
        return self.files.graph(self._network_file(name))

    def network_sha256(self, name: str) -> str:
        """A graph's digest from the manifest, its weights file's included (what engines and compiled-graph caches
        are keyed on: :meth:`VerifiedFiles.graph_digest`); the files are not read."""
        return self.files.graph_digest(self._network_file(name))

    def checked_network_sha256(self, name: str) -> str:
        """:meth:`network_sha256`, once the graph's files are checked against the manifest (streamed, not kept), so a
        damaged bundle is refused even where a cached compiled graph would run in its place."""
        relative = self._network_file(name)
        self.files.file(relative)
        if f"{relative}{EXTERNAL_DATA_SUFFIX}" in self.files.files:
            self.files.file(f"{relative}{EXTERNAL_DATA_SUFFIX}")
        return self.files.graph_digest(relative)

    @property
    def vocab_path(self) -> Path:
        return self.files.file(self.manifest["tokenizer"]["vocab"])

    def mean_w(self) -> np.ndarray:
        return self._array(self.manifest["mean_w"], (self.style_dim,))

    def precomputed_text_latents(self, prompt: str) -> np.ndarray | None:
        """``t_w`` stored at export time for ``export --text``, if this prompt was one of them."""
        relative = self.manifest.get("prompts", {}).get(prompt)
        return None if relative is None else self._array(relative, (1, self.n_latent, self.style_dim))

    @cached_property
    def text_branch_hash(self) -> str:
        """What a prompt's ``t_w`` depends on: the CLIP text and text-mapper graphs."""
        hashes = [self.network_sha256(name) for name in ("clip_text", "text_mapper") if self.has_network(name)]
        return hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]


class _DamagedEntry(Exception):
    """A prompt-cache entry that must not be used (the message says why)."""


class TextLatentCache:
    """Per-prompt ``t_w`` kept in ``BUNDLE/cache/`` so a repeated prompt skips CLIP and the text mapper.

    Prompts precomputed at export come first. Entries are keyed by the prompt and the text-branch
    graphs' hashes: ``KEY.npy`` with its sha256 in ``KEY.sha256``. An entry that does not match its
    hash or is not a finite ``[1, n_latent, style_dim]`` float32 array is ignored with a one-line
    warning through ``on_warning`` (default: this module's logger), and the recomputed prompt
    replaces it. At most ``max_entries`` entries are kept (default 256, 0 turns the cache off): a hit
    touches the entry's mtime, and the least recently used go first. A ``cache`` that is a symlink
    is refused; a read-only bundle, or a full disk, simply gets no new entries.
    """

    def __init__(
        self,
        bundle: Bundle,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        on_warning: Callable[[str], None] = _log.warning,
    ) -> None:
        if max_entries < 0:
            raise CfdeployError(f"--cache-max must be 0 (no cache) or more entries, got {max_entries}")
        self.bundle = bundle
        self.max_entries = max_entries
        self.on_warning = on_warning
        self.directory = bundle.path / CACHE_DIR
        if self.directory.is_symlink():
            raise CfdeployError(
                f"{self.directory}: is a symlink; the prompt cache must be a directory inside the bundle"
            )
        self._shape = (1, bundle.n_latent, bundle.style_dim)

    def _paths(self, prompt: str) -> tuple[Path, Path]:
        key = f"{self.bundle.text_branch_hash}-{prompt_key(prompt)}"
        return self.directory / f"{key}.npy", self.directory / f"{key}.sha256"

    def _read(self, entry: Path, digest_path: Path) -> np.ndarray:
        try:
            content = read_regular(entry, _array_limit(self._shape))
        except (ValueError, OSError) as why:
            raise _DamagedEntry(str(why)) from None
        try:
            recorded = read_regular(digest_path, 128).decode("ascii").strip()
        except (ValueError, OSError):
            raise _DamagedEntry(f"has no readable {digest_path.name} beside it") from None
        if hashlib.sha256(content).hexdigest() != recorded:
            raise _DamagedEntry("does not match its recorded sha256 (changed or damaged)")
        try:
            return npy_array(content, self._shape)
        except ValueError as why:
            raise _DamagedEntry(str(why)) from None

    def get(self, prompt: str) -> np.ndarray | None:
        """The prompt's ``t_w`` ``[1, n_latent, style_dim]``, or None to compute it."""
        stored = self.bundle.precomputed_text_latents(prompt)
        if stored is not None or self.max_entries == 0:
            return stored
        entry, digest_path = self._paths(prompt)
        if not os.path.lexists(entry):
            return None
        try:
            text_latents = self._read(entry, digest_path)
        except _DamagedEntry as why:
            self.on_warning(f"{entry}: prompt cache entry {why}; ignoring it and recomputing the prompt")
            return None
        _touch(entry)
        return text_latents

    def put(self, prompt: str, text_latents: np.ndarray) -> None:
        """Store a computed ``t_w`` (the hash first, so a crash leaves no entry that looks valid)."""
        if self.max_entries == 0:
            return
        entry, digest_path = self._paths(prompt)
        content = npy_bytes(np.ascontiguousarray(text_latents, np.float32))
        try:
            self.directory.mkdir(exist_ok=True)
            write_atomic(digest_path, f"{hashlib.sha256(content).hexdigest()}\n".encode())
            write_atomic(entry, content)
            _touch(entry)
            self._evict()
        except (OSError, CfdeployError):
            return

    def _evict(self) -> None:
        entries = []
        for path in self.directory.glob("*.npy"):
            try:
                entries.append((path.stat().st_mtime_ns, path.name, path))
            except FileNotFoundError:
                continue
        for _, _, path in sorted(entries)[: max(0, len(entries) - self.max_entries)]:
            path.unlink(missing_ok=True)
            path.with_suffix(".sha256").unlink(missing_ok=True)


def _touch(path: Path) -> None:
    """Mark an entry as just used, at full clock resolution (file times written together can tie)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        return
