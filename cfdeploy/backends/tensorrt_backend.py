"""The TensorRT backend (``cfdeploy edit --backend tensorrt``): a bundle's engines on one CUDA stream, no torch.

The engines are an :class:`~cfdeploy.trt.engine.EngineSet`. The edited latents go from the mapper
engine to the generator engine on the device (the host gets a read-only copy, which edits report).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cfdeploy.backends.bundle_backend import BundleBackend
from cfdeploy.bundle import Bundle
from cfdeploy.trt.engine import Engine, EngineSet
from cfdeploy.trt.plan import batch_chunks


class TensorRTBackend(BundleBackend):
    """Every stage of the edit on TensorRT engines built by ``cfdeploy build-engines``."""

    name = "tensorrt"

    def __init__(
        self,
        bundle: Bundle,
        engine_dir: Path | None = None,
        cuda_graphs: bool = True,
        cache_max: int | None = None,
        device: str = "cuda",
    ) -> None:
        super().__init__(bundle, cache_max)
        self.engine_set = EngineSet(
            engine_dir or bundle.engine_dir, bundle.contracts, bundle.network_sha256, device, cuda_graphs
        )
        self.device = self.engine_set.device
        self._edited: np.ndarray | None = None  # the last w_hat handed out, still in the editor's output buffer

    @classmethod
    def from_bundle(
        cls,
        path: Path,
        engines: Path | None = None,
        cuda_graphs: bool = True,
        cache_max: int | None = None,
        expect_manifest: str | None = None,
        device: str | None = None,
    ) -> TensorRTBackend:
        """Open the bundle at ``path`` with its engines (``BUNDLE/tensorrt``, or ``engines``) on GPU ``device``."""
        return cls(Bundle(path, expect_manifest=expect_manifest), engines, cuda_graphs, cache_max, device or "cuda")

    def engine(self, network: str) -> Engine:
        return self.engine_set.engine(network)

    def device_ms(self) -> dict[str, float]:
        """GPU time per network since the backend was made, from CUDA events."""
        return self.engine_set.device_ms()

    def run(self, network: str, **inputs: np.ndarray) -> np.ndarray:
        return self.engine_set(network, **inputs)

    def edit_latents(self, w: np.ndarray, text_latents: np.ndarray, strength: float) -> np.ndarray:
        w_hat = super().edit_latents(w, text_latents, strength)
        single_call = len(batch_chunks(w.shape[0], self.engine("latent_editor").profile)) == 1
        w_hat.flags.writeable = False  # the device copy stays valid only while the host copy is unchanged
        self._edited = w_hat if single_call else None
        return w_hat

    def synthesize(self, latents: np.ndarray) -> np.ndarray:
        generator = self.engine("generator")
        chunks = batch_chunks(latents.shape[0], generator.profile)
        editor = self.engine_set.engines.get("latent_editor")
        run_batch = chunks[0][2]
        edited, self._edited = self._edited, None
        if latents is edited and editor is not None and len(chunks) == 1 and editor.batch == run_batch:
            # w_hat never left the device: copy it buffer to buffer instead of uploading the host copy
            generator.buffers["latents"].copy_from(
                editor.buffers["w_hat"], editor.nbytes("w_hat", run_batch), self.engine_set.stream
            )
            generator.execute(run_batch)
            return generator.download("image", latents.shape[0])
        return super().synthesize(latents)

    def close(self) -> None:
        self.engine_set.close()
