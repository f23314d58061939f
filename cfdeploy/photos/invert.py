"""Photos to W+ codes: find and align each face, then encode it with e4e. What ``cfdeploy invert`` and
``cfdeploy edit --images`` run, on any backend that can ``encode`` (torch with ``--encoder``, a bundle
exported with ``--encoder``), or on an e4e file alone (:class:`E4EInverter`). And back: the edited faces
pasted into their photos (:func:`edit_photo`, :class:`PhotoPaster`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from PIL import Image

from cfdeploy.errors import CfdeployError
from cfdeploy.outputs import save_png, to_uint8
from cfdeploy.photos.align import E4E_SIZE, AlignedFace, align_face
from cfdeploy.photos.images import Photo, PhotoEncoding, load_photo, photo_paths, read_photo, save_photo
from cfdeploy.photos.landmarks import (
    DlibLandmarks,
    Face,
    NoFaceFound,
    read_landmarks,
    select_faces,
)
from cfdeploy.photos.paste import FaceEdit, MaskSettings, PastedPhoto, paste_faces
from cfdeploy.photos.preprocess import ENCODER_SIZE, batch_inputs

RESERVED_NAMES = frozenset({"edit.json", "latents.npy", "images.npy", "crops", "masks"})  # what else edit writes


class Encoder(Protocol):
    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def synthesize(self, latents: np.ndarray) -> np.ndarray: ...


@dataclass
class FaceCrop:
    """One aligned face, ready for the encoder, and what the index records about it; for a face found in a
    photo (not ``--aligned``), its landmarks and the alignment, which paste it back."""

    source: Path
    face: int
    image: Image.Image
    record: dict[str, Any]
    landmarks: Face | None = None
    alignment: AlignedFace | None = None


class Photos:
    """The faces of the photos, found as iteration reaches them: iterating decodes and aligns one photo at a
    time and yields its faces, so a run holds one decoded photo and the small aligned crops, however many photos
    it is given (an encoder consuming batches decodes per batch). ``crops`` (in photo order) and ``skipped``
    (photos without a face, with ``skip_missing``) grow as it goes; a photo that cannot be read stops the
    iteration when it is reached, after the faces before it were yielded.
    """

    def __init__(self, paths: list[Path], faces_of: Callable[[int, Path], list[FaceCrop]], skip_missing: bool) -> None:
        self.paths = paths
        self.crops: list[FaceCrop] = []
        self.skipped: list[dict[str, str]] = []
        self._faces_of = faces_of
        self._skip_missing = skip_missing
        self._next = 0

    def __iter__(self) -> Iterator[FaceCrop]:
        yield from list(self.crops)
        while self._next < len(self.paths):
            index, path = self._next, self.paths[self._next]
            self._next += 1
            try:
                crops = self._faces_of(index, path)
            except NoFaceFound as missing:
                if not self._skip_missing:
                    raise
                self.skipped.append({"source": str(path), "reason": str(missing)})
                continue
            self.crops.extend(crops)
            yield from crops
        if not self.crops:
            raise CfdeployError(f"no face to invert in {len(self.paths)} photo(s) (all skipped: no face found)")

    def complete(self) -> Photos:
        """Every photo's faces found (each photo decoded in turn)."""
        for _ in self:
            pass
        return self


