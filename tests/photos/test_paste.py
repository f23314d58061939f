"""The edited face back in the photo: the inverse of the alignment, the mask, the edited copy's file, and
``cfdeploy edit --images`` writing whole photos.

The geometry is checked by a round trip: the aligned crop itself, pasted back without an edit, must give
the photo back inside the mask (up to two resamplings) and exactly outside it; the same check run on a
deliberately wrong inverse must fail.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from cfdeploy.errors import CfdeployError
from cfdeploy.photos.align import align_face
from cfdeploy.photos.images import PhotoEncoding, read_photo, save_photo
from cfdeploy.photos.paste import FaceEdit, MaskSettings, edited_to_photo, face_outline, paste_faces
from conftest import assert_refused
from drawn_faces import five_from_68, synthetic_landmarks

GPS_IFD, GPS_LATITUDE = 0x8825, 2


def smooth_photo(width: int, height: int, cell: int, seed: int = 0) -> Image.Image:
    """Colour that varies over ``cell`` pixels: the two resamplings of a round trip keep it within a grey level."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // cell + 1, width // cell + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def round_trip(photo: Image.Image, landmarks: np.ndarray, crop_size: int, wrong: bool = False) -> tuple[float, int]:
    """Paste the aligned crop itself back: the mean absolute difference from the photo inside the mask, and the
    largest one outside it. ``wrong``: with the quad's corners transposed (the crop's rows taken as columns)."""
    aligned = align_face(photo, landmarks, output_size=crop_size, transform_size=crop_size)
    geometry = replace(aligned, quad=aligned.quad[[0, 3, 2, 1]]) if wrong else aligned
    pasted = paste_faces(photo, [FaceEdit(aligned.image, landmarks, geometry)])
    difference = np.abs(pasted.pixels.astype(np.int16) - np.asarray(photo, np.int16))
    inside = pasted.mask > 0
    assert inside.sum() > 10_000
    return float(difference[inside].mean()), int(difference[~inside].max())


