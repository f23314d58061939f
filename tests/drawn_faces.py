"""Drawn faces for the photo tests: 68-point layouts in dlib's order, cartoon faces dlib's real HOG detector finds,
and tiny dlib shape predictors trained on them (real files in dlib's format, a second to train)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# A 68-point layout in dlib's order, in units of the distance between the eye centres.
EYE_CONTOUR = np.array([[-0.25, 0.0], [-0.1, -0.09], [0.1, -0.09], [0.25, 0.0], [0.1, 0.07], [-0.1, 0.07]])


def _template_68() -> np.ndarray:
    jaw = np.stack([np.array([np.cos(a), np.sin(a)]) * [1.0, 1.3] + [0, 0.2] for a in np.linspace(np.pi, 0, 17)[::-1]])
    jaw[:, 1] = np.abs(jaw[:, 1]) + 0.2
    brows = np.stack(
        [[-0.9 + 0.15 * i, -0.35 - 0.05 * np.sin(np.pi * i / 4)] for i in range(5)]
        + [[0.3 + 0.15 * i, -0.35 - 0.05 * np.sin(np.pi * i / 4)] for i in range(5)]
    )
    nose_bridge = np.stack([[0.0, 0.1 + 0.12 * i] for i in range(4)])
    nostrils = np.stack([[-0.16 + 0.08 * i, 0.6 + 0.03 * (2 - abs(i - 2))] for i in range(5)])
    eye_right_contour = EYE_CONTOUR * [-1, 1]  # mirrored: 42 is the inner corner, 45 the outer one
    eyes = np.concatenate([EYE_CONTOUR + [-0.5, 0.0], eye_right_contour[[3, 2, 1, 0, 5, 4]] + [0.5, 0.0]])
    angles = np.linspace(np.pi, -np.pi, 12, endpoint=False)
    mouth_outer = np.stack([[0.4 * np.cos(a), 1.0 - 0.12 * np.sin(a)] for a in angles])
    inner_angles = np.linspace(np.pi, -np.pi, 8, endpoint=False)
    mouth_inner = np.stack([[0.3 * np.cos(a), 1.0 - 0.04 * np.sin(a)] for a in inner_angles])
    return np.concatenate([jaw, brows, nose_bridge, nostrils, eyes, mouth_outer, mouth_inner])


TEMPLATE_68 = _template_68()


def synthetic_landmarks(centre: tuple[float, float], eye_distance: float, degrees: float = 0.0) -> np.ndarray:
    """68 points of an upright face turned by ``degrees``, the eye centres ``eye_distance`` apart."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return TEMPLATE_68 @ rotation.T * eye_distance + np.asarray(centre)


def five_from_68(landmarks: np.ndarray) -> np.ndarray:
    """What a 5-point detector reports for the same face: eye centres (the contours' means), nose tip, mouth corners."""
    return np.stack(
        [landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0), landmarks[30], landmarks[48], landmarks[54]]
    )


def cartoon_faces(size: tuple[int, int], faces: list[tuple[int, int, int]]) -> Image.Image:
    """Drawn faces dlib's HOG detector finds: (left, top, side) each, on a grey background."""
    image = Image.new("RGB", size, (90, 90, 90))
    draw = ImageDraw.Draw(image)
    for left, top, side in faces:
        s = side / 200

        def at(x: float, y: float, left: float = left, top: float = top, s: float = s) -> tuple[float, float]:
            return left + x * s, top + y * s

        draw.ellipse([*at(50, 30), *at(150, 170)], fill=(200, 170, 150))
        for eye_x in (80, 120):
            draw.ellipse([*at(eye_x - 12, 75), *at(eye_x + 12, 85)], fill=(40, 30, 30))
            draw.rectangle([*at(eye_x - 15, 62), *at(eye_x + 15, 67)], fill=(60, 40, 30))
        draw.polygon([at(100, 85), at(92, 118), at(108, 118)], fill=(170, 130, 110))
        draw.ellipse([*at(80, 130), *at(120, 142)], fill=(150, 60, 60))
    return image.filter(ImageFilter.GaussianBlur(2))


def cartoon_landmarks(left: int, top: int, side: int) -> np.ndarray:
    """The 68 points of a drawn face: eyes at (80, 80) and (120, 80), mouth at 136, in its 200-unit frame."""
    s = side / 200
    return synthetic_landmarks((left + 100 * s, top + 80 * s), 40 * s)


def predictor_files_in(folder: Path) -> dict[int, Path]:
    """Where :func:`train_predictors` writes each predictor, by point count."""
    return {count: folder / f"predictor_{count}.dat" for count in (68, 5)}


def train_predictors(folder: Path) -> None:
    """Tiny dlib shape predictors (68 and 5 points) trained on drawn faces, written into a new ``folder``: real files
    in dlib's format."""
    import dlib

    options = dlib.shape_predictor_training_options()
    options.tree_depth, options.cascade_depth, options.num_trees_per_cascade_level = 2, 2, 4
    options.oversampling_amount, options.feature_pool_size, options.num_test_splits = 1, 20, 4
    placements = [(10, 10, 150), (20, 5, 170), (5, 25, 160)]
    images = [np.asarray(cartoon_faces((200, 200), [placement])) for placement in placements]
    folder.mkdir(parents=True)
    for count, path in predictor_files_in(folder).items():
        detections = []
        for left, top, side in placements:
            points = cartoon_landmarks(left, top, side)
            points = points if count == 68 else five_from_68(points)
            box = dlib.rectangle(left + side // 5, top + side // 5, left + side * 4 // 5, top + side * 4 // 5)
            detections.append(
                [dlib.full_object_detection(box, [dlib.point(int(x), int(y)) for x, y in np.rint(points)])]
            )
        dlib.train_shape_predictor(images, detections, options).save(str(path))