def photo_faces(
    arguments: Sequence[Path],
    *,
    aligned: bool = False,
    landmarks: Path | None = None,
    landmarks_model: Path | None = None,
    all_faces: bool = False,
    skip_missing: bool = False,
    on_photo: Callable[[Path], None] = lambda path: None,
) -> Photos:
    """The photos' faces, aligned the way e4e was trained (FFHQ crops) as :class:`Photos` reaches them.

    Exactly one landmark source: ``aligned`` (the photos are aligned crops already: only resized to the
    encoder's input size, as its preprocessing resizes them), ``landmarks`` (a file of points, one entry per
    photo) or ``landmarks_model`` (dlib's detector and 68-point predictor). The arguments, the landmarks file
    and the model are checked here, before any photo is decoded.
    """
    if sum((aligned, landmarks is not None, landmarks_model is not None)) != 1:
        raise CfdeployError("give exactly one of --aligned, --landmarks FILE or --landmarks-model FILE")
    paths = photo_paths(list(arguments))
    listed = read_landmarks(landmarks, paths) if landmarks is not None else None
    detector = DlibLandmarks(landmarks_model) if landmarks_model is not None else None

    def faces_of(index: int, path: Path) -> list[FaceCrop]:
        photo = load_photo(path)
        on_photo(path)
        if aligned:
            resized = photo.resize((ENCODER_SIZE, ENCODER_SIZE), Image.Resampling.BILINEAR)
            return [FaceCrop(path, 0, resized, {"source": str(path), "face": 0, "aligned_input": True})]
        faces = listed[index] if listed is not None else detector.faces(photo)  # type: ignore[union-attr]
        return align_faces(photo, select_faces(faces, path, all_faces, size=photo.size), path)

    return Photos(paths, faces_of, skip_missing)


def align_faces(photo: Image.Image, faces: Sequence[Face], path: Path) -> list[FaceCrop]:
    """Each face of ``photo`` (RGB, read from ``path``) aligned as e4e was trained, with what pastes it back."""
    crops = []
    for number, face in enumerate(faces):
        crop = align_face(photo, face.points, source=f"{path} (face {number})" if len(faces) > 1 else str(path))
        record = {"source": str(path), "face": number, **face.record(), "alignment": crop.transform_record()}
        crops.append(FaceCrop(path, number, crop.image, record, face, crop))
    return crops


def face_edits(crops: Sequence[FaceCrop], edited: Sequence[np.ndarray]) -> list[FaceEdit]:
    """The faces' edits (``[S, S, 3]`` uint8 each), ready to paste back where the crops came from."""
    edits = []
    for crop, pixels in zip(crops, edited, strict=True):
        if crop.landmarks is None or crop.alignment is None:
            raise ValueError(f"{crop.source} was given aligned: its face has no place in a photo to go back to")
        edits.append(FaceEdit(Image.fromarray(pixels), crop.landmarks.points, crop.alignment))
    return edits


def encode_faces(
    encoder: Encoder, crops: Iterable[FaceCrop], batch_size: int, on_batch: Callable[[int], None] = lambda done: None
) -> np.ndarray:
    """W+ codes ``[N, n, 512]`` float32 of the aligned faces, ``batch_size`` at a time; from :class:`Photos`, each
    batch's photos are decoded when the batch is taken."""
    codes = []
    faces = iter(crops)
    while batch := list(itertools.islice(faces, batch_size)):
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


def edit_photo(
    backend: Any,
    photo: Photo,
    faces: Sequence[Face],
    *,
    prompt: str | Sequence[str] | None = None,
    text_features: np.ndarray | Sequence[np.ndarray] | None = None,
    strength: float | Sequence[float] = 1.0,
    mask: MaskSettings | None = None,
    identity: bool = False,
) -> PastedPhoto:
    """``photo`` with each of ``faces`` aligned, inverted, edited toward the prompt (or text features; several
    compose) and pasted back: what ``cfdeploy edit --images`` writes, in memory. Save it with
    :func:`cfdeploy.photos.images.save_photo`. With ``identity`` (a backend with the identity network), each face's
    record holds its ``identity`` scores: the aligned face against its reconstruction and its edit."""
    from cfdeploy.editing import DEFAULT_BATCH_SIZE, EditJob, edit

    mask = mask or MaskSettings()
    mask.check()
    if not faces:
        raise NoFaceFound(f"{photo.source}: no face found")
    crops = align_faces(photo.image, faces, Path(photo.source))
    codes = encode_faces(backend, crops, DEFAULT_BATCH_SIZE)
    aligned = batch_inputs([crop.image for crop in crops]) if identity else None
    result = edit(backend, EditJob(codes, prompt, text_features, strength, identity=identity, faces=aligned))
    pasted = paste_faces(photo.image, face_edits(crops, list(to_uint8(result.images))), mask)
    if result.identity is not None:
        for row, record in enumerate(pasted.faces):
            record["identity"] = {name: float(scores[row]) for name, scores in result.identity.items()}
    return pasted


