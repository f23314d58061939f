"""Draws docs/figures/paste_back.png: the paste-back's geometry and mask on a drawn face (no model involved).

A face drawn from 68 landmark points, turned 20 degrees, in a 640x480 "photo"; its aligned crop; a stand-in
edit (the lips painted green in the crop); the mask; the photo with the edited crop pasted back.

    python docs/figures/paste_back.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cfdeploy.photos.align import align_face
from cfdeploy.photos.paste import FaceEdit, edited_to_photo, face_outline, paste_faces

PANEL = 240  # each panel's height in the figure


def face_points(centre: tuple[float, float], eye_distance: float, degrees: float) -> np.ndarray:
    """68 points in dlib's order for an upright face (eyes one unit apart, mouth one unit below), turned."""
    jaw = [[np.cos(a), abs(np.sin(a) * 1.3 + 0.2) + 0.2] for a in np.linspace(0, np.pi, 17)]
    brows = [[-0.9 + 0.15 * i, -0.4 - 0.05 * np.sin(np.pi * i / 4)] for i in range(5)]
    brows += [[0.3 + 0.15 * i, -0.4 - 0.05 * np.sin(np.pi * i / 4)] for i in range(5)]
    nose = [[0.0, 0.1 + 0.12 * i] for i in range(4)] + [[-0.16 + 0.08 * i, 0.6] for i in range(5)]
    eye = [[-0.25, 0.0], [-0.1, -0.09], [0.1, -0.09], [0.25, 0.0], [0.1, 0.07], [-0.1, 0.07]]
    eyes = [[x - 0.5, y] for x, y in eye] + [[0.5 - x, y] for x, y in np.array(eye)[[3, 2, 1, 0, 5, 4]]]
    outer = [[0.4 * np.cos(a), 1.0 - 0.12 * np.sin(a)] for a in np.linspace(np.pi, -np.pi, 12, endpoint=False)]
    inner = [[0.3 * np.cos(a), 1.0 - 0.04 * np.sin(a)] for a in np.linspace(np.pi, -np.pi, 8, endpoint=False)]
    template = np.array(jaw + brows + nose + eyes + outer + inner)
    angle = np.deg2rad(degrees)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return template @ turn.T * eye_distance + np.asarray(centre)


def drawn_face(size: tuple[int, int], points: np.ndarray) -> Image.Image:
    """A soft background and a face painted over its landmarks."""
    rng = np.random.default_rng(0)
    background = Image.fromarray(rng.integers(60, 200, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(background)
    draw.polygon([tuple(p) for p in face_outline(points)], fill=(222, 184, 160))
    for brow in (points[17:22], points[22:27]):
        draw.line([tuple(p) for p in brow], fill=(80, 55, 40), width=6)
    for eye in (points[36:42], points[42:48]):
        draw.polygon([tuple(p) for p in eye], fill=(250, 250, 250))
        draw.ellipse([*(eye.mean(axis=0) - 6), *(eye.mean(axis=0) + 6)], fill=(60, 90, 140))
    draw.line([tuple(p) for p in points[27:31]], fill=(190, 140, 120), width=4)
    draw.polygon([tuple(p) for p in points[48:60]], fill=(190, 90, 90))
    return background.filter(ImageFilter.GaussianBlur(1.5))


def panel(image: Image.Image) -> Image.Image:
    return image.resize((round(image.width * PANEL / image.height), PANEL), Image.LANCZOS)


def main() -> None:
    points = face_points((330, 230), 70.0, 20.0)
    photo = drawn_face((640, 480), points)
    aligned = align_face(photo, points, output_size=512, transform_size=512)

    edited = aligned.image.copy()  # the stand-in edit: the lips, found in the crop, painted green
    crop_points = (points - edited_to_photo(aligned, 512)[:, 2] + 0.5) @ np.linalg.inv(
        edited_to_photo(aligned, 512)[:, :2]
    ).T
    lips = Image.new("L", edited.size, 0)
    ImageDraw.Draw(lips).polygon([tuple(p) for p in crop_points[48:60]], fill=255)
    edited.paste((60, 150, 70), mask=lips.filter(ImageFilter.GaussianBlur(2)))

    pasted = paste_faces(photo, [FaceEdit(edited, points, aligned)])

    marked = photo.copy()
    draw = ImageDraw.Draw(marked)
    draw.polygon([tuple(p) for p in aligned.quad], outline=(255, 220, 0), width=3)
    for x, y in points:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(0, 200, 255))
    panels = [
        panel(marked),
        panel(aligned.image),
        panel(edited),
        panel(Image.fromarray(pasted.mask).convert("RGB")),
        panel(Image.fromarray(pasted.pixels)),
    ]
    gap = 8
    figure = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), PANEL), (255, 255, 255))
    left = 0
    for image in panels:
        figure.paste(image, (left, 0))
        left += image.width + gap
    figure.save(Path(__file__).with_suffix(".png"), optimize=True)


if __name__ == "__main__":
    main()
