"""The OpenVINO backend: a bundle's graphs on Intel's runtime, torch-free; bf16 on CPUs with AMX or AVX-512 BF16."""

from __future__ import annotations

from pathlib import Path

from cfdeploy.backends.bundle_backend import RunnerBackend, graph_cache
from cfdeploy.bundle import Bundle
from cfdeploy.openvino_graphs import CompiledGraphs


class OpenVinoBackend(RunnerBackend):
    """Each stage of the edit as an OpenVINO compiled model over the bundle's verified graphs (compiled on first use).

    ``fp32`` matches ONNX Runtime within rel-L2 1e-5; ``bf16`` runs the generator and the encoder in bf16 and keeps
    the other networks in fp32 (``describe()`` says which ran how). ``features`` stands for the CPU's feature flags
    (default: this CPU's).
    """

    name = "openvino"

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        threads: int | None = None,
        precision: str = "fp32",
        cache_max: int | None = None,
        session_cache: bool | None = None,
        features: frozenset[str] | None = None,
    ) -> None:
        graphs = CompiledGraphs(
            bundle.network,
            bundle.network_sha256,
            bundle.checked_network_sha256,
            device,
            threads,
            precision,
            graph_cache(bundle, session_cache),
            features,
        )
        super().__init__(bundle, graphs, cache_max)

    @classmethod
    def from_bundle(
        cls,
        path: Path,
        device: str | None = None,
        threads: int | None = None,
        precision: str | None = None,
        cache_max: int | None = None,
        expect_manifest: str | None = None,
        session_cache: bool | None = None,
    ) -> OpenVinoBackend:
        """Open the bundle at ``path`` (pinned to a manifest sha256 if ``expect_manifest``) on ``device``."""
        return cls(
            Bundle(path, expect_manifest=expect_manifest),
            device or "cpu",
            threads,
            precision or "fp32",
            cache_max,
            session_cache,
        )