ROUND_TRIPS = {
    # name: face centre, eye distance, rotation (degrees), colour cell, crop side; the alignment path it must take
    "rotated": ((800, 600), 120.0, 25.0, 16, 1024),
    "at_the_border": ((130, 640), 110.0, -12.0, 40, 1024),
    "shrunk": ((1000, 650), 300.0, 8.0, 60, 256),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_the_aligned_crop_pasted_back_gives_the_photo_back(case):
    centre, eye_distance, degrees, cell, crop_size = ROUND_TRIPS[case]
    photo = smooth_photo(1600, 1200, cell, seed=len(case))
    landmarks = synthetic_landmarks(centre, eye_distance, degrees)
    aligned = align_face(photo, landmarks, output_size=crop_size, transform_size=crop_size)
    took_the_path = {
        "rotated": aligned.padding == (0, 0, 0, 0) and aligned.shrink == 1,
        "at_the_border": min(aligned.padding) > 0,
        "shrunk": aligned.shrink == 2,
    }
    assert took_the_path[case], aligned.transform_record()

    inside, outside = round_trip(photo, landmarks, crop_size)
    assert inside <= 2.0, inside
    assert outside == 0
    wrong_inside, wrong_outside = round_trip(photo, landmarks, crop_size, wrong=True)
    assert wrong_inside > 10.0, wrong_inside  # the check sees a wrong inverse
    assert wrong_outside == 0


def test_the_map_back_undoes_the_shrinks_exact_scale():
    """The shrunk image's side is rint(W / k), so the map scales by W / rint(W / k), not by k."""
    landmarks = synthetic_landmarks((700, 500), 300.0, 0.0)
    aligned = align_face(smooth_photo(1603, 1201, 60), landmarks, output_size=256)
    assert aligned.shrink == 2 and aligned.source_size == (1603, 1201)
    to_photo = edited_to_photo(aligned, 256)
    top_left = to_photo @ [0, 0, 1]
    quad_corner = (aligned.quad[0] / 2 + 0.5) * [1603 / 802, 1201 / 600]
    np.testing.assert_allclose(top_left, quad_corner, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        to_photo @ [256, 256, 1] - top_left, (aligned.quad[2] - aligned.quad[0]) / 2 * [1603 / 802, 1201 / 600]
    )


def test_the_mask_covers_the_face_fades_out_and_stays_inside_the_square():
    photo = smooth_photo(800, 600, 20)
    landmarks = synthetic_landmarks((400, 280), 80.0, 15.0)
    aligned = align_face(photo, landmarks)
    pasted = paste_faces(photo, [FaceEdit(aligned.image, landmarks, aligned)])
    rows, columns = np.nonzero(pasted.mask)
    for x, y in np.rint(landmarks[[30, 36, 45, 48, 54, 8]]).astype(int):  # nose, eye corners, mouth corners, chin
        assert pasted.mask[y, x] == 255
    assert pasted.mask[0, 0] == 0 and pasted.mask[599, 799] == 0
    assert 0 < ((pasted.mask > 0) & (pasted.mask < 255)).sum() < (pasted.mask == 255).sum()  # a fade, not a wall
    square = edited_to_photo(aligned, 256) @ np.array([[0, 0, 1], [256, 0, 1], [256, 256, 1], [0, 256, 1]]).T
    assert columns.min() >= square[0].min() - 0.5 and columns.max() <= square[0].max() + 0.5
    assert rows.min() >= square[1].min() - 0.5 and rows.max() <= square[1].max() + 0.5
    side = float(np.hypot(*edited_to_photo(aligned, 256)[:, 0])) * 256
    record = pasted.faces[0]["mask"]
    assert record["dilate_px"] == pytest.approx(0.03 * side, abs=1e-3)
    assert record["feather_px"] == pytest.approx(0.06 * side, abs=1e-3)

    wider = paste_faces(photo, [FaceEdit(aligned.image, landmarks, aligned)], MaskSettings(dilate=0.1))
    assert (wider.mask > 0).sum() > (pasted.mask > 0).sum()
    hard = paste_faces(photo, [FaceEdit(aligned.image, landmarks, aligned)], MaskSettings(feather=0.0))
    assert ((hard.mask > 0) & (hard.mask < 255)).sum() < ((pasted.mask > 0) & (pasted.mask < 255)).sum() / 10
    with pytest.raises(CfdeployError, match=r"^--feather must be a fraction of the face's size from 0 to 1, got -0.1$"):
        MaskSettings(feather=-0.1).check()


def test_five_points_give_an_ellipse_over_the_eyes_mouth_and_forehead():
    landmarks = synthetic_landmarks((400, 300), 80.0, -20.0)
    ellipse, hull = face_outline(five_from_68(landmarks)), face_outline(landmarks)
    assert ellipse.shape == (48, 2) and 20 <= len(hull) <= 27

    def area(polygon: np.ndarray) -> float:
        x, y = polygon.T
        return abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) / 2

    assert 0.8 < area(ellipse) / area(hull) < 1.25  # the same face, either way
    photo = smooth_photo(800, 600, 20)
    for points in (landmarks, five_from_68(landmarks)):
        aligned = align_face(photo, points)
        mask = paste_faces(photo, [FaceEdit(aligned.image, points, aligned)]).mask
        for x, y in np.rint(five_from_68(landmarks)).astype(int):
            assert mask[y, x] == 255


