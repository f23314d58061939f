"""Your own photos in: `cfdeploy invert` and `cfdeploy edit --images`, on torch (--encoder) and on a bundle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import synthetic_files
from cfdeploy.checkpoints import load_e4e
from cfdeploy.errors import CfdeployError
from cfdeploy.models import reference
from cfdeploy.photos import align_face, load_photo
from cfdeploy.photos.invert import encode_faces, photo_faces
from conftest import assert_refused, rel_l2

FIVE_POINTS = synthetic_files.FIVE_POINTS  # the first photo's face


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    """Two photos (a JPEG and a PNG) and their landmarks file, one face each."""
    folder = tmp_path_factory.mktemp("photos")
    landmarks = folder.parent / "points.json"
    synthetic_files.write_photos(folder, landmarks, seed=3)
    return folder, landmarks


@pytest.fixture(scope="module")
def e4e_64_state(e4e_64: Path) -> dict:
    return torch.load(e4e_64, weights_only=True)


def official_codes(state: dict, photo: Path, points: list) -> np.ndarray:
    """The official path: align, torchvision's inference transform, the official formulation, + latent_avg."""
    from torchvision import transforms

    aligned = align_face(load_photo(photo), np.array(points)).image
    official = transforms.Compose(
        [transforms.Resize((256, 256)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    )
    encoder = {
        key.removeprefix("encoder."): value for key, value in state["state_dict"].items() if key.startswith("encoder.")
    }
    with torch.no_grad():
        return reference.e4e(encoder, official(aligned)[None], state["latent_avg"]).numpy()[0]


def test_invert_with_the_torch_encoder_writes_codes_index_and_crops(cli, tmp_path, photos, e4e_64, e4e_64_state):
    folder, landmarks = photos
    out = tmp_path / "codes"
    result = cli(
        "invert",
        folder,
        "--encoder",
        e4e_64,
        "--landmarks",
        landmarks,
        "--out",
        out,
        "--save-aligned",
        "--save-reconstruction",
    )
    assert result.exit_code == 0, result.stderr
    codes = np.load(out / "latents.npy")
    assert codes.shape == (2, 10, 512) and codes.dtype == np.float32
    index = json.loads((out / "index.json").read_text())
    assert [row["source"] for row in index["rows"]] == [str(folder / "a.jpg"), str(folder / "b.png")]
    assert index["rows"][1]["landmarks"] == [[x + 6, y - 4] for x, y in FIVE_POINTS]
    assert {"quad", "crop_box"} <= set(index["rows"][0]["alignment"])
    expected = official_codes(e4e_64_state, folder / "a.jpg", FIVE_POINTS)
    assert rel_l2(codes[0], expected) <= 1e-4
    assert Image.open(out / "aligned" / "000000.png").size == (256, 256)
    assert Image.open(out / "reconstructions" / "000001.png").size == (64, 64)


def test_invert_from_a_bundle_matches_torch(cli, tmp_path, photos, e4e_64, bundle_with_encoder):
    folder, landmarks = photos
    runs = {}
    for name, source in (("torch", ("--encoder", e4e_64)), ("bundle", ("--bundle", bundle_with_encoder[1]))):
        out = tmp_path / name
        result = cli("invert", folder, *source, "--landmarks", landmarks, "--out", out)
        assert result.exit_code == 0, result.stderr
        runs[name] = np.load(out / "latents.npy")
    assert rel_l2(runs["bundle"], runs["torch"]) <= 1e-5


def test_edit_images_on_a_bundle_shows_photo_reconstruction_and_edit(
    cli, tmp_path, photos, bundle_with_encoder, e4e_64, embedding_file
):
    folder, landmarks = photos
    out = tmp_path / "edits"
    result = cli(
        "edit",
        "--bundle",
        bundle_with_encoder[1],
        "--images",
        folder,
        "--landmarks",
        landmarks,
        "--text-embedding",
        embedding_file,
        "--side-by-side",
        "--save-latents",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.stderr
    assert Image.open(out / "crops" / "000001.png").size == (3 * 64, 64)
    assert Image.open(out / "b.png").size == (320, 300)  # the photo back, edited
    summary = json.loads((out / "edit.json").read_text())
    assert {"align", "encoder", "latent_editor", "generator"} <= set(summary["timings_s"])
    assert [image["source"] for image in summary["inputs"]["images"]] == [str(folder / "a.jpg"), str(folder / "b.png")]
    inverted = tmp_path / "codes"
    assert cli("invert", folder, "--encoder", e4e_64, "--landmarks", landmarks, "--out", inverted).exit_code == 0
    from_codes = tmp_path / "from_codes"
    assert (
        cli(
            "edit",
            "--bundle",
            bundle_with_encoder[1],
            "--latents",
            inverted / "latents.npy",
            "--text-embedding",
            embedding_file,
            "--save-latents",
            "--out",
            from_codes,
        ).exit_code
        == 0
    )
    assert rel_l2(np.load(out / "latents.npy"), np.load(from_codes / "latents.npy")) <= 1e-5


def test_edit_images_warns_when_the_encoder_was_trained_with_another_generator(
    cli, tmp_path, photos, e4e_64, cfclip_64, embedding_file
):
    folder, landmarks = photos
    out = tmp_path / "edits"
    result = cli(
        "edit",
        "-c",
        cfclip_64,
        "--encoder",
        e4e_64,
        "--images",
        folder / "a.jpg",
        "--landmarks",
        landmarks,
        "--text-embedding",
        embedding_file,
        "--out",
        out,
    )
    assert result.exit_code == 2  # one landmarks entry per photo: two entries for one photo
    assert "entries" in result.stderr or "entry" in result.stderr
    single = tmp_path / "one.json"
    single.write_text(json.dumps([FIVE_POINTS]))
    result = cli(
        "edit",
        "-c",
        cfclip_64,
        "--encoder",
        e4e_64,
        "--images",
        folder / "a.jpg",
        "--landmarks",
        single,
        "--text-embedding",
        embedding_file,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.stderr
    trained_with = load_e4e(e4e_64).generator_sha256()
    assert f"the e4e encoder was trained with another generator (sha256 {trained_with[:12]}…)" in result.stderr
    assert "a.jpg differs from the photo by rel L2" in result.stderr


def test_photos_without_a_face_stop_the_run_or_are_skipped(cli, tmp_path, photos, e4e_64):
    folder, _ = photos
    landmarks = tmp_path / "points.json"
    landmarks.write_text(json.dumps([FIVE_POINTS, []]))
    out = tmp_path / "codes"
    assert_refused(
        cli("invert", folder, "--encoder", e4e_64, "--landmarks", landmarks, "--out", out),
        out,
        f"{folder / 'b.png'}: no face found",
    )
    result = cli("invert", folder, "--encoder", e4e_64, "--landmarks", landmarks, "--out", out, "--skip-missing")
    assert result.exit_code == 0, result.stderr
    assert f"warning: skipped {folder / 'b.png'}: no face found" in " ".join(result.stderr.split())
    assert np.load(out / "latents.npy").shape[0] == 1
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == [{"source": str(folder / "b.png"), "reason": f"{folder / 'b.png'}: no face found"}]


def test_photo_inputs_are_refused_in_one_line(cli, tmp_path, photos, e4e_64, cfclip_64, embedding_file):
    folder, _ = photos
    out = tmp_path / "out"
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    result = cli("invert", text, "--encoder", e4e_64, "--aligned", "--out", out)
    assert result.exit_code == 2 and str(text) in result.stderr and not out.exists()
    assert_refused(
        cli("invert", folder, "--encoder", e4e_64, "--out", out),
        out,
        "give exactly one of --aligned, --landmarks FILE or --landmarks-model FILE",
    )
    assert_refused(
        cli("edit", "-c", cfclip_64, "--images", folder, "--aligned", "--text-embedding", embedding_file, "--out", out),
        out,
        "encoding photos needs the e4e encoder: pass --encoder e4e_ffhq_encode.pt",
    )


def test_a_missing_file_is_refused_before_any_model_loads(cli, tmp_path):
    """The checkpoint and encoder here are not loadable: a refusal naming the landmarks model shows nothing was
    loaded before the files were checked."""
    photo = tmp_path / "me.png"
    Image.new("RGB", (32, 32)).save(photo)
    checkpoint, encoder = tmp_path / "green_lipstick.pt", tmp_path / "e4e_ffhq_encode.pt"
    for unloadable in (checkpoint, encoder):
        unloadable.write_bytes(b"not a checkpoint")
    embedding = tmp_path / "embedding.npy"
    np.save(embedding, np.zeros(512, np.float32))
    missing = tmp_path / "shape_predictor_68_face_landmarks.dat"
    out = tmp_path / "out"
    faces = ("--landmarks-model", missing, "--out", out)
    edit = ("edit", "-c", checkpoint, "--encoder", encoder, "--images", photo, "--text-embedding", embedding, *faces)
    for command in (edit, ("invert", photo, "--encoder", encoder, *faces)):
        result = cli(*command)
        assert_refused(result, out)
        assert result.stderr == f"error: {missing}: no such file\n"


def test_the_total_counts_the_alignment_and_encoding_run_before_the_edit(tmp_path):
    from cfdeploy.demo import synthetic_backend
    from cfdeploy.editing import EditJob, edit_to_directory
    from cfdeploy.outputs import StagedDirectory

    backend = synthetic_backend(size=8)
    job = EditJob(np.zeros((1, backend.n_latent, 512), np.float32), text_features=np.ones((1, 512), np.float32))
    with StagedDirectory(tmp_path / "edits", force=False) as staged:
        summary = edit_to_directory(backend, job, staged, prior_timings={"align": 30.0, "encoder": 20.0})
    assert summary["timings_s"]["align"] == 30.0 and summary["timings_s"]["encoder"] == 20.0
    assert 50.0 < summary["total_s"] < 50.0 + 10.0


class RecordingEncoder:
    """A stand-in for e4e that remembers how many photos had been decoded when each batch came."""

    def __init__(self, decoded: list[Path]) -> None:
        self.decoded = decoded
        self.seen: list[int] = []

    def encode(self, images: np.ndarray) -> np.ndarray:
        self.seen.append(len(self.decoded))
        return images.mean(axis=(2, 3))[:, None, :]


def test_photos_are_decoded_per_batch_not_all_before_the_first(tmp_path):
    """Memory follows --batch-size: each batch's photos are decoded as it is taken, a damaged photo late in the
    list stops the run after the batches before it, and an aligned photo is kept at the encoder's size."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(5):
        Image.new("RGB", (600, 500), (40 * index, 90, 200)).save(folder / f"{index}.png")
    (folder / "5.png").write_bytes((folder / "0.png").read_bytes()[:200])  # cut short
    decoded: list[Path] = []
    encoder = RecordingEncoder(decoded)
    found = photo_faces([folder], aligned=True, on_photo=decoded.append)
    assert decoded == []
    with pytest.raises(CfdeployError, match=rf"^{re.escape(str(folder / '5.png'))}: "):
        encode_faces(encoder, found, 2)
    assert encoder.seen == [2, 4] and len(found.crops) == 5
    assert {crop.image.size for crop in found.crops} == {(256, 256)}


def test_a_loop_of_symbolic_links_as_a_photo_is_refused_in_one_line(cli, tmp_path, photos):
    _, landmarks = photos
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    encoder = tmp_path / "e4e.pt"
    encoder.write_bytes(b"never loaded")
    out = tmp_path / "codes"
    result = cli("invert", loop, "--encoder", encoder, "--landmarks", landmarks, "--out", out)
    assert_refused(result, out, f"{loop}: cannot be read")


def test_a_face_outside_its_photo_is_skipped_as_no_face(cli, tmp_path, photos, e4e_64):
    folder, _ = photos
    landmarks = tmp_path / "points.json"
    landmarks.write_text(json.dumps([FIVE_POINTS, [[x + 1e6, y] for x, y in FIVE_POINTS]]))
    out = tmp_path / "codes"
    reason = f"{folder / 'b.png'}: no face inside the 320x300 photo (the landmarks of 1 face(s) lie outside it)"
    assert_refused(cli("invert", folder, "--encoder", e4e_64, "--landmarks", landmarks, "--out", out), out, reason)
    result = cli("invert", folder, "--encoder", e4e_64, "--landmarks", landmarks, "--out", out, "--skip-missing")
    assert result.exit_code == 0, result.stderr
    assert f"warning: skipped {reason}" in " ".join(result.stderr.split())
    assert json.loads((out / "index.json").read_text())["skipped"] == [
        {"source": str(folder / "b.png"), "reason": reason}
    ]
