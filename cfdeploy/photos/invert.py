"""Photos to W+ codes: find and align each face, then encode it with e4e. What ``cfdeploy invert`` and
``cfdeploy edit --images`` run, on any backend that can ``encode`` (torch with ``--encoder``, a bundle
exported with ``--encoder``), or on an e4e file alone (:class:`E4EInverter`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from cfdeploy.errors import CfdeployError
from cfdeploy.photos.align import E4E_SIZE, align_face
from cfdeploy.photos.images import load_photo, photo_paths
from cfdeploy.photos.landmarks import (
    DlibLandmarks,
    Face,
    NoFaceFound,
    read_landmarks,
    select_faces,
)
from cfdeploy.photos.preprocess import batch_inputs


class Encoder(Protocol):
    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def synthesize(self, latents: np.ndarray) -> np.ndarray: ...


@dataclass
class FaceCrop:
    """One aligned face, ready for the encoder, and what the index records about it."""

    source: Path
    face: int
    image: Image.Image
    record: dict[str, Any]


@dataclass
class Photos:
    """Every face found (in photo order), and the photos skipped for having none (``--skip-missing``)."""

    crops: list[FaceCrop]
    skipped: list[dict[str, str]] = field(default_factory=list)


def find_faces(
    arguments: Sequence[Path],
    *,
    aligned: bool = False,
    landmarks: Path | None = None,
    landmarks_model: Path | None = None,
    all_faces: bool = False,
    skip_missing: bool = False,
    on_photo: Callable[[Path], None] = lambda path: None,
) -> Photos:
    """Load each photo and align its face(s) the way e4e was trained (FFHQ crops).

    Exactly one landmark source: ``aligned`` (the photos are aligned crops already: only resized),
    ``landmarks`` (a file of points, one entry per photo) or ``landmarks_model`` (dlib's detector and
    68-point predictor).
    """
    if sum((aligned, landmarks is not None, landmarks_model is not None)) != 1:
        raise CfdeployError("give exactly one of --aligned, --landmarks FILE or --landmarks-model FILE")
    paths = photo_paths(list(arguments))
    listed = read_landmarks(landmarks, paths) if landmarks is not None else None
    detector = DlibLandmarks(landmarks_model) if landmarks_model is not None else None
    found = Photos([])
    for index, path in enumerate(paths):
        photo = load_photo(path)
        on_photo(path)
        if aligned:
            found.crops.append(FaceCrop(path, 0, photo, {"source": str(path), "face": 0, "aligned_input": True}))
            continue
        faces: list[Face] = listed[index] if listed is not None else detector.faces(photo)  # type: ignore[union-attr]
        try:
            chosen = select_faces(faces, path, all_faces)
        except NoFaceFound as missing:
            if not skip_missing:
                raise
            found.skipped.append({"source": str(path), "reason": str(missing)})
            continue
        for number, face in enumerate(chosen):
            crop = align_face(photo, face.points, source=str(path))
            record = {"source": str(path), "face": number, **face.record(), "alignment": crop.transform_record()}
            found.crops.append(FaceCrop(path, number, crop.image, record))
    if not found.crops:
        raise CfdeployError(f"no face to invert in {len(paths)} photo(s) (all skipped: no face found)")
    return found


def encode_faces(
    encoder: Encoder, crops: Sequence[FaceCrop], batch_size: int, on_batch: Callable[[int], None] = lambda done: None
) -> np.ndarray:
    """W+ codes ``[N, n, 512]`` float32 of the aligned faces, ``batch_size`` at a time."""
    codes = []
    for start in range(0, len(crops), batch_size):
        batch = crops[start : start + batch_size]
        codes.append(np.asarray(encoder.encode(batch_inputs([crop.image for crop in batch])), np.float32))
        on_batch(len(batch))
    return np.concatenate(codes)


def photo_pixels(crops: Sequence[FaceCrop], size: int) -> np.ndarray:
    """The aligned faces as ``[N, size, size, 3]`` uint8, beside the generator's images in side-by-side output."""
    return np.stack([np.asarray(crop.image.resize((size, size), Image.Resampling.LANCZOS)) for crop in crops])


def reconstruction_error(encoder: Encoder, crop: FaceCrop, codes: np.ndarray) -> float:
    """Relative L2 between an aligned face and the generator's image of its code, both at 256 px in [-1, 1]."""
    image = np.asarray(encoder.synthesize(codes[:1]), np.float32)[0]
    rendered = Image.fromarray(((np.clip(image, -1, 1) + 1) * 127.5 + 0.5).astype(np.uint8).transpose(1, 2, 0))
    face = batch_inputs([crop.image])[0]
    remade = batch_inputs([rendered.resize((E4E_SIZE, E4E_SIZE), Image.Resampling.BILINEAR)])[0]
    return float(np.linalg.norm(remade - face) / max(float(np.linalg.norm(face)), 1e-12))


def generator_mismatch(backend: Any, crop: FaceCrop, codes: np.ndarray) -> str | None:
    """A warning when the encoder was trained with another generator than the one that renders its codes."""
    trained_with = backend.encoder_generator_sha256
    renders_with = backend.generator_sha256()
    if trained_with is None or trained_with == renders_with:
        return None
    error = reconstruction_error(backend, crop, codes)
    return (
        f"the e4e encoder was trained with another generator (sha256 {trained_with[:12]}…) than the one that renders "
        f"its codes ({renders_with[:12]}…): e4e codes live in their own generator's W+; the reconstruction of "
        f"{crop.source.name} differs from the photo by rel L2 {error:.3f}"
    )


class E4EInverter:
    """The e4e file alone, in torch: its encoder, and its own generator for reconstructions (``invert --encoder``)."""

    name = "torch"

    def __init__(self, path: Path, device: str = "cpu") -> None:
        from cfdeploy.checkpoints import load_e4e
        from cfdeploy.devices import torch_device

        self.device = torch_device(device)
        loaded = load_e4e(path)
        self.encoder = loaded.encoder.eval().to(self.device)
        self.generator = loaded.generator.eval().to(self.device)

    @property
    def size(self) -> int:
        return int(self.generator.config.size)

    def _run(self, module: Any, array: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return np.asarray(
                module(torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(self.device)).float().cpu()
            )

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._run(self.encoder, images)

    def synthesize(self, latents: np.ndarray) -> np.ndarray:
        return self._run(self.generator, latents)
