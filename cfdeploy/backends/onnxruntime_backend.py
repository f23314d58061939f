"""The ONNX Runtime backend: runs a bundle's graphs with no torch and no open_clip in the process."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cfdeploy.backends.bundle_backend import RunnerBackend, graph_cache
from cfdeploy.bundle import ORT_ENGINE_CACHE, Bundle
from cfdeploy.sessions import Sessions


class OnnxRuntimeBackend(RunnerBackend):
    """Each stage of the edit as an ONNX Runtime session over the bundle's verified graphs (created on first use)."""

    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        cache_max: int | None = None,
        session_cache: bool | None = None,
    ) -> None:
        self.sessions = Sessions(
            bundle.network,
            device,
            providers,
            threads,
            precision=lambda network: bundle.contracts[network].precision,
            engine_cache=bundle.engine_dir / ORT_ENGINE_CACHE,
            digest=bundle.network_sha256,
            check=bundle.checked_network_sha256,
            cache=graph_cache(bundle, session_cache),
        )
        super().__init__(bundle, self.sessions, cache_max)
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
        session_cache: bool | None = None,
    ) -> OnnxRuntimeBackend:
        """Open the bundle at ``path`` (pinned to a manifest sha256 if ``expect_manifest``) on ``device``; compiled
        graphs are kept in the per-user cache unless ``session_cache`` is False."""
        return cls(
            Bundle(path, expect_manifest=expect_manifest), device or "cpu", providers, threads, cache_max, session_cache
        )
