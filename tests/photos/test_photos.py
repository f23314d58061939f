"""cfdeploy.photos: reading photos, landmark files, dlib, the FFHQ alignment and the encoder's preprocessing.

The alignment is checked against the official ``align_face`` transcribed step by step below (scipy's
gaussian_filter, Pillow), and the preprocessing against torchvision's official transform; every image and
landmark file the tests use is built here, the drawn faces and dlib models in ``tests/drawn_faces.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from cfdeploy.errors import CfdeployError, missing_extra
from cfdeploy.photos import (
    DlibLandmarks,
    Face,
    NoFaceFound,
    align_face,
    alignment_points,
    as_rgb,
    batch_inputs,
    encoder_input,
    load_photo,
    photo_paths,
    read_landmarks,
    select_faces,
)
from cfdeploy.photos.align import gaussian_blur
from drawn_faces import cartoon_faces, five_from_68, synthetic_landmarks


def textured_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour structure plus fine noise, so a misplaced sample shows."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(height // 12, 2), max(width // 12, 2), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------
# The official utils/alignment.py align_face, transcribed step by step (image and landmarks passed in).


def official_align(image: Image.Image, lm: np.ndarray, output_size: int = 256, transform_size: int = 256):
    eye_left = np.mean(lm[36:42], axis=0)
    eye_right = np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    source_quad = quad.copy()
    qsize = np.hypot(*x) * 2
    img = image
    steps = {"shrink": 1, "padding": (0, 0, 0, 0)}
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(img.size[0]) / shrink)), int(np.rint(float(img.size[1]) / shrink)))
        img = img.resize(rsize, Image.Resampling.LANCZOS)
        quad /= shrink
        qsize /= shrink
        steps["shrink"] = shrink
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )
    crop = (
        max(crop[0] - border, 0),
        max(crop[1] - border, 0),
        min(crop[2] + border, img.size[0]),
        min(crop[3] + border, img.size[1]),
    )
    steps["crop_box"] = crop
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]
    pad = (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )
    pad = (
        max(-pad[0] + border, 0),
        max(-pad[1] + border, 0),
        max(pad[2] - img.size[0] + border, 0),
        max(pad[3] - img.size[1] + border, 0),
    )
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        img = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = img.shape
        y, x, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(
            1.0 - np.minimum(np.float32(x) / pad[0], np.float32(w - 1 - x) / pad[2]),
            1.0 - np.minimum(np.float32(y) / pad[1], np.float32(h - 1 - y) / pad[3]),
        )
        blur = qsize * 0.02
        img += (scipy.ndimage.gaussian_filter(img, [blur, blur, 0]) - img) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        img += (np.median(img, axis=(0, 1)) - img) * np.clip(mask, 0.0, 1.0)
        img = Image.fromarray(np.uint8(np.clip(np.rint(img), 0, 255)), "RGB")
        quad += pad[:2]
        steps["padding"] = tuple(int(p) for p in pad)
    img = img.transform(
        (transform_size, transform_size), Image.Transform.QUAD, (quad + 0.5).flatten(), Image.Resampling.BILINEAR
    )
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return img, source_quad, steps


ALIGNMENT_CASES = {
    # name: image size, face centre, eye distance, rotation (degrees), output size; and the path it must take
    "rotated": ((320, 300), (160, 150), 40.0, 25.0, 256),
    "near_the_border": ((200, 180), (38, 150), 36.0, -12.0, 256),
    "large_image_shrunk": ((1600, 1500), (800, 700), 300.0, 8.0, 256),
    "output_smaller_than_transform": ((320, 300), (170, 140), 50.0, -30.0, 128),
}


@pytest.mark.parametrize("case", ALIGNMENT_CASES)
def test_alignment_matches_the_official_geometry(case):
    size, centre, eye_distance, degrees, output_size = ALIGNMENT_CASES[case]
    image = textured_image(*size, seed=len(case))
    landmarks = synthetic_landmarks(centre, eye_distance, degrees)
    expected, expected_quad, steps = official_align(image, landmarks, output_size=output_size)
    aligned = align_face(image, landmarks, output_size=output_size)

    assert aligned.image.mode == "RGB" and aligned.image.size == (output_size, output_size)
    difference = np.abs(np.asarray(aligned.image, np.int16) - np.asarray(expected, np.int16))
    assert difference.mean() <= 1.0, difference.mean()
    assert difference.max() <= 1, difference.max()
    np.testing.assert_array_equal(aligned.quad, expected_quad)
    assert (aligned.shrink, aligned.crop_box, aligned.padding) == (steps["shrink"], steps["crop_box"], steps["padding"])
    took_the_path = {
        "rotated": aligned.padding == (0, 0, 0, 0) and aligned.crop_box != (0, 0, *size),
        "near_the_border": min(aligned.padding) > 0,
        "large_image_shrunk": aligned.shrink == 2,
        "output_smaller_than_transform": aligned.transform_size == 256,
    }
    assert took_the_path[case], aligned.transform_record()


def test_five_points_from_the_68_contour_means_give_the_same_crop():
    """The geometry reads only the eye centres and mouth corners, so a detector reporting exactly those agrees."""
    image = textured_image(200, 180, seed=3)
    landmarks = synthetic_landmarks((40, 150), 36.0, -12.0)  # near the border: the padding runs too
    from_68, from_5 = align_face(image, landmarks), align_face(image, five_from_68(landmarks))
    np.testing.assert_array_equal(alignment_points(landmarks), alignment_points(five_from_68(landmarks)))
    np.testing.assert_array_equal(np.asarray(from_68.image), np.asarray(from_5.image))
    assert from_68.transform_record() == from_5.transform_record()


def test_the_transform_record_is_json_and_names_the_source_quad():
    landmarks = synthetic_landmarks((800, 700), 300.0, 8.0)
    aligned = align_face(textured_image(1600, 1500), landmarks)
    record = json.loads(json.dumps(aligned.transform_record()))
    assert record["shrink"] == 2 and record["output_size"] == record["transform_size"] == 256
    np.testing.assert_allclose(
        np.mean(record["quad"], axis=0),
        alignment_points(landmarks)[:2].mean(axis=0) * 0.9 + alignment_points(landmarks)[2:].mean(axis=0) * 0.1,
    )


@pytest.mark.parametrize(
    "shape, sigma", [((20, 30, 3), 0.3), ((31, 17, 3), 2.4), ((9, 7, 3), 5.0), ((150, 140, 3), 6.3)]
)
def test_gaussian_blur_matches_scipy(shape, sigma):
    """Including a kernel wider than the image (sigma 5 on 9x7), where the reflection repeats."""
    pixels = (np.random.default_rng(1).random(shape) * 255).astype(np.float32)
    blurred = gaussian_blur(pixels, sigma)
    assert blurred.dtype == np.float32
    np.testing.assert_allclose(blurred, scipy.ndimage.gaussian_filter(pixels, [sigma, sigma, 0]), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda lm: lm[[1, 0, 2, 4, 3]],
            "face.jpg: the eye and mouth points are mirrored, collinear or not finite (left and right swapped?)",
        ),
        (
            lambda lm: np.repeat(lm[:1], 5, axis=0),
            "face.jpg: the eye and mouth points are mirrored, collinear or not finite (left and right swapped?)",
        ),
        (
            lambda lm: np.where(np.arange(5)[:, None] == 0, np.nan, lm),
            "face.jpg: the eye and mouth points are mirrored, collinear or not finite (left and right swapped?)",
        ),
        (
            lambda lm: (lm - lm.mean(axis=0)) * 0.02 + 50,
            "face.jpg: the face spans 4.0 pixels, under the 8 an alignment needs",
        ),
    ],
)
def test_unusable_points_are_refused_naming_the_photo(change, message):
    points = change(five_from_68(synthetic_landmarks((100, 100), 50.0)))
    with pytest.raises(CfdeployError) as error:
        align_face(textured_image(200, 200), points, source="face.jpg")
    assert str(error.value) == message


def test_unusable_points_of_one_face_among_several_are_refused_naming_the_face():
    from cfdeploy.photos.invert import align_faces
    from cfdeploy.photos.landmarks import Face

    good = five_from_68(synthetic_landmarks((100, 100), 50.0))
    faces = [Face.from_points(good), Face.from_points(good[[1, 0, 2, 4, 3]])]
    with pytest.raises(CfdeployError) as error:
        align_faces(textured_image(200, 200), faces, Path("group.jpg"))
    assert str(error.value) == (
        "group.jpg (face 1): the eye and mouth points are mirrored, collinear or not finite (left and right swapped?)"
    )


# ---------------------------------------------------------------------------------------------------
# Preprocessing: torchvision's official transform_inference.


@pytest.mark.parametrize("size", [(300, 200), (100, 180), (256, 256), (257, 611)])
def test_encoder_input_is_the_official_transform(size):
    from torchvision import transforms

    official = transforms.Compose(
        [transforms.Resize((256, 256)), transforms.ToTensor(), transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])]
    )
    image = textured_image(*size, seed=size[0])
    ours = encoder_input(image)
    assert ours.dtype == np.float32 and ours.shape == (3, 256, 256)
    np.testing.assert_array_equal(ours, official(image).numpy())


def test_batch_inputs_stacks_the_encoder_inputs():
    images = [textured_image(300, 200, seed=1), textured_image(120, 256, seed=2)]
    batch = batch_inputs(images)
    assert batch.shape == (2, 3, 256, 256) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], encoder_input(images[1]))


# ---------------------------------------------------------------------------------------------------
# Reading photos.


def refusal(path: Path, **options) -> str:
    """The one-line message ``load_photo`` refuses ``path`` with."""
    with pytest.raises(CfdeployError) as error:
        load_photo(path, **options)
    message = str(error.value)
    assert "\n" not in message
    return message


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG holding only a header that declares ``width`` x ``height`` RGB pixels (and no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (220, 30, 30)
    pixels[:, 20:] = (30, 30, 220)
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored picture must be turned 90 degrees clockwise to be seen upright
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    with Image.open(path) as stored_image:
        stored = np.asarray(stored_image)
    loaded = load_photo(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 40)
    np.testing.assert_array_equal(np.asarray(loaded), np.rot90(stored, k=-1))


@pytest.mark.parametrize("mode", ["CMYK", "L"])
def test_cmyk_and_grey_jpegs_become_rgb_as_the_official_convert(tmp_path, mode):
    path = tmp_path / f"{mode}.jpg"
    textured_image(40, 30).convert(mode).save(path, quality=90)
    loaded = load_photo(path)
    with Image.open(path) as stored:
        assert stored.mode == mode and loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(stored.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_dropped_as_the_official_convert(tmp_path, mode):
    pixels = np.asarray(textured_image(40, 30).convert(mode)).copy()
    pixels[..., -1] = np.arange(40, dtype=np.uint8)[None, :] * 6  # varying alpha, which must not matter
    path = tmp_path / f"{mode}.png"
    Image.fromarray(pixels, mode).save(path)
    loaded = np.asarray(load_photo(path))
    colour = pixels[..., :3] if mode == "RGBA" else np.repeat(pixels[..., :1], 3, axis=2)
    np.testing.assert_array_equal(loaded, colour)


def test_a_palette_with_transparency_gives_its_colours_without_a_warning(tmp_path):
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    palette_image.putdata([0, 1, 1, 0, 1, 0, 0, 1])
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=b"\x00\x80")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = np.asarray(load_photo(path))
    np.testing.assert_array_equal(loaded[0], [[10, 20, 30], [200, 100, 50], [200, 100, 50], [10, 20, 30]])


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 128, 257, 32896], [65535, 65407, 385, 1000]], np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I;16"
    loaded = np.asarray(load_photo(path))
    expected = np.array([[0, 0, 1, 128], [255, 255, 1, 4]], np.uint8)  # value / 257, rounded
    np.testing.assert_array_equal(loaded, np.repeat(expected[..., None], 3, axis=2))


def test_the_32_bit_mode_older_pillows_give_16_bit_grey_is_scaled_too():
    values = np.array([[0, 65535, 32896, 70000, -5]], np.int32)
    np.testing.assert_array_equal(np.asarray(as_rgb(Image.fromarray(values)))[..., 0], [[0, 255, 128, 255, 0]])


def test_a_lossless_webp_loads_exactly(tmp_path):
    image = textured_image(30, 20)
    path = tmp_path / "photo.webp"
    image.save(path, lossless=True)
    np.testing.assert_array_equal(np.asarray(load_photo(path)), np.asarray(image))


@pytest.mark.parametrize("width, height, limit", [(20000, 20000, "Pillow's error"), (10000, 10000, "Pillow's warning")])
def test_decompression_bombs_beyond_pillows_limit_are_refused(tmp_path, width, height, limit):
    path = png_declaring(tmp_path / "bomb.png", width, height)
    assert refusal(path) == (
        f"{path}: the header declares more than {Image.MAX_IMAGE_PIXELS:,} pixels; "
        "photos may have at most 50,000,000 (a decompression bomb?)"
    )


def test_a_header_over_the_photo_limit_is_refused_before_decoding(tmp_path):
    """The file holds no pixel data, so decoding it would fail with a different message."""
    path = png_declaring(tmp_path / "huge.png", 8000, 8000)
    assert refusal(path) == (
        f"{path}: the header declares 8000x8000 = 64,000,000 pixels; photos may have at most 50,000,000 "
        "(a decompression bomb?)"
    )
    small = tmp_path / "small.png"
    textured_image(100, 60).save(small)
    assert refusal(small, max_pixels=5000) == (
        f"{small}: the header declares 100x60 = 6,000 pixels; photos may have at most 5,000 (a decompression bomb?)"
    )


@pytest.mark.parametrize(
    "format, kept, message",
    [
        ("JPEG", 700, r"the image data is truncated or damaged: image file is truncated \(\d+ bytes not processed\)"),
        ("JPEG", 100, r"the image header is damaged: Truncated File Read"),
        ("PNG", 100, r"the image data is truncated or damaged: image file is truncated"),
    ],
)
def test_truncated_files_are_refused(tmp_path, format, kept, message):
    path = tmp_path / f"cut.{format.lower()}"
    textured_image(64, 48).save(path, format=format)
    path.write_bytes(path.read_bytes()[:kept])
    assert re.fullmatch(rf"{re.escape(str(path))}: {message}", refusal(path)), refusal(path)


@pytest.mark.parametrize("name, content", [("notes.jpg", b"this is text, not a photo\n"), ("empty.png", b"")])
def test_files_that_are_not_images_are_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert refusal(path) == f"{path}: not a JPEG, PNG or WebP image, or its header is damaged"


def test_formats_other_than_jpeg_png_and_webp_are_not_parsed(tmp_path):
    path = tmp_path / "animation.jpg"
    textured_image(10, 10).save(path, format="GIF")
    assert refusal(path) == f"{path}: not a JPEG, PNG or WebP image, or its header is damaged"


def test_directories_fifos_and_missing_files_are_refused(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert refusal(fifo) == f"{fifo}: not a regular file (a FIFO)"
    assert refusal(tmp_path) == f"{tmp_path}: not a regular file (a directory)"
    assert refusal(tmp_path / "absent.jpg") == f"{tmp_path / 'absent.jpg'}: no such file"


def test_photo_paths_lists_directories_in_name_order_and_keeps_files_as_given(tmp_path):
    folder = tmp_path / "photos"
    (folder / "nested.jpg").mkdir(parents=True)
    for name in ["b.png", "A.JPG", "c.webp", "d.jpeg", "notes.txt", "._b.jpg", "e.gif"]:
        (folder / name).write_bytes(b"x")
    single = tmp_path / "single.bmp"
    single.write_bytes(b"x")
    assert photo_paths([single, folder]) == [single] + [
        folder / name for name in ["A.JPG", "b.png", "c.webp", "d.jpeg"]
    ]


def test_photo_paths_refuses_nothing_found_and_bad_entries(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CfdeployError, match=rf"^no JPEG, PNG or WebP photos in {re.escape(str(empty))}$"):
        photo_paths([empty])
    with pytest.raises(CfdeployError, match=rf"^{re.escape(str(tmp_path / 'gone.jpg'))}: no such file$"):
        photo_paths([tmp_path / "gone.jpg"])
    os.mkfifo(empty / "pipe.jpg")
    with pytest.raises(CfdeployError, match=rf"^{re.escape(str(empty / 'pipe.jpg'))}: not a regular file \(a FIFO\)$"):
        photo_paths([empty])


def test_the_photo_path_imports_neither_torch_nor_scipy_nor_dlib():
    code = (
        "import sys, cfdeploy.photos; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'scipy', 'dlib', 'torchvision')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------
# Landmark files.

PHOTOS = [Path("one.jpg"), Path("two.png"), Path("three.webp")]


def test_a_json_landmarks_file_gives_each_photos_faces(tmp_path):
    face_68 = synthetic_landmarks((100, 90), 40.0)
    face_5 = five_from_68(synthetic_landmarks((60, 50), 20.0))
    path = tmp_path / "landmarks.json"
    path.write_text(json.dumps([face_68.tolist(), [face_5.tolist(), face_68.tolist()], []]))
    faces = read_landmarks(path, PHOTOS)
    assert [len(photo_faces) for photo_faces in faces] == [1, 2, 0]
    np.testing.assert_array_equal(faces[0][0].points, face_68)
    np.testing.assert_array_equal(faces[1][0].points, face_5)
    assert faces[1][0].box == (*face_5.min(axis=0), *face_5.max(axis=0))
    assert faces[0][0].points.dtype == np.float64


def test_npy_landmarks_files_one_or_several_faces_per_photo(tmp_path):
    single = tmp_path / "single.npy"
    np.save(single, np.stack([np.rint(synthetic_landmarks((100 + i, 90), 40.0)).astype(np.int32) for i in range(3)]))
    faces = read_landmarks(single, PHOTOS)
    assert [len(photo_faces) for photo_faces in faces] == [1, 1, 1]
    np.testing.assert_array_equal(faces[2][0].points, np.rint(synthetic_landmarks((102, 90), 40.0)))
    several = tmp_path / "several.npy"
    np.save(several, np.zeros((3, 2, 5, 2), np.float32) + np.arange(5, dtype=np.float32)[:, None])
    assert [len(photo_faces) for photo_faces in read_landmarks(several, PHOTOS)] == [2, 2, 2]


GOOD_68 = np.round(synthetic_landmarks((100, 90), 40.0), 2).tolist()
BAD_JSON_FILES = {
    "count": ([GOOD_68, GOOD_68], "{path}: 2 landmark entries for 3 photos (one entry per photo, in order)"),
    "shape": (
        [GOOD_68, GOOD_68[:3], GOOD_68],
        "{path}: entry 1 (two.png): expected [68,2] or [5,2] points, found [3, 2]",
    ),
    "shape_in_list": (
        [GOOD_68, [GOOD_68, GOOD_68[:7]], GOOD_68],
        "{path}: entry 1 (two.png), face 1: expected [68,2] or [5,2] points, found [7, 2]",
    ),
    "triple": (
        [GOOD_68, GOOD_68, [[1, 2, 3]] * 5],
        "{path}: entry 2 (three.webp): expected [x, y] number pairs, found [1, 2, 3]",
    ),
    "string": (
        [GOOD_68, [["1", 2]] * 5, GOOD_68],
        '{path}: entry 1 (two.png): expected [x, y] number pairs, found ["1", 2]',
    ),
    "boolean": (
        [[[True, 2]] * 5, GOOD_68, GOOD_68],
        "{path}: entry 0 (one.jpg): expected [x, y] number pairs, found [true, 2]",
    ),
    "not_a_list": (
        [GOOD_68, {"x": 1}, GOOD_68],
        '{path}: entry 1 (two.png): expected a face (a list of [x, y] pairs) or a list of faces, found {{"x": 1}}',
    ),
    "top_level": (
        {"photo": "x" * 50},
        '{path}: expected a JSON list with one entry per photo, found {{"photo": "' + "x" * 26 + "...",
    ),
}


@pytest.mark.parametrize("case", BAD_JSON_FILES)
def test_bad_json_landmarks_are_refused_naming_the_file_and_entry(tmp_path, case):
    content, message = BAD_JSON_FILES[case]
    path = tmp_path / "landmarks.json"
    path.write_text(json.dumps(content))
    with pytest.raises(CfdeployError) as error:
        read_landmarks(path, PHOTOS)
    assert str(error.value) == message.format(path=path)


def test_nan_and_broken_json_landmarks_are_refused(tmp_path):
    path = tmp_path / "landmarks.json"
    path.write_text(json.dumps([GOOD_68, GOOD_68, [[float("nan"), 1.0]] * 5]))
    with pytest.raises(
        CfdeployError, match=rf"^{re.escape(str(path))}: entry 2 \(three.webp\): the points hold NaN or infinity$"
    ):
        read_landmarks(path, PHOTOS)
    path.write_text("[[1, 2], ")
    with pytest.raises(
        CfdeployError,
        match=rf"^{re.escape(str(path))}: not valid JSON \(Expecting value: line 1 column 10 \(char 9\)\)$",
    ):
        read_landmarks(path, PHOTOS)
    path.write_text("[" * 100_000)
    with pytest.raises(
        CfdeployError, match=rf"^{re.escape(str(path))}: not valid JSON \(maximum recursion depth exceeded"
    ):
        read_landmarks(path, PHOTOS)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((3, 68, 3)), "{path}: entry 0 (one.jpg): expected [68,2] or [5,2] points, found [68, 3]"),
        (np.zeros((3, 2, 6, 2)), "{path}: entry 0 (one.jpg), face 0: expected [68,2] or [5,2] points, found [6, 2]"),
        (np.zeros((4, 5, 2)), "{path}: 4 landmark entries for 3 photos (one entry per photo, in order)"),
        (np.zeros((3, 10)), "{path}: expected landmarks [N,P,2] or [N,faces,P,2] (P = 68 or 5), found [3, 10]"),
        (np.zeros((3, 5, 2), bool), "{path}: expected integer or floating-point landmarks, found dtype bool"),
        (
            np.where(np.arange(30).reshape(3, 5, 2) == 17, np.inf, 1.0),
            "{path}: entry 1 (two.png): the points hold NaN or infinity",
        ),
    ],
)
def test_bad_npy_landmarks_are_refused_naming_the_file_and_entry(tmp_path, array, message):
    path = tmp_path / "landmarks.npy"
    np.save(path, array)
    with pytest.raises(CfdeployError) as error:
        read_landmarks(path, PHOTOS)
    assert str(error.value) == message.format(path=path)


def test_landmarks_in_another_format_are_refused(tmp_path):
    path = tmp_path / "landmarks.csv"
    path.write_text("1,2\n")
    with pytest.raises(
        CfdeployError, match=rf"^{re.escape(str(path))}: landmarks must be a .json or .npy file, found suffix .csv$"
    ):
        read_landmarks(path, PHOTOS)


def test_the_largest_face_is_kept_unless_all_are_asked_for():
    small, large = (Face.from_points(synthetic_landmarks((50, 50), size)) for size in (10.0, 30.0))
    assert select_faces([small, large, small], "group.jpg", size=(100, 100)) == [large]
    assert select_faces([small, large], "group.jpg", all_faces=True, size=(100, 100)) == [small, large]
    with pytest.raises(NoFaceFound, match=r"^group.jpg: no face found$"):
        select_faces([], "group.jpg", size=(100, 100))


# ---------------------------------------------------------------------------------------------------
# dlib: its real HOG detector on drawn faces, with a tiny 68-point predictor trained once per run (conftest).


def test_dlib_finds_every_face_keeps_the_largest_and_the_crop_follows(predictor_files):
    photo = cartoon_faces((420, 260), [(10, 40, 150), (190, 10, 220)])
    faces = DlibLandmarks(predictor_files[68]).faces(photo)
    assert len(faces) == 2
    assert all(face.points.shape == (68, 2) for face in faces)
    largest = select_faces(faces, "group.jpg", size=photo.size)[0]
    assert largest.box[0] > 150 and largest.area == max(face.area for face in faces)
    aligned = align_face(photo, largest.points)
    assert aligned.image.size == (256, 256)
    assert 150 < aligned.quad[:, 0].mean() < 420  # the crop is centred on the larger face


def test_dlib_finding_no_face_is_a_no_face_error(predictor_files):
    faces = DlibLandmarks(predictor_files[68]).faces(Image.new("RGB", (120, 90), (128, 128, 128)))
    assert faces == []
    with pytest.raises(NoFaceFound, match=r"^blank.jpg: no face found$"):
        select_faces(faces, "blank.jpg", size=(120, 90))


def test_dlib_models_that_cannot_serve_are_refused(tmp_path, predictor_files):
    missing = tmp_path / "shape_predictor_68_face_landmarks.dat"
    with pytest.raises(CfdeployError, match=rf"^{re.escape(str(missing))}: no such file$"):
        DlibLandmarks(missing)
    garbage = tmp_path / "garbage.dat"
    garbage.write_text("not a model\n" * 10)
    with pytest.raises(
        CfdeployError,
        match=rf"^{re.escape(str(garbage))}: not a dlib shape predictor \(Error deserializing object of type int\)$",
    ):
        DlibLandmarks(garbage)
    with pytest.raises(CfdeployError) as error:
        DlibLandmarks(predictor_files[5])
    assert str(error.value) == (
        f"{predictor_files[5]}: a 5-point shape predictor; the alignment needs dlib's 68-point "
        "shape_predictor_68_face_landmarks.dat"
    )


def test_without_dlib_the_photos_extra_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dlib", None)  # what an install without the extra sees: ImportError
    with pytest.raises(CfdeployError) as error:
        DlibLandmarks(tmp_path / "shape_predictor_68_face_landmarks.dat")
    assert str(error.value) == str(missing_extra("dlib", "--landmarks-model"))
    assert str(error.value) == '--landmarks-model needs dlib, which this install lacks: pip install "cfdeploy[photos]"'


def test_faces_outside_the_photo_are_not_faces_and_stray_points_are_refused():
    """At least half a face's points must lie in the photo; a counted face may not reach beyond one photo size."""
    inside, outside = (Face.from_points(synthetic_landmarks(centre, 40.0)) for centre in ((100, 80), (1100, 80)))
    assert select_faces([outside, inside], "p.jpg", all_faces=True, size=(200, 160)) == [inside]
    at_the_edge = Face.from_points(synthetic_landmarks((195, 80), 40.0))  # its right half is beyond the photo
    assert select_faces([at_the_edge], "p.jpg", size=(200, 160)) == [at_the_edge]
    for far in (1e6, 1e300):
        with pytest.raises(NoFaceFound) as missing:
            select_faces([Face.from_points(synthetic_landmarks((100, 80), 40.0) + far)], "p.jpg", size=(200, 160))
        assert (
            str(missing.value) == "p.jpg: no face inside the 200x160 photo (the landmarks of 1 face(s) lie outside it)"
        )
    stray = synthetic_landmarks((100, 80), 40.0)
    stray[0] = [1e300, 80]  # a jaw point: the alignment does not use it, the face's box would span 1e300
    with pytest.raises(CfdeployError) as refused:
        select_faces([Face.from_points(stray)], "p.jpg", size=(200, 160))
    assert str(refused.value).startswith("p.jpg: a face's landmarks reach far outside the 200x160 photo (x ")


