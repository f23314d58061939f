"""The edit itself, independent of backend: text branch once, then mapper and generator batch by batch.

``edit`` returns arrays (the Python API); ``edit_to_directory`` writes what ``cfdeploy edit`` writes.
Several prompts compose, ``w_hat = w + Σᵢ sᵢ·0.1·Δᵢ``: an extension beyond the paper's single edit.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cfdeploy.bundle import TextLatentCache
from cfdeploy.environment import versions
from cfdeploy.errors import CfdeployError, require_finite
from cfdeploy.identity import identity_scores
from cfdeploy.inputs import broadcast_latents, load_latents, seeded_z
from cfdeploy.outputs import StagedDirectory, to_uint8

# One vocabulary for the pipeline: each stage is named after the network it runs (the graph names of
# cfdeploy.contracts), plus the host-side work around them. Timers, edit.json and bench columns use these.
STAGES = (
    "align",
    "encoder",
    "tokenize",
    "clip_text",
    "text_mapper",
    "latent_editor",
    "refine",
    "generator",
    "source_generator",
    "identity",
    "png",
)
DEFAULT_PNG_COMPRESSION = 6  # Pillow's default zlib level; 1 encodes a 1024 px image several times faster
DEFAULT_BATCH_SIZE = 4  # codes per generator call
MAX_SAMPLED_CODES = 100_000  # --num: 3.7 GB of W+ codes at 18 levels; more is a typo, not a job


class EditBackend(Protocol):
    """What a runtime provides to run an edit. Arrays are float32 numpy, batch first, unless noted.

    Each method runs one network of the pipeline (its stage name in brackets)::

        tokenize [tokenize] → text_features [clip_text] → text_latents [text_mapper]
        → edit_latents [latent_editor] → synthesize [generator];   sample_w runs [mapping], encode [encoder],
        identity_features [identity]

    Backends are opened with :func:`cfdeploy.backends.open_backend`.
    """

    name: str
    description: str | None  # the prompt the checkpoint was trained for, if it records one
    text_cache: TextLatentCache | None  # per-prompt text latents kept between runs (bundles), or None

    @property
    def size(self) -> int:
        """Image side in pixels."""

    @property
    def n_latent(self) -> int:
        """W+ levels (18 at 1024 px)."""

    @property
    def style_dim(self) -> int:
        """Width of one W code (512)."""

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts to CLIP token ids ``[P, 77]`` int64 (over 77 tokens is refused)."""

    def text_features(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids ``[P, 77]`` to unnormalised CLIP text features ``[P, 512]``."""

    def text_latents(self, text_features: np.ndarray) -> np.ndarray:
        """Text features ``[P, 512]`` to per-level text latents ``[P, n_latent, 512]``."""

    def edit_latents(self, w: np.ndarray, text_latents: np.ndarray, strength: float) -> np.ndarray:
        """``w_hat = w + strength·0.1·mapper(w, text_latents)``.

        Args:
            w: source W+ codes ``[B, n_latent, 512]``.
            text_latents: ``[1 | B, n_latent, 512]`` (one prompt for all, or one per code).
            strength: 1 is the official edit, 0 reproduces the source.

        Returns:
            The edited W+ codes ``[B, n_latent, 512]``.
        """

    def synthesize(self, latents: np.ndarray) -> np.ndarray:
        """W+ codes ``[B, n_latent, 512]`` to images ``[B, 3, size, size]`` in about [-1, 1]."""

    def sample_w(self, z: np.ndarray, truncation: float) -> np.ndarray:
        """Gaussian ``z [B, 512]`` to W ``[B, 512]``, truncated toward the mean W by ``truncation``."""

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Aligned photos ``[B, 3, 256, 256]`` in [-1, 1] to W+ codes with the e4e encoder, where it has one."""

    def generator_sha256(self) -> str:
        """Hash of the generator's weights."""

    @property
    def encoder_generator_sha256(self) -> str | None:
        """Hash of the generator the e4e encoder was trained with (its codes live in that one's W+), if any."""

    def identity_features(self, faces: np.ndarray) -> np.ndarray:
        """Faces at 256 px ``[B, 3, 256, 256]`` in [-1, 1] to unit ArcFace embeddings ``[B, 512]`` (the official
        identity loss's crop and pooling to 112 px inside), where it has the identity network."""

    @property
    def identity_source(self) -> str | None:
        """Where its identity network comes from (the ArcFace weights, the bundle's graph), or None without one."""


class StageTimer:
    """Wall-clock seconds per named stage (:data:`STAGES`), summed over batches."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


class EditedImages(Protocol):
    """Takes each edited image as the edit makes it (``cfdeploy edit --images`` pastes them back into the photos)."""

    def add(self, row: int, pixels: np.ndarray) -> None:
        """The edit of code ``row``, ``[S, S, 3]`` uint8."""

    def record(self) -> list[dict[str, Any]]:
        """What ``edit.json`` records under ``photos``."""


@dataclass(frozen=True)
class TextEdit:
    """One prompt of an edit (or its CLIP text features) and its strength."""

    prompt: str | None
    text_features: np.ndarray | None
    strength: float


@dataclass
class EditJob:
    """One edit request: W+ latents and either prompts or precomputed CLIP text features.

    Args:
        latents: source W+ codes ``[N, n_latent, 512]`` float32.
        prompt: the text to edit toward, or several texts; or
        text_features: unnormalised CLIP text features ``[1 | N, 512]`` (bypasses CLIP), or a list of such arrays,
            one per edit.
        strength: edit strength S in ``w_hat = w + S·0.1·delta`` (1 is the official edit); with several prompts,
            one for all or one per prompt.
        batch_size: codes per generator call.
        with_sources: also render the unedited codes (for before|after pairs).
        refiner: a :class:`cfdeploy.refine.Refiner` run on each batch's ``w_hat``, or None.
        identity: score each edit with the backend's identity network (:mod:`cfdeploy.identity`).
        faces: the aligned photos the codes came from, ``[N, 3, 256, 256]`` in [-1, 1]: the identity score's
            reference (without them, the source code's image is).

    Several prompts compose into one edit, each delta taken from the source codes:
    ``w_hat = w + Σᵢ sᵢ·0.1·Δᵢ`` (:func:`compose`). The paper edits one prompt at a time.
    """

    latents: np.ndarray
    prompt: str | Sequence[str] | None = None
    text_features: np.ndarray | Sequence[np.ndarray] | None = None
    strength: float | Sequence[float] = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE
    with_sources: bool = False
    refiner: Any = None
    identity: bool = False
    faces: np.ndarray | None = None
    edits: tuple[TextEdit, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.text_features is None):
            raise CfdeployError("give exactly one of a prompt (--text) or text features (--text-embedding)")
        if self.batch_size < 1:
            raise CfdeployError(f"batch size must be at least 1, got {self.batch_size}")
        self.edits = text_edits(self.prompt, self.text_features, self.strength)
        if self.faces is not None and len(self.faces) != len(self.latents):
            raise CfdeployError(f"{len(self.faces)} faces for {len(self.latents)} codes: give one face per code")


def paired_strengths(prompts: int, strength: float | Sequence[float]) -> list[float]:
    """One strength per prompt: those given, or the one given for all; any other count is refused."""
    if prompts < 1:
        raise CfdeployError("give at least one prompt (--text) or text features (--text-embedding)")
    strengths = [float(value) for value in (strength if isinstance(strength, Sequence) else [strength])]
    if len(strengths) not in (1, prompts):
        raise CfdeployError(
            f"{len(strengths)} strengths for {prompts} prompts: give one --strength for all, or one per prompt"
        )
    for value in strengths:
        require_finite(strength=value)
    return strengths * prompts if len(strengths) == 1 else strengths


def text_edits(
    prompt: str | Sequence[str] | None,
    text_features: np.ndarray | Sequence[np.ndarray] | None,
    strength: float | Sequence[float],
) -> tuple[TextEdit, ...]:
    """Each prompt (or text features) with its strength; one strength serves every prompt."""
    texts: list[str | None] = [prompt] if isinstance(prompt, str) else list(prompt or [])
    features: list[np.ndarray | None] = (
        [text_features] if isinstance(text_features, np.ndarray) else list(text_features or [])
    )
    strengths = paired_strengths(len(texts or features), strength)
    if texts:
        return tuple(TextEdit(text, None, value) for text, value in zip(texts, strengths, strict=True))
    return tuple(TextEdit(None, array, value) for array, value in zip(features, strengths, strict=True))


@dataclass
class EditBatch:
    start: int
    w: np.ndarray
    w_hat: np.ndarray
    images: np.ndarray
    sources: np.ndarray | None  # rendered for side-by-side pairs or for the identity score
    identity: dict[str, np.ndarray] | None = None


@dataclass
class EditResult:
    """What :func:`edit` returns: edited codes, images (and sources, identity scores if asked), seconds per stage."""

    w_hat: np.ndarray
    images: np.ndarray
    sources: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)
    identity: dict[str, np.ndarray] | None = None


def check_sampling(seed: int, num: int, truncation: float) -> None:
    """``--seed``, ``--num`` and ``--truncation``, checked before anything is loaded or allocated."""
    if not 0 <= seed < 2**63:
        raise CfdeployError(f"--seed must be from 0 to 2^63-1, got {seed}")
    require_finite(truncation=truncation)
    if not 1 <= num <= MAX_SAMPLED_CODES:
        raise CfdeployError(f"--num must be between 1 and {MAX_SAMPLED_CODES:,}, got {num}")


def resolve_latents(
    backend: EditBackend,
    latents: Path | None = None,
    seed: int | None = None,
    num: int = 1,
    truncation: float = 0.7,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The W+ codes to edit, from a file or sampled from a seed, and how they were obtained (for edit.json)."""
    if (latents is None) == (seed is None):
        raise CfdeployError("give exactly one of --latents or --seed")
    if latents is not None:
        return load_latents(latents, backend.n_latent, backend.style_dim), {"latents": str(latents)}
    assert seed is not None
    check_sampling(seed, num, truncation)
    return sample_codes(backend, seed, num, truncation), {"seed": seed, "num": num, "truncation": truncation}


def sample_codes(backend: EditBackend, seed: int, num: int, truncation: float) -> np.ndarray:
    """W+ codes ``[num, n, 512]`` from ``seed`` through the backend's mapping network, truncated toward the mean W."""
    w = backend.sample_w(seeded_z(seed, num, backend.style_dim), truncation)
    return finite_result(
        broadcast_latents(w, backend.n_latent, backend.style_dim, f"seed {seed}"),
        "sampled codes",
        f"--truncation {truncation}",
    )


def prompt_mismatch(backend: EditBackend, prompt: str | None) -> str | None:
    """A warning when ``prompt`` is not what the checkpoint was trained for: CF-CLIP mappers are per prompt."""
    trained = backend.description
    if prompt is None or not trained or prompt.strip().lower() == trained.strip().lower():
        return None
    return (
        f"this checkpoint was trained for {trained!r}, not {prompt!r}; "
        "CF-CLIP mappers are per prompt, so expect a weak or odd edit"
    )


def text_branch(
    backend: EditBackend,
    prompt: str | None,
    text_features: np.ndarray | None,
    timer: StageTimer,
    tokens: np.ndarray | None = None,
) -> np.ndarray:
    """A prompt's text latents ``[1, n, 512]`` from the backend's cache or CLIP and the text mapper (cached after),
    or text features' ``[1 | N, n, 512]`` through the text mapper. ``tokens``: the prompt's, tokenised already
    (a server does it off the thread its networks run on)."""
    cache = backend.text_cache
    if prompt is not None and cache is not None:
        with timer.stage("text_cache"):
            cached = cache.get(prompt)
        if cached is not None:
            return cached
    features = text_features
    if prompt is not None:
        if tokens is None:
            with timer.stage("tokenize"):
                tokens = backend.tokenize([prompt])
        with timer.stage("clip_text"):
            features = backend.text_features(tokens)
    assert features is not None
    with timer.stage("text_mapper"):
        text_latents = backend.text_latents(features)
    if prompt is not None and cache is not None:
        cache.put(prompt, text_latents)
    return text_latents


def edit_codes(backend: EditBackend, w: np.ndarray, text_latents: np.ndarray, strength: float) -> np.ndarray:
    """The latent editor one code at a time: its matrix products round differently for different batch sizes
    (~2e-7, enough to flip a few pixels), and an edit must not depend on how codes were batched: ``--batch-size``,
    ``cfdeploy serve``'s dynamic batching and ``cfdeploy batch`` all give the same bytes. The mapper is cheap."""
    per_code = text_latents.shape[0] > 1
    w_hat = np.concatenate(
        [
            backend.edit_latents(
                w[index : index + 1], text_latents[index : index + 1] if per_code else text_latents, strength
            )
            for index in range(len(w))
        ]
    )
    return finite_result(w_hat, "edited codes", f"--strength {strength}")


def compose(w: np.ndarray, edited: Sequence[np.ndarray]) -> np.ndarray:
    """Several prompts' edits of the same codes as one: ``w + Σᵢ (edited_i − w)``, which is ``w + Σᵢ sᵢ·0.1·Δᵢ``
    with every delta taken from the source codes (no prompt edits another's result), summed in float64.
    One prompt's edit comes back as it is: the paper's edit, bit for bit."""
    if len(edited) == 1:
        return edited[0]
    deltas = np.stack([codes.astype(np.float64) for codes in edited]) - w
    return finite_result((w + deltas.sum(axis=0)).astype(np.float32), "edited codes", "the sum of the edits")


def synthesize(backend: EditBackend, latents: np.ndarray) -> np.ndarray:
    """The generator's images for ``latents``, refused if any value is NaN/inf (never written or returned)."""
    return finite_result(backend.synthesize(latents), "images", "the codes")


def finite_result(array: np.ndarray, what: str, suspect: str) -> np.ndarray:
    """``array`` if every value is finite: a non-finite result is an error, never a file or a reply."""
    if not np.isfinite(array).all():
        raise CfdeployError(f"the {what} hold NaN/inf values: {suspect} took the networks out of float32's range")
    return array


def iter_edits(backend: EditBackend, job: EditJob, timer: StageTimer) -> Iterator[EditBatch]:
    """Compute each prompt's text branch once (or take it from the backend's cache), then edit batch by batch."""
    branches = [(text_branch(backend, edit.prompt, edit.text_features, timer), edit.strength) for edit in job.edits]
    for start in range(0, job.latents.shape[0], job.batch_size):
        w = job.latents[start : start + job.batch_size]
        with timer.stage("latent_editor"):
            w_hat = compose(
                w,
                [
                    edit_codes(backend, w, text[start : start + len(w)] if text.shape[0] > 1 else text, strength)
                    for text, strength in branches
                ],
            )
        if job.refiner is not None:
            with timer.stage("refine"):
                w_hat = job.refiner(w, w_hat)
        with timer.stage("generator"):
            images = synthesize(backend, w_hat)
        sources = None
        if job.with_sources or job.identity:
            with timer.stage("source_generator"):
                sources = synthesize(backend, w)
        identity = None
        if job.identity:
            assert sources is not None
            faces = None if job.faces is None else job.faces[start : start + len(w)]
            with timer.stage("identity"):
                identity = identity_scores(backend, images, sources, faces)
        yield EditBatch(start, w, w_hat, images, sources, identity)


def edit(backend: EditBackend, job: EditJob) -> EditResult:
    """Run the whole edit in memory.

    Args:
        backend: from :func:`cfdeploy.backends.open_backend`.
        job: the codes, the prompt or text features, and the edit settings.

    Returns:
        Edited W+ ``[N, n, 512]``, raw images ``[N, 3, S, S]`` (and the sources' if
        ``job.with_sources``), seconds per stage, and the identity scores ``[N]`` by name if ``job.identity``.
    """
    timer = StageTimer()
    batches = list(iter_edits(backend, job, timer))
    sources = np.concatenate([b.sources for b in batches if b.sources is not None]) if job.with_sources else None
    return EditResult(
        np.concatenate([b.w_hat for b in batches]),
        np.concatenate([b.images for b in batches]),
        sources,
        dict(timer.seconds),
        joined_scores([b.identity for b in batches if b.identity is not None]) if job.identity else None,
    )


def joined_scores(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each batch's identity scores, in code order."""
    return {name: np.concatenate([scores[name] for scores in batches]) for name in batches[0]}


def identity_record(backend: EditBackend, job: EditJob, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """``edit.json``'s ``identity``: what was compared, with which network, and the cosines per code (``row``)."""
    return {
        "network": backend.identity_source,
        "reference": "the aligned photo" if job.faces is not None else "the source code's image",
        "scores": [
            {"row": row, **{name: round(float(values[row]), 6) for name, values in scores.items()}}
            for row in range(len(job.latents))
        ],
    }


def edit_to_directory(
    backend: EditBackend,
    job: EditJob,
    staged: StagedDirectory,
    *,
    save_latents: bool = False,
    save_raw: bool = False,
    png_compression: int = DEFAULT_PNG_COMPRESSION,
    inputs: dict[str, Any] | None = None,
    on_image: Callable[[], None] | None = None,
    photos: np.ndarray | None = None,
    prior_timings: dict[str, float] | None = None,
    pasted: EditedImages | None = None,
    crops: str | None = "",
) -> dict[str, Any]:
    """Write ``NNNNNN.png`` (source|edit pairs if ``job.with_sources``), optional ``latents.npy``/``images.npy``,
    and ``edit.json``.

    Everything goes into ``staged``, which the caller entered before loading models; it replaces the
    output directory only when the caller's block ends without error. ``photos`` (uint8 ``[N, S, S, 3]``,
    the aligned faces the codes came from) lead each side-by-side row; ``prior_timings`` are stages the
    caller ran first (alignment, encoding), counted in ``total_s``. ``pasted`` takes each edit too (the
    ``paste`` stage); ``crops`` is the folder the images go to (``""``: the directory itself; None: not
    written). Returns what ``edit.json`` holds.
    """
    count, n_latent = job.latents.shape[:2]
    size = backend.size
    timer = StageTimer()
    timer.seconds.update(prior_timings or {})
    started = time.perf_counter()
    latents_file = staged.open_array("latents.npy", (count, n_latent, job.latents.shape[2])) if save_latents else None
    raw_file = staged.open_array("images.npy", (count, 3, size, size)) if save_raw else None
    if crops:
        (staged.path / crops).mkdir()
    names = [f"{crops}/{index:06d}.png" if crops else f"{index:06d}.png" for index in range(count)]
    scores = []
    for batch in iter_edits(backend, job, timer):
        edits = to_uint8(batch.images)
        pixels = edits
        if batch.identity is not None:
            scores.append(batch.identity)
        if job.with_sources and batch.sources is not None:
            pixels = np.concatenate([to_uint8(batch.sources), pixels], axis=2)
            if photos is not None:
                pixels = np.concatenate([photos[batch.start : batch.start + len(pixels)], pixels], axis=2)
        for offset, image in enumerate(pixels):
            if crops is not None:
                with timer.stage("png"):
                    staged.write_png(names[batch.start + offset], image, png_compression)
            if pasted is not None:
                with timer.stage("paste"):
                    pasted.add(batch.start + offset, edits[offset])
            if on_image is not None:
                on_image()
        if latents_file is not None:
            latents_file.write(batch.w_hat)
        if raw_file is not None:
            raw_file.write(batch.images)
    for array in (latents_file, raw_file):
        if array is not None:
            array.close()
    compiled = getattr(backend, "compile_s", None)
    if compiled is not None and compiled():  # torch --compile: part of the generator's time was compiling
        timer.seconds["generator_compile"] = compiled()
    describe = getattr(backend, "describe", None)
    summary = {
        "backend": backend.name,
        "runtime": describe() if describe is not None else None,  # device, threads, precisions, graph cache hits
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
            "images": names if crops is not None else [],
            "latents": "latents.npy" if save_latents else None,
            "raw": "images.npy" if save_raw else None,
        },
        "photos": pasted.record() if pasted is not None else None,
        "identity": identity_record(backend, job, joined_scores(scores)) if scores else None,
        "refinement": None
        if job.refiner is None
        else {
            "settings": dataclasses.asdict(job.refiner.settings),
            "loss_curves": job.refiner.curves,
        },
        "timings_s": {name: round(seconds, 6) for name, seconds in timer.seconds.items()},
        "total_s": round(time.perf_counter() - started + sum((prior_timings or {}).values()), 6),
        "versions": versions(),
    }
    staged.write_json("edit.json", summary)
    return summary
