"""What every runtime over a bundle shares: dimensions, tokenizer, prompt cache, and the graphs run by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from cfdeploy.bundle import Bundle, TextLatentCache, without_clip_message
from cfdeploy.errors import CfdeployError
from cfdeploy.graph_cache import GraphCache
from cfdeploy.tokenizer import ClipTokenizer


class GraphRunner(Protocol):
    """A runtime's graphs of one bundle, each opened on first use (ONNX Runtime's sessions, OpenVINO's compiled
    models): ``runner(network, **inputs)`` returns the graph's output."""

    threads: int

    def __call__(self, network: str, **inputs: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]:
        """The runtime, device, threads and precisions that ran, and what the graph cache did per network."""
        ...


def graph_cache(bundle: Bundle, session_cache: bool | None) -> GraphCache | None:
    """The per-user compiled-graph cache, unless ``--no-session-cache`` (``session_cache=False``); with it, the
    bundle's graphs that a cached compiled form replaces are checked through the cache's record of earlier hashes."""
    if session_cache is False:
        return None
    cache = GraphCache()
    bundle.files.hashes = cache.hashes
    return cache


class BundleBackend(ABC):
    """An :class:`~cfdeploy.editing.EditBackend` whose stages are the bundle's graphs, run by :meth:`run`.

    It owns the bundle's prompt cache (``BUNDLE/cache``), so a repeated prompt skips CLIP and the
    text mapper whichever program opened the backend.
    """

    name: str

    def __init__(self, bundle: Bundle, cache_max: int | None = None) -> None:
        self.bundle = bundle
        self._tokenizer: ClipTokenizer | None = None
        self.description = bundle.description
        self.source_text = bundle.opts.get("source_text")
        self.text_cache = (
            TextLatentCache(bundle) if cache_max is None else TextLatentCache(bundle, max_entries=cache_max)
        )

    @abstractmethod
    def run(self, network: str, **inputs: np.ndarray) -> np.ndarray:
        """Run one graph of the bundle (named as in :mod:`cfdeploy.contracts`) and return its output."""

    @property
    def size(self) -> int:
        return self.bundle.size

    @property
    def n_latent(self) -> int:
        return self.bundle.n_latent

    @property
    def style_dim(self) -> int:
        return self.bundle.style_dim

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        if self._tokenizer is None:
            self._tokenizer = ClipTokenizer(self.bundle.vocab_path)
        return self._tokenizer(prompts)

    def text_features(self, tokens: np.ndarray) -> np.ndarray:
        if not self.bundle.has_network("clip_text"):
            raise CfdeployError(without_clip_message(self.bundle.path, self.bundle.manifest.get("prompts", {})))
        return self.run("clip_text", tokens=tokens.astype(np.int64))

    def text_latents(self, text_features: np.ndarray) -> np.ndarray:
        return self.run("text_mapper", text_features=np.ascontiguousarray(text_features, np.float32))

    def edit_latents(self, w: np.ndarray, text_latents: np.ndarray, strength: float) -> np.ndarray:
        return self.run(
            "latent_editor",
            w=np.ascontiguousarray(w, np.float32),
            text_latents=np.ascontiguousarray(np.broadcast_to(text_latents, w.shape), np.float32),
            strength=np.array([strength], np.float32),
        )

    def synthesize(self, latents: np.ndarray) -> np.ndarray:
        return self.run("generator", latents=np.ascontiguousarray(latents, np.float32))

    @property
    def encoder_generator_sha256(self) -> str | None:
        """The weights hash of the generator the bundle's e4e encoder was trained with, if it has one."""
        value = self.bundle.manifest.get("weights", {}).get("encoder_generator_sha256")
        return value if isinstance(value, str) else None

    def generator_sha256(self) -> str:
        return str(self.bundle.manifest.get("weights", {}).get("generator_sha256", ""))

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Aligned photos ``[B, 3, 256, 256]`` in [-1, 1] to W+ codes through the bundle's e4e graph."""
        if not self.bundle.has_network("encoder"):
            raise CfdeployError(
                f"{self.bundle.path}: has no e4e encoder graph (export it with cfdeploy export --encoder)"
            )
        return self.run("encoder", images=np.ascontiguousarray(images, np.float32))

    @property
    def identity_source(self) -> str | None:
        """The bundle's ArcFace graph, if it was exported with one (``export --identity-weights``)."""
        return f"{self.bundle.path}/identity.onnx" if self.bundle.has_network("identity") else None

    def identity_features(self, faces: np.ndarray) -> np.ndarray:
        """Faces at 256 px ``[B, 3, 256, 256]`` in [-1, 1] to unit ArcFace embeddings through the identity graph."""
        if not self.bundle.has_network("identity"):
            raise CfdeployError(
                f"{self.bundle.path}: has no identity graph (export it with cfdeploy export --identity-weights)"
            )
        return self.run("identity", images=np.ascontiguousarray(faces, np.float32))

    def sample_w(self, z: np.ndarray, truncation: float) -> np.ndarray:
        """``z → w`` through the mapping graph, truncated toward the bundle's mean W."""
        w = self.run("mapping", z=np.ascontiguousarray(z, np.float32))
        if truncation != 1.0:
            mean_w = self.bundle.mean_w()
            w = mean_w + truncation * (w - mean_w)
        return w.astype(np.float32)


class RunnerBackend(BundleBackend):
    """A bundle backend whose graphs a :class:`GraphRunner` runs; what edit.json and ``inspect`` report is its
    :meth:`describe`."""

    def __init__(self, bundle: Bundle, graphs: GraphRunner, cache_max: int | None = None) -> None:
        super().__init__(bundle, cache_max)
        self.graphs = graphs

    def run(self, network: str, **inputs: np.ndarray) -> np.ndarray:
        return self.graphs(network, **inputs)

    def describe(self) -> dict[str, Any]:
        return self.graphs.describe()
