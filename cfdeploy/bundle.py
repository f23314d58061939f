"""A deploy bundle: ONNX graphs, tokenizer data and a manifest, the unit users copy to a target machine.

Torch-free. Every file listed in the manifest is checked against its sha256 before first use, so a
damaged or swapped file is refused rather than run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cfdeploy.errors import CfdeployError

FORMAT = "cfdeploy-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CACHE_DIR = "cache"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


class Bundle:
    """An exported bundle directory, opened read-only and verified lazily."""

    def __init__(self, path: Path) -> None:
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise CfdeployError(f"{path}: no such bundle directory")
        if not manifest_path.is_file():
            raise CfdeployError(f"{manifest_path}: missing; not a cfdeploy bundle (make one with cfdeploy export)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise CfdeployError(f"{manifest_path}: not valid JSON: {error}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CfdeployError(f"{manifest_path}: not a cfdeploy bundle manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise CfdeployError(
                f"{manifest_path}: bundle format version {version!r}, this cfdeploy reads version {FORMAT_VERSION}"
            )
        self.path = path
        self.manifest = manifest
        self._verified: set[str] = set()

    @property
    def opts(self) -> dict[str, Any]:
        return self.manifest["opts"]

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

    def file(self, relative: str) -> Path:
        """The path of a manifest-listed file, after checking it exists and its sha256 matches."""
        expected = self.manifest["files"].get(relative)
        if expected is None:
            raise CfdeployError(f"{self.path / MANIFEST}: lists no file {relative!r}")
        path = self.path / relative
        if relative not in self._verified:
            if not path.is_file():
                raise CfdeployError(f"{path}: missing from the bundle")
            found = sha256_file(path)
            if found != expected:
                raise CfdeployError(
                    f"{path}: sha256 {found[:12]}… differs from the manifest's {expected[:12]}… (file changed or damaged)"
                )
            self._verified.add(relative)
        return path

    def has_network(self, name: str) -> bool:
        return name in self.manifest["networks"]

    def _network_file(self, name: str) -> str:
        if not self.has_network(name):
            raise CfdeployError(f"{self.path}: bundle has no {name!r} graph")
        return self.manifest["networks"][name]["file"]

    def network(self, name: str) -> Path:
        return self.file(self._network_file(name))

    def network_sha256(self, name: str) -> str:
        """The sha256 the manifest records for a graph (what engines are keyed on); the file is not read."""
        return self.manifest["files"][self._network_file(name)]

    @property
    def vocab_path(self) -> Path:
        return self.file(self.manifest["tokenizer"]["vocab"])

    def mean_w(self) -> np.ndarray:
        return np.load(self.file(self.manifest["mean_w"]), allow_pickle=False)

    def precomputed_text_latents(self, prompt: str) -> np.ndarray | None:
        """``t_w`` stored at export time for ``--prompt``, if this prompt was one of them."""
        relative = self.manifest.get("prompts", {}).get(prompt)
        return None if relative is None else np.load(self.file(relative), allow_pickle=False)

    @cached_property
    def text_branch_hash(self) -> str:
        """What a prompt's ``t_w`` depends on: the CLIP text and text-mapper graphs."""
        hashes = [self.network_sha256(name) for name in ("clip_text", "text_mapper") if self.has_network(name)]
        return hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]


class TextLatentCache:
    """Per-prompt ``t_w`` kept in ``BUNDLE/cache/`` so a repeated prompt skips CLIP and the text mapper.

    Keyed by the prompt and the text-branch graphs' hashes; written atomically; a read-only bundle
    simply gets no cache.
    """

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.directory = bundle.path / CACHE_DIR

    def _path(self, prompt: str) -> Path:
        return self.directory / f"{self.bundle.text_branch_hash}-{prompt_key(prompt)}.npy"

    def get(self, prompt: str) -> np.ndarray | None:
        stored = self.bundle.precomputed_text_latents(prompt)
        if stored is not None:
            return stored
        path = self._path(prompt)
        if not path.is_file():
            return None
        try:
            cached = np.load(path, allow_pickle=False)
        except (ValueError, OSError):
            return None
        expected = (1, self.bundle.n_latent, self.bundle.style_dim)
        return cached if cached.shape == expected and np.isfinite(cached).all() else None

    def put(self, prompt: str, text_latents: np.ndarray) -> None:
        try:
            self.directory.mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".partial", delete=False) as handle:
                np.save(handle, text_latents)
            os.replace(handle.name, self._path(prompt))
        except OSError:
            return
