"""The ONNX Runtime backend: runs a bundle's graphs with no torch and no open_clip in the process."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cfdeploy.backends.bundle_backend import BundleBackend
from cfdeploy.bundle import ORT_ENGINE_CACHE, Bundle
from cfdeploy.sessions import Sessions


class OnnxRuntimeBackend(BundleBackend):
    """Each stage of the edit as an ONNX Runtime session over the bundle's verified graphs (created on first use)."""

    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        cache_max: int | None = None,
    ) -> None:
        super().__init__(bundle, cache_max)
        self.sessions = Sessions(
            bundle.network,
            device,
            providers,
            threads,
            precision=lambda network: bundle.contracts[network].precision,
            engine_cache=bundle.engine_dir / ORT_ENGINE_CACHE,
        )
        self.providers = self.sessions.providers

    @classmethod
    def from_bundle(
        cls,
        path: Path,
        device: str | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        cache_max: int | None = None,
        expect_manifest: str | None = None,
    ) -> OnnxRuntimeBackend:
        """Open the bundle at ``path`` (pinned to a manifest sha256 if ``expect_manifest``) on ``device``."""
        return cls(Bundle(path, expect_manifest=expect_manifest), device or "cpu", providers, threads, cache_max)

    def run(self, network: str, **inputs: np.ndarray) -> np.ndarray:
        return self.sessions(network, **inputs)
