"""The edited face back in the photo: the alignment's geometry inverted, a soft mask over the face, a blend.

Geometry. The aligned crop sampled the photo over the quad (:mod:`cfdeploy.photos.align`). In continuous
pixel coordinates (pixel i covers [i, i+1), as Pillow samples), the point g of an edited image of side
S came from the photo's point

    p = D · (q_tl / k + ½ + (q_tr − q_tl) / k · g_x / S + (q_bl − q_tl) / k · g_y / S)

with q the quad's corners in the photo, k the shrink factor and D = diag(W / rint(W / k), H / rint(H / k))
the shrunk image's exact scale (D = 1 without a shrink). Cropping and padding move the image by whole
pixels and the quad with it, so they cancel. The quad is a square, so the map is affine, p = A g + b,
and its inverse is exact: each photo pixel samples the edited image at A⁻¹ (p − b) with Pillow's
bicubic filter, after the edited image is resized (LANCZOS, which antialiases) to the face's side in
the photo, so the transform itself neither shrinks nor enlarges.

Mask. The face's outline from its landmarks, 68 points: the convex hull of the jaw (0–16) and of the
brows (17–26) raised by 0.7 of the eye-to-mouth distance, up the forehead; 5 points: an ellipse centred
0.3 of the way from the eyes' midpoint to the mouth's, reaching one eye-to-eye distance to either side
and 1.4 eye-to-mouth distances up and down. The outline grows by ``dilate`` and fades out over
``feather`` (both fractions of the aligned square's side in the photo, so the mask scales with the face),
and it fades out over ``feather`` inside the aligned square's edges, so it never reaches outside the
square. Where the mask is 0 the photo's pixels are kept exactly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cfdeploy.errors import CfdeployError
from cfdeploy.photos.align import AlignedFace, alignment_points

JAW_68, BROWS_68 = slice(0, 17), slice(17, 27)
BROW_RAISE = 0.7  # of the eye-to-mouth distance: the brows moved up to the forehead
ELLIPSE_CENTRE, ELLIPSE_ACROSS, ELLIPSE_ALONG = 0.3, 1.0, 1.4  # 5 points: see the module's docstring
ELLIPSE_VERTICES = 48
OUTLINES = {68: "hull of the jaw and the raised brows (68 points)", 5: "ellipse around the eyes and mouth (5 points)"}


@dataclass(frozen=True)
class MaskSettings:
    """How far the mask reaches past the face's outline (``dilate``) and over how much it fades (``feather``),
    as fractions of the aligned square's side in the photo. The fade is at least a pixel wide."""

    dilate: float = 0.03
    feather: float = 0.06

    def check(self) -> None:
        for name, value in (("--mask-dilate", self.dilate), ("--feather", self.feather)):
            if not 0 <= value <= 1:
                raise CfdeployError(f"{name} must be a fraction of the face's size from 0 to 1, got {value}")


@dataclass(frozen=True, eq=False)  # compared by identity: numpy fields have no single truth value
class FaceEdit:
    """One edited face to paste: the edited image (RGB, square, any side), the face's landmarks in the photo's
    pixels and the alignment that made the crop it was edited from."""

    edited: Image.Image
    landmarks: np.ndarray
    alignment: AlignedFace


@dataclass(frozen=True, eq=False)
class PastedPhoto:
    """The photo's pixels ``[H, W, 3]`` uint8 with every face pasted, the mask ``[H, W]`` uint8 (0–255, the
    largest of the faces'), and per face the transform and mask that were used."""

    pixels: np.ndarray
    mask: np.ndarray
    faces: list[dict[str, Any]]


def edited_to_photo(alignment: AlignedFace, edited_size: int) -> np.ndarray:
    """``[2, 3]`` affine map from an edited image's continuous pixel coordinates to the photo's: ``p = A g + b``."""
    quad, shrink = alignment.quad, alignment.shrink
    width, height = alignment.source_size
    scale = np.array([width / np.rint(width / shrink), height / np.rint(height / shrink)]) if shrink > 1 else 1.0
    origin = scale * (quad[0] / shrink + 0.5)
    across = scale * (quad[3] - quad[0]) / (shrink * edited_size)
    down = scale * (quad[1] - quad[0]) / (shrink * edited_size)
    return np.column_stack([across, down, origin])


def face_outline(landmarks: np.ndarray) -> np.ndarray:
    """The convex polygon ``[K, 2]`` (photo pixels) the mask covers before it grows: see the module's docstring."""
    points = np.asarray(landmarks, dtype=np.float64)
    eye_left, eye_right, mouth_left, mouth_right = alignment_points(points)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) * 0.5 - eye_avg
    if len(points) == 68:
        raised_brows = points[BROWS_68] - BROW_RAISE * eye_to_mouth
        return convex_hull(np.concatenate([points[JAW_68], raised_brows]))
    angles = np.linspace(0.0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)[:, None]
    ellipse: np.ndarray = (
        eye_avg
        + ELLIPSE_CENTRE * eye_to_mouth
        + np.cos(angles) * ELLIPSE_ACROSS * eye_to_eye
        + np.sin(angles) * ELLIPSE_ALONG * eye_to_mouth
    )
    return ellipse


