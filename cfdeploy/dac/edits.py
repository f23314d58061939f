"""``dac edit``: sample an edit for a row of seeds and write it, from a run (PyTorch) or a bundle (ONNX Runtime).

Torch-free: a bundle's runtime never imports torch. A seed's initial noise is the official script's draw,
``torch.randn`` from ``torch.Generator(device).manual_seed(seed)``: a run draws it on its device, a bundle draws
the CPU generator's numbers in numpy (:mod:`cfdeploy.dac.torch_randn`), so a bundle samples what a run samples on
the CPU. ``--noise FILE`` gives the initial latents instead (another stream, e.g. a CUDA generator's, for a
bundle). Both paths write the same files: ``seed_NNNN.png`` per seed (``noise_NNNN.png`` per latent of a file),
``contact_sheet.png`` and ``edit.json`` (everything needed to reproduce the samples, the noise's source included).
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
from cfdeploy.inputs import read_json_object, read_npy, require_finite_array
from cfdeploy.outputs import StagedDirectory

SCHEDULERS = ("pndm", "ddim")
MAX_SAMPLES = 1024
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
        require_range(1, MAX_SAMPLES, samples=self.samples)
        require_range(0, 2**63 - 1 - self.samples, seed=self.seed)
        if self.scheduler not in SCHEDULERS:
            raise CfdeployError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.samples))


class Sampler(Protocol):
    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``[channels, side, side]`` of one sample's latents."""
        ...

    def seeded_latents(self, seed: int) -> tuple[np.ndarray, str]:
        """The initial latents ``[1, C, H, W]`` for ``seed`` and where they come from (for ``edit.json``)."""
        ...

    def sample(self, latents: np.ndarray, on_call: Callable[[int], None]) -> np.ndarray:
        """The edit from ``latents`` as ``[1, 3, H, W]`` in [0, 1]; ``on_call(t)`` before each UNet call."""
        ...


@dataclass(frozen=True)
class Draw:
    """One sample's initial latents, the PNG it becomes and where they come from."""

    name: str
    latents: np.ndarray
    source: str


@dataclass(frozen=True)
class NoiseFile:
    """``--noise``: finite float latents read before any model loads; their shape is checked once the model is open."""

    path: Path
    latents: np.ndarray

    @classmethod
    def read(cls, path: Path) -> NoiseFile:
        latents = read_npy(path, "initial latents")
        require_finite_array(latents, path, "initial latents")
        return cls(path, np.ascontiguousarray(latents, dtype=np.float32))

    def draws(self, latent_shape: tuple[int, ...]) -> list[Draw]:
        """One sample per latent: ``[N, C, H, W]``, or one sample's ``[C, H, W]``, of the model's latent shape."""
        latents = self.latents[None] if self.latents.ndim == len(latent_shape) else self.latents
        if latents.shape[1:] != tuple(latent_shape) or not 1 <= len(latents) <= MAX_SAMPLES:
            shape = ",".join(str(size) for size in latent_shape)
            raise CfdeployError(f"{self.path}: expected initial latents [N,{shape}] (N from 1 to {MAX_SAMPLES}) or [{shape}] "
                                f"for this model, found {list(self.latents.shape)}")
        return [Draw(f"noise_{index:04d}.png", latents[index : index + 1], f"file {self.path} [{index}]")
                for index in range(len(latents))]


def seeded_draws(sampler: Sampler, settings: PredictSettings) -> list[Draw]:
    """One sample per seed of ``settings``, each from its own generator."""
    return [Draw(f"seed_{seed:04d}.png", *sampler.seeded_latents(seed)) for seed in settings.seeds]


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
    noise: Path | None = None,
    force: bool = False,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_sample: Callable[[str], None] = lambda name: None,
) -> dict[str, Any]:
    """Sample the edit of a run (PyTorch) or bundle (ONNX Runtime or TensorRT) for each seed, or each latent of
    ``noise``, into ``out``; returns ``edit.json``. ``refit_run`` samples another run on a bundle's graphs or engines,
    its U put in place of the bundle's."""
    sampler: Sampler
    with StagedDirectory(out, force, inputs=[source, *(path for path in (refit_run, noise) if path)]) as staged:
        noise_file = NoiseFile.read(noise) if noise is not None else None
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
        samples = seeded_draws(sampler, settings) if noise_file is None else noise_file.draws(sampler.latent_shape)
        on_stage("sampling")
        images: list[np.ndarray] = []
        seconds: list[float] = []
        timesteps: list[int] = []
        for draw in samples:
            started = time.perf_counter()
            timesteps.clear()
            pixels = to_pixels(sampler.sample(draw.latents, timesteps.append))
            staged.write_png(draw.name, pixels)
            images.append(pixels)
            seconds.append(time.perf_counter() - started)
            on_sample(draw.name)
        staged.write_png(CONTACT_SHEET, contact_sheet(images))
        recorded = asdict(settings)
        if noise_file is not None:  # the file's latents were sampled, no seed
            recorded.update(seed=None, samples=len(samples))
        report = {**described, "settings": recorded, "seeds": None if noise_file else settings.seeds,
                  "noise": [draw.source for draw in samples], "unet_timesteps": list(timesteps),
                  "seconds_per_sample": seconds, "versions": versions()}
        staged.write_json("edit.json", report)
    return report