def photo_with_profile_and_gps(path: Path, image: Image.Image, orientation: int = 1, **options) -> bytes:
    """Save ``image`` with an sRGB profile, a GPS position and an orientation tag; returns the profile."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Camera maker"
    exif.get_ifd(GPS_IFD)[GPS_LATITUDE] = (51.0, 30.0, 0.0)
    image.save(path, icc_profile=profile, exif=exif, **options)
    return profile


def test_an_edited_copy_keeps_size_orientation_profile_and_format_and_drops_gps(tmp_path):
    stored = smooth_photo(300, 200, 10)
    path = tmp_path / "phone.jpg"
    profile = photo_with_profile_and_gps(path, stored, orientation=6, quality=95)
    photo = read_photo(path)
    assert photo.image.size == (200, 300) and photo.format == "JPEG" and photo.icc_profile == profile
    np.testing.assert_array_equal(
        np.asarray(photo.image), np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))
    )

    for keep_metadata in (False, True):
        buffer = io.BytesIO()
        save_photo(buffer, photo, np.asarray(photo.image), PhotoEncoding(keep_metadata=keep_metadata))
        copy = Image.open(io.BytesIO(buffer.getvalue()))
        assert (copy.format, copy.size, copy.info.get("icc_profile")) == ("JPEG", (200, 300), profile)
        exif = copy.getexif()
        assert 0x0112 not in exif  # upright pixels: no orientation to apply again
        assert (GPS_LATITUDE in exif.get_ifd(GPS_IFD)) is keep_metadata
        assert (exif.get(0x010F) == "Camera maker") is keep_metadata
        assert np.abs(np.asarray(copy, np.int16) - np.asarray(photo.image, np.int16)).mean() < 2.0  # quality 95


def test_a_png_copy_keeps_its_alpha_and_its_pixels_outside_the_face(tmp_path):
    colour = smooth_photo(640, 480, 20)
    alpha = Image.fromarray(np.tile(np.arange(640, dtype=np.uint8)[None, :] // 3 + 40, (480, 1)))
    rgba = colour.copy()
    rgba.putalpha(alpha)
    path = tmp_path / "cut_out.png"
    rgba.save(path)
    photo = read_photo(path)
    landmarks = synthetic_landmarks((320, 220), 70.0, 5.0)
    aligned = align_face(photo.image, landmarks)
    edited = Image.fromarray(255 - np.asarray(aligned.image))  # an "edit" that changes every pixel
    pasted = paste_faces(photo.image, [FaceEdit(edited, landmarks, aligned)])
    buffer = io.BytesIO()
    save_photo(buffer, photo, pasted.pixels)
    copy = Image.open(io.BytesIO(buffer.getvalue()))
    assert (copy.format, copy.mode, copy.size) == ("PNG", "RGBA", (640, 480))
    pixels = np.asarray(copy)
    np.testing.assert_array_equal(pixels[..., 3], np.asarray(alpha))
    outside = pasted.mask == 0
    np.testing.assert_array_equal(pixels[..., :3][outside], np.asarray(colour)[outside])
    assert (pixels[..., :3][pasted.mask == 255] != np.asarray(colour)[pasted.mask == 255]).any(axis=-1).mean() > 0.9


def test_a_16_bit_grey_png_keeps_its_transparent_grey_value_as_alpha(tmp_path):
    values = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    values[10:20, 5:30] = 4242
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path, transparency=4242)
    photo = read_photo(path)
    expected = np.where(values == 4242, 0, 255)
    np.testing.assert_array_equal(np.asarray(photo.alpha), expected)
    buffer = io.BytesIO()
    save_photo(buffer, photo, np.asarray(photo.image))
    np.testing.assert_array_equal(np.asarray(Image.open(buffer))[..., 3], expected)


def test_a_lossless_webp_copy_keeps_the_colours_under_transparent_pixels(tmp_path):
    rgba = smooth_photo(64, 48, 8)
    alpha = np.full((48, 64), 255, np.uint8)
    alpha[:, :20] = 0
    rgba.putalpha(Image.fromarray(alpha))
    path = tmp_path / "cut_out.webp"
    rgba.save(path, lossless=True, exact=True)
    photo = read_photo(path)
    buffer = io.BytesIO()
    save_photo(buffer, photo, np.asarray(photo.image))
    np.testing.assert_array_equal(np.asarray(Image.open(buffer)), np.asarray(Image.open(path)))


def test_an_exif_block_too_long_to_write_back_is_one_line_naming_the_photo(tmp_path):
    path = tmp_path / "long_exif.jpg"
    smooth_photo(64, 48, 8).save(path, quality=95)
    exif = Image.Exif()
    exif[0x010E] = "x" * 65_500  # an image description of 64 KB: over JPEG's limit once written back
    photo = replace(read_photo(path), exif=exif.tobytes())
    with pytest.raises(CfdeployError) as refused:
        save_photo(io.BytesIO(), photo, np.asarray(photo.image), PhotoEncoding(keep_metadata=True))
    assert str(refused.value) == (
        f"{path}: its EXIF block cannot be written back into a JPEG (EXIF data is too long); "
        "run without --keep-metadata"
    )
    save_photo(io.BytesIO(), photo, np.asarray(photo.image))  # the EXIF is dropped by default


# ---------------------------------------------------------------------------------------------------
# cfdeploy edit --images: whole photos back, on a 64 px bundle with an encoder.


@pytest.fixture(scope="module")
def group_photos(tmp_path_factory) -> tuple[Path, Path, list]:
    """A PNG with two faces (68 and 5 points) and an EXIF-rotated JPEG with one, a colour profile and a GPS
    position; the landmarks file (name order: group.png, then portrait.jpg) and the faces' points."""
    folder = tmp_path_factory.mktemp("group")
    smooth_photo(640, 420, 16, seed=1).save(folder / "group.png")
    photo_with_profile_and_gps(folder / "portrait.jpg", smooth_photo(360, 480, 16, seed=2), orientation=6, quality=95)
    big = synthetic_landmarks((200, 190), 70.0, 10.0)
    small = five_from_68(synthetic_landmarks((480, 230), 50.0, -15.0))
    upright = synthetic_landmarks((240, 170), 60.0, 0.0)  # in the upright portrait: 480 wide, 360 high
    faces = [[big.tolist(), small.tolist()], upright.tolist()]
    landmarks = folder.parent / "group_points.json"
    landmarks.write_text(json.dumps(faces))
    return folder, landmarks, faces