def convex_hull(points: np.ndarray) -> np.ndarray:
    """The convex hull ``[K, 2]`` of ``points`` (Andrew's monotone chain), one turn, no repeated vertex."""
    ordered = sorted({(float(x), float(y)) for x, y in points})

    def half(chain_points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for point in chain_points:
            while len(chain) >= 2 and _turn(chain[-2], chain[-1], point) <= 0:
                chain.pop()
            chain.append(point)
        return chain[:-1]

    return np.array(half(ordered) + half(ordered[::-1]))


def _turn(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def polygon_distance(polygon: np.ndarray, columns: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Signed distance from pixel centres to a convex polygon (negative inside), ``[len(rows), len(columns)]``.

    The largest distance to the edges' lines: exact inside and along the edges, a mitred corner outside.
    """
    edges = np.roll(polygon, -1, axis=0) - polygon
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1) / np.hypot(edges[:, 0], edges[:, 1])[:, None]
    if np.dot(normals[0], polygon.mean(axis=0) - polygon[0]) > 0:
        normals = -normals  # point them outward
    distance = np.full((len(rows), len(columns)), -np.inf, np.float32)
    for vertex, normal in zip(polygon, normals, strict=True):
        across = (normal[0] * (columns - vertex[0])).astype(np.float32)
        down = (normal[1] * (rows - vertex[1])).astype(np.float32)
        np.maximum(distance, across[None, :] + down[:, None], out=distance)
    return distance


def smoothstep(values: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, and 3t² − 2t³ between: a ramp without a visible edge at either end."""
    t = np.clip(values, 0.0, 1.0)
    ramp: np.ndarray = t * t * (3.0 - 2.0 * t)
    return ramp


def paste_faces(photo: Image.Image, faces: Sequence[FaceEdit], settings: MaskSettings = MaskSettings()) -> PastedPhoto:
    """``photo`` (RGB, the one the faces were aligned in) with each edited face blended in, in order."""
    if photo.mode != "RGB":
        raise ValueError(f"paste_faces needs an RGB photo, got mode {photo.mode}")
    pixels = np.array(photo)
    mask = np.zeros(pixels.shape[:2], np.uint8)
    records = [_paste_face(pixels, mask, face, settings) for face in faces]
    return PastedPhoto(pixels, mask, records)


def _paste_face(pixels: np.ndarray, mask: np.ndarray, face: FaceEdit, settings: MaskSettings) -> dict[str, Any]:
    """Blend one face into ``pixels`` (in place) and record its mask in ``mask``; what edit.json records of it."""
    started = time.perf_counter()
    if face.alignment.source_size != (pixels.shape[1], pixels.shape[0]):
        raise ValueError(f"face aligned in a {face.alignment.source_size} photo, pasted into {pixels.shape[1::-1]}")
    size = face.edited.size[0]
    to_photo = edited_to_photo(face.alignment, size)
    side = float(np.hypot(*to_photo[:, 0])) * size  # the aligned square's side in photo pixels
    resized_side = max(int(np.rint(side)), 1)
    edited = face.edited.convert("RGB")
    if resized_side != size:
        edited = edited.resize((resized_side, resized_side), Image.Resampling.LANCZOS)
    linear = to_photo[:, :2] * (size / resized_side)
    origin = to_photo[:, 2]
    corners = np.array([[0, 0], [1, 0], [1, 1], [0, 1]]) * resized_side @ linear.T + origin - 0.5  # pixel indices
    height, width = mask.shape
    left, top = max(int(np.floor(corners[:, 0].min())), 0), max(int(np.floor(corners[:, 1].min())), 0)
    right, bottom = (
        min(int(np.ceil(corners[:, 0].max())) + 1, width),
        min(int(np.ceil(corners[:, 1].max())) + 1, height),
    )
    dilate_px, feather_px = settings.dilate * side, max(settings.feather * side, 1.0)
    record: dict[str, Any] = {
        "transform": {"edited_size": size, "edited_to_photo": to_photo.tolist()},
        "mask": {
            "outline": OUTLINES[len(face.landmarks)],
            "dilate": settings.dilate,
            "feather": settings.feather,
            "face_side_px": round(side, 3),
            "dilate_px": round(dilate_px, 3),
            "feather_px": round(feather_px, 3),
        },
        "window": [left, top, right, bottom],
    }
    if right <= left or bottom <= top:
        return record

    inverse = np.linalg.inv(linear)
    shift = inverse @ (np.array([left, top], np.float64) - origin)  # Pillow samples at window pixel + 0.5
    coefficients = (inverse[0, 0], inverse[0, 1], shift[0], inverse[1, 0], inverse[1, 1], shift[1])
    warped = edited.transform(
        (right - left, bottom - top), Image.Transform.AFFINE, coefficients, Image.Resampling.BICUBIC
    )

    columns, rows = np.arange(left, right, dtype=np.float64), np.arange(top, bottom, dtype=np.float64)
    inside_face = (dilate_px + feather_px - polygon_distance(face_outline(face.landmarks), columns, rows)) / feather_px
    inside_square = -polygon_distance(corners, columns, rows) / feather_px
    weight = smoothstep(np.minimum(inside_face, inside_square))[..., None]

    window = pixels[top:bottom, left:right]
    blended = window + weight * (np.asarray(warped, np.float32) - window)
    window[...] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    region = mask[top:bottom, left:right]
    np.maximum(region, np.rint(weight[..., 0] * 255).astype(np.uint8), out=region)
    record["paste_s"] = round(time.perf_counter() - started, 6)
    return record