@dataclass(frozen=True)
class PasteSettings:
    """``cfdeploy edit --images``' paste-back: the mask, the output encoding, and whether masks are written too."""

    mask: MaskSettings = field(default_factory=MaskSettings)
    encoding: PhotoEncoding = field(default_factory=PhotoEncoding)
    save_mask: bool = False


def pasted_names(photos: Sequence[Path]) -> list[str]:
    """Each photo's output name (its own file name), refused when two photos, or a photo and another output,
    would share one (compared without case, as some file systems do)."""
    named: dict[str, Path] = {}
    for photo in photos:
        key = photo.name.lower()
        if key in RESERVED_NAMES:
            raise CfdeployError(f"{photo}: its edited copy would be written as {photo.name}, a name edit uses itself")
        if key in named:
            raise CfdeployError(
                f"{named[key]} and {photo} would both be written as {photo.name}; give photos with different names"
            )
        named[key] = photo
    return [photo.name for photo in photos]


class PhotoPaster:
    """Pastes each photo's edited faces back as the edit makes them (they come in photo order) and writes the
    photo under its own name once its last face is in, with ``save_mask`` its mask as ``masks/<name>.png``.

    ``write(name, writer)`` writes a file of the output directory. The photo is read again from its file
    (keeping every photo decoded until its faces are edited would hold them all in memory).
    """

    def __init__(
        self,
        crops: Sequence[FaceCrop],
        write: Callable[[str, Callable[[BinaryIO], None]], None],
        settings: PasteSettings | None = None,
    ) -> None:
        self.crops = crops
        self.write = write
        self.settings = settings or PasteSettings()
        photos = list(dict.fromkeys(crop.source for crop in crops))
        self.names = dict(zip(photos, pasted_names(photos), strict=True))
        self.pending: list[int] = []
        self.edited: list[np.ndarray] = []
        self.records: list[dict[str, Any]] = []

    def add(self, row: int, pixels: np.ndarray) -> None:
        """Take the edit of face ``row`` (``[S, S, 3]`` uint8); paste and write its photo if it was the last one."""
        self.pending.append(row)
        self.edited.append(pixels)
        source = self.crops[row].source
        if row + 1 == len(self.crops) or self.crops[row + 1].source != source:
            self._write_photo(source)
            self.pending, self.edited = [], []

    def record(self) -> list[dict[str, Any]]:
        """Per photo: its output, and per face its box, transform, mask and paste time (edit.json's ``photos``)."""
        return self.records

    def _write_photo(self, source: Path) -> None:
        started = time.perf_counter()
        photo = read_photo(source)
        crops = [self.crops[row] for row in self.pending]
        if any(crop.alignment is not None and crop.alignment.source_size != photo.image.size for crop in crops):
            raise CfdeployError(f"{source}: changed while it was being edited (its size differs); run again")
        edits = face_edits(crops, self.edited)
        pasted = paste_faces(photo.image, edits, self.settings.mask)
        pasted_s = time.perf_counter() - started
        name = self.names[source]
        self.write(name, lambda stream: save_photo(stream, photo, pasted.pixels, self.settings.encoding))
        mask_name = f"masks/{name}.png" if self.settings.save_mask else None
        if mask_name is not None:
            self.write(mask_name, lambda stream: save_png(stream, pasted.mask, self.settings.encoding.png_compression))
        self.records.append(
            {
                "source": str(source),
                "output": name,
                "mask_file": mask_name,
                "faces": [
                    {"row": row, "box": crop.record["box"], "alignment": crop.record["alignment"], **pasted_face}
                    for row, crop, pasted_face in zip(self.pending, crops, pasted.faces, strict=True)
                ],
                "paste_s": round(pasted_s, 6),
                "write_s": round(time.perf_counter() - started - pasted_s, 6),
            }
        )