def test_edit_pastes_every_face_back_into_its_photo(cli, tmp_path, group_photos, bundle_with_encoder, embedding_file):
    folder, landmarks, _ = group_photos
    out = tmp_path / "edits"
    result = cli(
        "edit", "--bundle", bundle_with_encoder[1], "--images", folder, "--landmarks", landmarks,
        "--text-embedding", embedding_file, "--all-faces", "--save-mask", "--crops", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["crops", "edit.json", "group.png", "masks", "portrait.jpg"]
    assert sorted(path.name for path in (out / "crops").iterdir()) == ["000000.png", "000001.png", "000002.png"]

    source = np.asarray(Image.open(folder / "group.png"))
    edited = Image.open(out / "group.png")
    mask = np.asarray(Image.open(out / "masks" / "group.png.png"))
    assert edited.format == "PNG" and edited.size == (640, 420) and mask.shape == (420, 640)
    pixels = np.asarray(edited)
    np.testing.assert_array_equal(pixels[mask == 0], source[mask == 0])
    for left, right in ((0, 320), (320, 640)):  # each face was edited
        face = mask[:, left:right] == 255
        assert (
            face.sum() > 2000 and (pixels[:, left:right][face] != source[:, left:right][face]).any(axis=-1).mean() > 0.5
        )

    portrait = Image.open(out / "portrait.jpg")
    assert (portrait.format, portrait.size) == ("JPEG", (480, 360))
    assert portrait.info.get("icc_profile") == Image.open(folder / "portrait.jpg").info["icc_profile"]
    assert 0x0112 not in portrait.getexif() and GPS_LATITUDE not in portrait.getexif().get_ifd(GPS_IFD)

    summary = json.loads((out / "edit.json").read_text())
    assert [photo["output"] for photo in summary["photos"]] == ["group.png", "portrait.jpg"]
    group = summary["photos"][0]
    assert [face["row"] for face in group["faces"]] == [0, 1] and group["mask_file"] == "masks/group.png.png"
    assert {"box", "alignment", "transform", "mask", "window", "paste_s"} <= set(group["faces"][0])
    assert group["faces"][1]["mask"]["outline"] == "ellipse around the eyes and mouth (5 points)"
    assert summary["timings_s"]["paste"] > 0 and summary["outputs"]["images"][0] == "crops/000000.png"


def test_the_largest_face_is_pasted_photos_without_one_are_skipped_and_python_computes_the_same(
    cli, tmp_path, group_photos, bundle_with_encoder, embedding_file
):
    """A photo without a face is skipped with --skip-missing, and no copy of it written; the largest face is
    the one edited; ``edit_photo`` computes what the CLI writes."""
    from cfdeploy.backends import open_backend
    from cfdeploy.photos.invert import edit_photo
    from cfdeploy.photos.landmarks import Face, NoFaceFound, largest_face

    folder, _, faces = group_photos
    landmarks = tmp_path / "points.json"
    landmarks.write_text(json.dumps([faces[0], []]))
    out = tmp_path / "edits"
    edit = ("edit", "--bundle", bundle_with_encoder[1], "--backend", "onnxruntime", "--images", folder)
    edit = (*edit, "--landmarks", landmarks)
    options = ("--text-embedding", embedding_file, "--out", out)
    result = cli(*edit, *options, "--skip-missing")  # without it, the run stops as invert's does (test_invert)
    assert result.exit_code == 0, result.stderr
    assert f"warning: skipped {folder / 'portrait.jpg'}: no face found" in " ".join(result.stderr.split())
    assert sorted(path.name for path in out.iterdir()) == ["edit.json", "group.png"]
    summary = json.loads((out / "edit.json").read_text())
    assert summary["inputs"]["skipped"] == [
        {"source": str(folder / "portrait.jpg"), "reason": f"{folder / 'portrait.jpg'}: no face found"}
    ]
    assert [face["row"] for face in summary["photos"][0]["faces"]] == [0]  # the largest face only
    assert summary["photos"][0]["faces"][0]["box"] == summary["inputs"]["images"][0]["box"]
    assert summary["inputs"]["images"][0]["landmarks"] == faces[0][0]

    photo = read_photo(folder / "group.png")
    in_memory = edit_photo(
        open_backend("onnxruntime", bundle_with_encoder[1]),
        photo,
        [largest_face([Face.from_points(np.array(points)) for points in faces[0]])],
        text_features=np.load(embedding_file)[None],
    )
    np.testing.assert_array_equal(in_memory.pixels, np.asarray(Image.open(out / "group.png")))
    buffer = io.BytesIO()
    save_photo(buffer, photo, in_memory.pixels)
    assert buffer.getvalue() == (out / "group.png").read_bytes()
    with pytest.raises(NoFaceFound, match=f"^{re.escape(str(folder / 'group.png'))}: no face found$"):
        edit_photo(open_backend("onnxruntime", bundle_with_encoder[1]), photo, [], text_features=np.ones((1, 512)))


def test_photos_that_would_share_an_output_name_and_paste_options_without_photos_are_refused(
    cli, tmp_path, bundle_with_encoder, embedding_file
):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        smooth_photo(64, 64, 8).save(tmp_path / folder / "Me.png")
    out = tmp_path / "edits"
    common = ("--bundle", bundle_with_encoder[1], "--text-embedding", embedding_file, "--out", out)
    never_loaded = tmp_path / "shape_predictor.dat"  # the refusals below come before any model loads
    never_loaded.write_bytes(b"")
    assert_refused(
        cli(
            "edit",
            *common,
            "--images",
            tmp_path / "one" / "Me.png",
            "--images",
            tmp_path / "two",
            "--landmarks-model",
            never_loaded,
        ),
        out,
        f"{tmp_path / 'one' / 'Me.png'} and {tmp_path / 'two' / 'Me.png'} would both be written as Me.png",
    )
    assert_refused(
        cli("edit", *common, "--images", tmp_path / "one", "--aligned", "--save-mask", "--jpeg-quality", 80),
        out,
        "--save-mask, --jpeg-quality: only for --images photos that are not --aligned (pasted back)",
    )
    assert_refused(
        cli("edit", *common, "--images", tmp_path / "one", "--landmarks-model", never_loaded, "--feather", 2),
        out,
        "--feather must be a fraction of the face's size from 0 to 1, got 2.0",
    )
