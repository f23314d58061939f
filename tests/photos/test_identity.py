"""The identity score: ArcFace IR-SE-50's cosine between a face and its reconstruction or edit, framed as the
official identity loss frames it, from a bundle's ``identity.onnx`` (no torch) or from the weights in torch.

The reference is written out here from criteria/id_loss.py: images pooled to 256 px unless they are 256 px
already, the window [35:223, 32:220], pooled to 112 px, ArcFace (:func:`cfdeploy.models.reference.arcface`, the
official formulation), the dot product of the unit embeddings. ArcFace's weights are seeded random.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import synthetic_files
from cfdeploy.backends import open_backend
from cfdeploy.bench import BenchSettings, Sources, measure_backend
from cfdeploy.exporter import export_bundle, photo_like
from cfdeploy.identity import identity_scores
from cfdeploy.models import reference
from conftest import assert_refused, rel_l2


@pytest.fixture(scope="module")
def arcface_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ArcFace IR-SE-50's state dict, seeded random, with running statistics other than 0 and 1."""
    path = tmp_path_factory.mktemp("arcface") / "model_ir_se50.pth"
    torch.save(synthetic_files.arcface_state(seed=11), path)
    return path


@pytest.fixture(scope="module")
def identity_bundle(tmp_path_factory: pytest.TempPathFactory, cfclip_64: Path, arcface_file: Path) -> tuple[Path, dict]:
    """A 64 px bundle without CLIP, exported with ArcFace: ``(bundle, manifest)``."""
    out = tmp_path_factory.mktemp("bundles") / "identity_64"
    return out, export_bundle(cfclip_64, None, out, include_clip_text=False, identity_weights=arcface_file)


def official_features(state: dict, images: torch.Tensor) -> torch.Tensor:
    """criteria/id_loss.py's extract_feats: pool to 256 unless already 256, crop [35:223, 32:220], pool to 112."""
    if images.shape[2] != 256:
        images = torch.nn.AdaptiveAvgPool2d((256, 256))(images)
    face = torch.nn.AdaptiveAvgPool2d((112, 112))(images[:, :, 35:223, 32:220])
    return reference.arcface(state, face)


