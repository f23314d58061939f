"""``dac edit``: sample an edit for a row of seeds and write it, from a run (PyTorch) or a bundle (ONNX Runtime).

Torch-free: a bundle's runtime never imports torch. Both paths draw the same initial noise for a seed
(numpy's generator) and write the same files: ``seed_NNNN.png`` per seed, ``contact_sheet.png`` and
``edit.json`` (everything needed to reproduce the samples).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cfdeploy.dac.bundle import BUNDLE_FORMAT
from cfdeploy.dac.run import FORMAT as RUN_FORMAT
from cfdeploy.dac.run import require_manifest, versions
from cfdeploy.errors import CfdeployError, require_finite, require_range
from cfdeploy.inputs import read_json_object
from cfdeploy.outputs import StagedDirectory

SCHEDULERS = ("pndm", "ddim")
CONTACT_SHEET = "contact_sheet.png"


@dataclass(frozen=True)
class PredictSettings:
    """The official defaults: β 1, guidance 4, 30 PNDM steps, seed 29; ``samples`` seeds in a row."""

    beta: float = 1.0
    guidance: float = 4.0
    steps: int = 30
    seed: int = 29
    samples: int = 8
    scheduler: str = "pndm"

    def __post_init__(self) -> None:
        require_finite(beta=self.beta, guidance=self.guidance)
        require_range(1, 1000, steps=self.steps)
        require_range(1, 1024, samples=self.samples)
        require_range(0, 2**63 - 1 - self.samples, seed=self.seed)
        if self.scheduler not in SCHEDULERS:
            raise CfdeployError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.samples))


class Sampler(Protocol):
    def sample(self, seed: int, on_call: Callable[[int], None]) -> np.ndarray:
        """The edit for ``seed`` as ``[1, 3, H, W]`` in [0, 1]; ``on_call(t)`` before each UNet call."""
        ...


def to_pixels(unit: np.ndarray) -> np.ndarray:
    """``[1, 3, H, W]`` in [0, 1] → ``[H, W, 3]`` uint8, rounded as diffusers' ``numpy_to_pil`` rounds."""
    pixels: np.ndarray = (unit[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return pixels


def contact_sheet(images: list[np.ndarray], columns: int = 4) -> np.ndarray:
    """Images ``[H, W, 3]`` side by side in rows of ``columns``, black where a row is short."""
    height, width, _ = images[0].shape
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    sheet = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        sheet[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    return sheet


def source_format(path: Path) -> str:
    """Whether ``path`` is a DAC run or a DAC bundle, from its manifest."""
    manifest = require_manifest(path, "a DAC run or bundle")
    found = read_json_object(manifest, "a DAC run or bundle manifest").get("format")
    if found not in (RUN_FORMAT, BUNDLE_FORMAT):
        raise CfdeployError(f"{manifest}: not a DAC run or bundle manifest")
    return str(found)


def edit(
    source: Path,
    out: Path,
    settings: PredictSettings,
    *,
    base_model: Path | None = None,
    device: str | None = None,
    backend: str | None = None,
    refit_run: Path | None = None,
    force: bool = False,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_sample: Callable[[int], None] = lambda seed: None,
) -> dict[str, Any]:
    """Sample the edit of a run (PyTorch) or bundle (ONNX Runtime or TensorRT) for each seed into ``out``; returns
    ``edit.json``. ``refit_run`` samples another run on a bundle's graphs or engines, its U put in place of the bundle's."""
    sampler: Sampler
    with StagedDirectory(out, force, inputs=[source, *([refit_run] if refit_run else [])]) as staged:
        if source_format(source) == RUN_FORMAT:
            from cfdeploy.dac.predict import open_run

            if backend not in (None, "torch") or refit_run is not None:
                raise CfdeployError(f"{source}: a run samples with PyTorch; export it for --backend {backend or 'tensorrt'} or --run")
            sampler, described = open_run(source, settings, base_model, device or "cpu", on_stage)
        else:
            from cfdeploy.dac.bundle import open_bundle

            if base_model is not None:
                raise CfdeployError(f"{source}: a bundle carries its own graphs; --base-model is for runs")
            sampler, described = open_bundle(source, settings, device, on_stage, backend or "onnxruntime", refit_run)
        on_stage("sampling")
        images: list[np.ndarray] = []
        seconds: list[float] = []
        timesteps: list[int] = []
        for seed in settings.seeds:
            started = time.perf_counter()
            timesteps.clear()
            pixels = to_pixels(sampler.sample(seed, timesteps.append))
            staged.write_png(f"seed_{seed:04d}.png", pixels)
            images.append(pixels)
            seconds.append(time.perf_counter() - started)
            on_sample(seed)
        staged.write_png(CONTACT_SHEET, contact_sheet(images))
        report = {**described, "settings": asdict(settings), "seeds": settings.seeds, "unet_timesteps": list(timesteps),
                  "seconds_per_sample": seconds, "versions": versions()}
        staged.write_json("edit.json", report)
    return report

