"""The edit itself, independent of backend: text branch once, then mapper and generator batch by batch.

``edit`` returns arrays (the Python API); ``edit_to_directory`` writes what ``cfdeploy edit`` writes.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

import cfdeploy
from cfdeploy.bundle import TextLatentCache
from cfdeploy.errors import CfdeployError
from cfdeploy.outputs import StagedDirectory, to_uint8


class EditBackend(Protocol):
    """What a runtime must provide to run an edit; arrays are float32 numpy unless noted."""

    name: str
    description: str | None

    @property
    def size(self) -> int: ...

    @property
    def n_latent(self) -> int: ...

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray: ...

    def text_features(self, tokens: np.ndarray) -> np.ndarray: ...

    def text_latents(self, text_features: np.ndarray) -> np.ndarray: ...

    def edit_latents(self, w: np.ndarray, text_latents: np.ndarray, strength: float) -> np.ndarray: ...

    def synthesize(self, latents: np.ndarray) -> np.ndarray: ...


class StageTimer:
    """Wall-clock seconds per named stage, summed over batches."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


@dataclass
class EditJob:
    """One edit request: W+ latents and either a prompt or precomputed CLIP text features."""

    latents: np.ndarray
    prompt: str | None = None
    text_features: np.ndarray | None = None
    strength: float = 1.0
    batch_size: int = 4
    with_sources: bool = False
    text_cache: TextLatentCache | None = None
    refiner: Any = None  # cfdeploy.refine.Refiner: (w, w_hat) -> refined w_hat, with .curves and .settings

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.text_features is None):
            raise CfdeployError("give exactly one of a prompt (--text) or text features (--text-embedding)")
        if self.batch_size < 1:
            raise CfdeployError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass
class EditBatch:
    start: int
    w: np.ndarray
    w_hat: np.ndarray
    images: np.ndarray
    sources: np.ndarray | None


@dataclass
class EditResult:
    w_hat: np.ndarray
    images: np.ndarray
    sources: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)


def iter_edits(backend: EditBackend, job: EditJob, timer: StageTimer) -> Iterator[EditBatch]:
    """Compute the prompt's text branch once (or take it from the cache), then edit batch by batch."""
    text_latents = None
    if job.prompt is not None and job.text_cache is not None:
        with timer.stage("text_cache"):
            text_latents = job.text_cache.get(job.prompt)
    if text_latents is None:
        features = job.text_features
        if job.prompt is not None:
            with timer.stage("tokenize"):
                tokens = backend.tokenize([job.prompt])
            with timer.stage("text_encoder"):
                features = backend.text_features(tokens)
        assert features is not None
        with timer.stage("text_mapper"):
            text_latents = backend.text_latents(features)
        if job.prompt is not None and job.text_cache is not None:
            job.text_cache.put(job.prompt, text_latents)
    per_latent = text_latents.shape[0] > 1
    for start in range(0, job.latents.shape[0], job.batch_size):
        w = job.latents[start : start + job.batch_size]
        batch_text = text_latents[start : start + len(w)] if per_latent else text_latents
        with timer.stage("mapper"):
            w_hat = backend.edit_latents(w, batch_text, job.strength)
        if job.refiner is not None:
            with timer.stage("refine"):
                w_hat = job.refiner(w, w_hat)
        with timer.stage("generator"):
            images = backend.synthesize(w_hat)
        sources = None
        if job.with_sources:
            with timer.stage("source_generator"):
                sources = backend.synthesize(w)
        yield EditBatch(start, w, w_hat, images, sources)


def edit(backend: EditBackend, job: EditJob) -> EditResult:
    """Run the whole edit in memory: edited W+ ``[N, n, 512]`` and raw images ``[N, 3, S, S]``."""
    timer = StageTimer()
    batches = list(iter_edits(backend, job, timer))
    sources = np.concatenate([b.sources for b in batches]) if job.with_sources else None  # type: ignore[misc]
    return EditResult(
        np.concatenate([b.w_hat for b in batches]),
        np.concatenate([b.images for b in batches]),
        sources,
        dict(timer.seconds),
    )


def versions() -> dict[str, str]:
    found = {"cfdeploy": cfdeploy.__version__, "numpy": np.__version__, "python": platform.python_version()}
    for module in ("torch", "open_clip", "onnxruntime"):
        imported = sys.modules.get(module)
        if imported is not None:
            found[module] = getattr(imported, "__version__", "unknown")
    return found


def edit_to_directory(
    backend: EditBackend,
    job: EditJob,
    out: Path,
    *,
    force: bool = False,
    save_latents: bool = False,
    save_raw: bool = False,
    inputs: dict[str, Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write ``NNNNNN.png`` (source|edit pairs if ``job.with_sources``), optional ``latents.npy``/``images.npy``, and ``edit.json``.

    Everything is written to a staging directory first: on any error ``out`` is left as it was.
    """
    count, n_latent = job.latents.shape[:2]
    size = backend.size
    timer = StageTimer()
    started = time.perf_counter()
    with StagedDirectory(out, force) as staged:
        latents_file = staged.create_array("latents.npy", (count, n_latent, job.latents.shape[2])) if save_latents else None
        raw_file = staged.create_array("images.npy", (count, 3, size, size)) if save_raw else None
        for batch in iter_edits(backend, job, timer):
            end = batch.start + len(batch.w)
            with timer.stage("png"):
                pixels = to_uint8(batch.images)
                if batch.sources is not None:
                    pixels = np.concatenate([to_uint8(batch.sources), pixels], axis=2)
                for offset, image in enumerate(pixels):
                    staged.write_png(f"{batch.start + offset:06d}.png", image)
            if latents_file is not None:
                latents_file[batch.start : end] = batch.w_hat
            if raw_file is not None:
                raw_file[batch.start : end] = batch.images
            if on_batch is not None:
                on_batch(len(batch.w))
        for array in (latents_file, raw_file):
            if array is not None:
                array.flush()
        summary = {
            "backend": backend.name,
            "inputs": inputs or {},
            "prompt": job.prompt,
            "trained_description": backend.description,
            "strength": job.strength,
            "count": count,
            "size": size,
            "n_latent": n_latent,
            "batch_size": job.batch_size,
            "side_by_side": job.with_sources,
            "outputs": {
                "images": [f"{index:06d}.png" for index in range(count)],
                "latents": "latents.npy" if save_latents else None,
                "raw": "images.npy" if save_raw else None,
            },
            "refinement": None if job.refiner is None else {
                "settings": dataclasses.asdict(job.refiner.settings),
                "loss_curves": job.refiner.curves,
            },
            "timings_s": {name: round(seconds, 6) for name, seconds in timer.seconds.items()},
            "total_s": round(time.perf_counter() - started, 6),
            "versions": versions(),
        }
        staged.write_json("edit.json", summary)
    return summary