def official_embeddings(state: dict, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return official_features(state, torch.from_numpy(np.ascontiguousarray(images, np.float32)))


def official_cosines(first: torch.Tensor, second: torch.Tensor) -> np.ndarray:
    """1 - the official loss's term, per row: the dot product of the unit embeddings."""
    return np.array([float(first[row].dot(second[row])) for row in range(len(first))])


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_a_face_compared_with_itself_scores_one(identity_bundle):
    backend = open_backend("onnxruntime", identity_bundle[0])
    images = photo_like((2, 3, 64, 64), np.random.default_rng(0))
    faces = photo_like((2, 3, 256, 256), np.random.default_rng(1))
    for scores in (identity_scores(backend, images, images), identity_scores(backend, faces, faces, faces)):
        for values in scores.values():
            assert np.abs(values - 1).max() <= 1e-6


def test_the_bundles_identity_graph_scores_as_the_official_loss_in_torch(identity_bundle, arcface_file):
    """The graph's features within 1e-5 of the official ones (and so checked at export); a photo's face against its
    reconstruction and its edit, each the official cosine."""
    bundle, manifest = identity_bundle
    entry = manifest["networks"]["identity"]
    assert entry["file"] == "identity.onnx" and entry["inputs"][0]["shape"] == ["batch", 3, 256, 256]
    assert max(case["rel_l2"] for case in entry["parity"].values()) <= 1e-5
    assert manifest["source"]["identity_weights"] == str(arcface_file)
    backend, state = open_backend("onnxruntime", bundle), weights(arcface_file)
    rng = np.random.default_rng(2)
    faces, sources, edits = (photo_like(shape, rng) for shape in ((2, 3, 256, 256), (2, 3, 64, 64), (2, 3, 64, 64)))
    face, source, edit = (official_embeddings(state, images) for images in (faces, sources, edits))
    assert rel_l2(backend.identity_features(faces), face.numpy()) <= 1e-5
    scores = identity_scores(backend, edits, sources, faces)
    np.testing.assert_allclose(scores["reconstruction"], official_cosines(face, source), rtol=0, atol=2e-6)
    np.testing.assert_allclose(scores["edit"], official_cosines(face, edit), rtol=0, atol=2e-6)


def test_a_core_install_scores_each_edit_against_its_source_image_as_the_official_loss_would(
    identity_bundle, arcface_file, latents_64, embedding_file, tmp_path
):
    """edit.json's scores, from a process that cannot import torch, equal the official computation on the images."""
    codes, out = tmp_path / "codes.npy", tmp_path / "edits"
    np.save(codes, np.load(latents_64)[:2])
    script = "import sys; sys.modules['torch'] = None\nfrom cfdeploy.cli import app\napp()"
    arguments = ["edit", "--bundle", identity_bundle[0], "--latents", codes, "--text-embedding", embedding_file]
    completed = subprocess.run(
        [sys.executable, "-c", script, *map(str, arguments), "--save-raw", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads((out / "edit.json").read_text())
    identity = summary["identity"]
    assert identity["network"] == f"{identity_bundle[0]}/identity.onnx"
    assert identity["reference"] == "the source code's image"
    assert "identity (ArcFace cosine with the source code's image, mean of 2): edit " in completed.stderr
    sources = open_backend("onnxruntime", identity_bundle[0]).synthesize(np.load(codes))
    state = weights(arcface_file)
    expected = official_cosines(
        official_embeddings(state, sources), official_embeddings(state, np.load(out / "images.npy"))
    )
    assert [score["row"] for score in identity["scores"]] == [0, 1]
    np.testing.assert_allclose([score["edit"] for score in identity["scores"]], expected, rtol=0, atol=2e-6)
    assert {"source_generator", "identity"} <= set(summary["timings_s"])


def test_edit_scores_a_photo_against_its_aligned_face(cli, cfclip_64, e4e_64, arcface_file, tmp_path):
    """Torch with --identity-weights on an aligned photo: the reference is the encoder's input. At strength 0 the edit
    is the reconstruction (the generator's image of the photo's code, images.npy), so both scores are its cosine."""
    rng = np.random.default_rng(3)
    face = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(
        (256, 256), Image.Resampling.BICUBIC
    )
    face.save(tmp_path / "face.png")
    features = tmp_path / "features.npy"
    np.save(features, rng.standard_normal(512).astype(np.float32))
    out = tmp_path / "edits"
    result = cli(
        "edit", "-c", cfclip_64, "--encoder", e4e_64, "--identity-weights", arcface_file, "--text-embedding", features,
        "--strength", 0, "--images", tmp_path / "face.png", "--aligned", "--save-raw", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    identity = json.loads((out / "edit.json").read_text())["identity"]
    assert (identity["network"], identity["reference"]) == (str(arcface_file), "the aligned photo")
    pixels = np.asarray(face, np.float32).transpose(2, 0, 1)[None] / np.float32(255)  # ToTensor
    photo = (pixels - np.float32(0.5)) / np.float32(0.5)  # Normalize([0.5]*3, [0.5]*3)
    state = weights(arcface_file)
    (expected,) = official_cosines(
        official_embeddings(state, photo), official_embeddings(state, np.load(out / "images.npy"))
    )
    (scores,) = identity["scores"]
    assert scores["row"] == 0
    assert abs(scores["reconstruction"] - expected) <= 2e-6 and abs(scores["edit"] - expected) <= 2e-6


def test_bench_times_the_identity_stage_of_a_bundle_with_arcface(identity_bundle):
    report = measure_backend(
        "onnxruntime", Sources(bundle=identity_bundle[0]), BenchSettings(["onnxruntime"], warmup=0, runs=1)
    )
    (result,) = report["results"]
    assert list(result["stages_s"]) == [
        "text_mapper",
        "latent_editor",
        "generator",
        "source_generator",
        "identity",
        "png",
        "total",
    ]


def test_arcface_weights_on_a_bundle_backend_are_refused_naming_the_export_option(
    cli, identity_bundle, arcface_file, latents_64, embedding_file, tmp_path
):
    out = tmp_path / "edits"
    result = cli(
        "edit", "--bundle", identity_bundle[0], "--identity-weights", arcface_file,
        "--latents", latents_64, "--text-embedding", embedding_file, "--out", out,
    )  # fmt: skip
    assert_refused(result, out, "--identity-weights is for the torch backend", "cfdeploy export --identity-weights")