def test_landmarks_beyond_float64_are_refused_where_they_are_parsed(tmp_path):
    face = synthetic_landmarks((100, 80), 40.0).tolist()
    face[3][0] = int("9" * 401)
    path = tmp_path / "landmarks.json"
    path.write_text(json.dumps([face]))
    with pytest.raises(CfdeployError) as refused:
        read_landmarks(path, PHOTOS[:1])
    found = "[" + "9" * 36 + "..."  # the pair as JSON, cut to 40 characters
    assert str(refused.value) == f"{path}: entry 0 (one.jpg): expected [x, y] number pairs, found {found}"


def test_a_dlib_model_declaring_a_matrix_beyond_memory_is_refused_naming_it(tmp_path):
    """dlib's format: a version, then the initial shape's rows and columns; 2^40 rows allocate before any value."""
    bomb = tmp_path / "shape_predictor_68_face_landmarks.dat"
    bomb.write_bytes(bytes([0x01, 0x01, 0x86, 0, 0, 0, 0, 0, 0x01, 0x81, 0x01]) + bytes(64))
    with pytest.raises(CfdeployError) as refused:
        DlibLandmarks(bomb)
    assert str(refused.value) == (
        f"{bomb}: not a dlib shape predictor (its header declares a matrix larger than memory)"
    )
