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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cfdeploy.dac.bundle import (
    BUNDLE_BACKENDS,
    BUNDLE_FORMAT,
    BundleSampler,
    DacBundle,
    onnxruntime_networks,
    refit_inputs,
)
from cfdeploy.dac.run import DESCRIBED_SETTINGS, require_manifest
from cfdeploy.dac.run import FORMAT as RUN_FORMAT
from cfdeploy.dac.sampling import NoiseFile, PredictSettings, Sampler, seeded_draws
from cfdeploy.environment import versions
from cfdeploy.errors import CfdeployError
from cfdeploy.files import read_json_object
from cfdeploy.outputs import StagedDirectory

CONTACT_SHEET = "contact_sheet.png"


def to_pixels(unit: np.ndarray) -> np.ndarray:
    """``[1, 3, H, W]`` in [0, 1] → ``[H, W, 3]`` uint8, rounded as diffusers' ``numpy_to_pil`` rounds."""
    pixels: np.ndarray = (unit[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return pixels


def finite_sample(unit: np.ndarray, name: str, settings: PredictSettings) -> np.ndarray:
    """A sampled image, refused if any value is NaN/inf: written, it would be a black PNG that looks like a result."""
    if not np.isfinite(unit).all():
        raise CfdeployError(
            f"{name}: the sample holds NaN/inf values: the networks left float32's range "
            f"(--guidance {settings.guidance:g}, --beta {settings.beta:g}); nothing was written"
        )
    return unit


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
    expect_manifest: str | None = None,
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
                raise CfdeployError(
                    f"{source}: a run samples with PyTorch; export it (cfdeploy dac export) for "
                    f"--backend {backend or 'tensorrt'} or to sample it on a bundle"
                )
            sampler, described = open_run(source, settings, base_model, device or "cpu", on_stage)
        else:
            if base_model is not None:
                raise CfdeployError(f"{source}: a bundle carries its own graphs; --base-model is for runs")
            sampler, described = open_bundle(
                source, settings, device, on_stage, backend or "onnxruntime", refit_run, expect_manifest
            )
        samples = seeded_draws(sampler, settings) if noise_file is None else noise_file.draws(sampler.latent_shape)
        on_stage("sampling")
        images: list[np.ndarray] = []
        seconds: list[float] = []
        timesteps: list[int] = []
        for draw in samples:
            started = time.perf_counter()
            timesteps.clear()
            pixels = to_pixels(finite_sample(sampler.sample(draw.latents, timesteps.append), draw.name, settings))
            staged.write_png(draw.name, pixels)
            images.append(pixels)
            seconds.append(time.perf_counter() - started)
            on_sample(draw.name)
        staged.write_png(CONTACT_SHEET, contact_sheet(images))
        recorded = asdict(settings)
        if noise_file is not None:  # the file's latents were sampled, no seed
            recorded.update(seed=None, samples=len(samples))
        report = {
            **described,
            "settings": recorded,
            "seeds": None if noise_file else settings.seeds,
            "noise": [draw.source for draw in samples],
            "unet_timesteps": list(timesteps),
            "seconds_per_sample": seconds,
            "versions": versions(),
        }
        staged.write_json("edit.json", report)
    return report


def open_bundle(
    path: Path,
    settings: PredictSettings,
    device: str | None,
    on_stage: Callable[[str], None],
    backend: str = "onnxruntime",
    refit_run: Path | None = None,
    expect_manifest: str | None = None,
) -> tuple[BundleSampler, dict[str, Any]]:
    """A sampler for the bundle at ``path`` (sampling ``refit_run`` instead, its U in place of the bundle's), and
    what ``edit.json`` records of it."""
    if backend not in BUNDLE_BACKENDS:
        raise CfdeployError(f"--backend {backend}: a bundle runs on {' or '.join(BUNDLE_BACKENDS)}")
    on_stage("checking the bundle")
    bundle = DacBundle(path, expect_manifest)
    sampled, weights, context = bundle.settings, None, None
    if refit_run is not None:
        sampled, weights, context = refit_inputs(bundle, refit_run, settings)
    on_stage("loading the graphs")
    networks: Any
    if backend == "tensorrt":
        from cfdeploy.dac.engines import describe, tensorrt_networks

        networks = tensorrt_networks(bundle, device or "cuda", weights)
        described = describe(networks)
    else:
        networks = onnxruntime_networks(bundle, device or "cpu", weights)
        described = networks.describe()
    sampler = BundleSampler(bundle, settings, networks, sampled.eta, context)
    return sampler, {
        "bundle": str(path),
        **described,
        "unet_mode": bundle.unet_mode,
        "refit_run": str(refit_run) if refit_run else None,
        **{key: getattr(sampled, key) for key in DESCRIBED_SETTINGS},
    }
