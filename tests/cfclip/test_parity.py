"""End to end through the CLI against the official formulation, on official-format synthetic files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from cfdeploy.models import reference
from cfdeploy.models.clip_text import CLIP_ARCHITECTURE, encode_text_to_last_end
from conftest import (
    CLIP_SEED,
    TOKENIZER_PROMPTS,
    TOLERANCE,
    official_edit,
    official_w_hat,
    open_clip_features,
    open_clip_model,
    rel_l2,
)
from synthetic_files import clip_text_state

PROMPTS = ["A Photo of a DOG!!", "green   lipstick", "rock &amp; roll, baby.", "Hello,World?  sunglasses\n"]


def png_values(raw: np.ndarray) -> np.ndarray:
    """What a PNG of ``[3, H, W]`` generator output must hold: [-1, 1] clamped, mapped to 0..255, rounded."""
    return np.floor((np.clip(raw, -1, 1) + 1) / 2 * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


# Batching is checked at 64 px; at 1024 px one image (two held the test process at over 7 GB)
@pytest.mark.parametrize("checkpoint_fixture,count,batch_size", [("cfclip_64", 5, 2), ("cfclip_1024", 1, 1)])
def test_edit_reproduces_official_w_hat_and_image(request, tmp_path, cli, checkpoint_fixture, count, batch_size):
    checkpoint = request.getfixturevalue(checkpoint_fixture)
    n_latent = torch.load(checkpoint, weights_only=True)["opts"]["stylegan_size"].bit_length() * 2 - 4
    w = np.random.default_rng(7).standard_normal((count, n_latent, 512)).astype(np.float32)
    features = np.random.default_rng(8).standard_normal((1, 512)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "t.npy", features[0])
    out = tmp_path / "out"
    result = cli(
        "edit",
        "--checkpoint",
        checkpoint,
        "--latents",
        tmp_path / "w.npy",
        "--text-embedding",
        tmp_path / "t.npy",
        "--out",
        out,
        "--backend",
        "torch",
        "--batch-size",
        batch_size,
        "--save-latents",
        "--save-raw",
    )
    assert result.exit_code == 0, result.stderr

    w_hat, image = official_edit(checkpoint, w, features)
    assert rel_l2(np.load(out / "latents.npy"), w_hat) <= TOLERANCE
    assert rel_l2(np.load(out / "images.npy"), image) <= TOLERANCE
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(count)]
    summary = json.loads((out / "edit.json").read_text())
    assert summary["count"] == count and summary["strength"] == 1.0
    assert {"latent_editor", "generator", "text_mapper", "png"} <= set(summary["timings_s"])


def test_png_is_the_clamped_raw_image(tmp_path, cli, cfclip_64, latents_64, embedding_file):
    from PIL import Image

    out = tmp_path / "out"
    assert (
        cli(
            "edit", "-c", cfclip_64, "-l", latents_64, "--text-embedding", embedding_file, "-o", out, "--save-raw"
        ).exit_code
        == 0
    )
    raw = np.load(out / "images.npy")[2]
    assert np.array_equal(np.asarray(Image.open(out / "000002.png")), png_values(raw))


def test_text_prompt_goes_through_clip_like_open_clip(tmp_path, cli, cfclip_64, latents_64, clip_torchscript_file):
    out = tmp_path / "out"
    result = cli(
        "edit",
        "-c",
        cfclip_64,
        "-l",
        latents_64,
        "--text",
        "green lipstick",
        "--clip-weights",
        clip_torchscript_file,
        "-o",
        out,
        "--save-latents",
        "--save-raw",
        "--strength",
        "1",
    )
    assert result.exit_code == 0, result.stderr
    # OpenAI's archive stores fp16 weights: the independent reference uses the same rounded values.
    model = open_clip.create_model(CLIP_ARCHITECTURE, pretrained=None)
    model.load_state_dict({k: v.half().float() for k, v in clip_text_state(CLIP_SEED).items()}, strict=False)
    with torch.no_grad():
        features = model.eval().encode_text(open_clip.tokenize(["green lipstick"])).numpy()
    w_hat, image = official_edit(cfclip_64, np.load(latents_64), features)
    assert rel_l2(np.load(out / "latents.npy"), w_hat) <= TOLERANCE
    assert rel_l2(np.load(out / "images.npy"), image) <= TOLERANCE


def test_per_latent_embeddings_and_strength_scale_the_official_edit(tmp_path, cli, cfclip_64, latents_64):
    w = np.load(latents_64)
    features = np.random.default_rng(9).standard_normal((len(w), 512)).astype(np.float32)
    np.save(tmp_path / "t.npy", features)
    out = tmp_path / "out"
    assert (
        cli(
            "edit",
            "-c",
            cfclip_64,
            "-l",
            latents_64,
            "--text-embedding",
            tmp_path / "t.npy",
            "-o",
            out,
            "--strength",
            "2.5",
            "--save-latents",
        ).exit_code
        == 0
    )
    unscaled = official_w_hat(cfclip_64, w, features)
    expected = w + 2.5 * (unscaled - w)
    assert rel_l2(np.load(out / "latents.npy"), expected) <= TOLERANCE


def test_w_latents_broadcast_to_every_level(tmp_path, cli, cfclip_64, embedding_file):
    w = np.random.default_rng(10).standard_normal((2, 512)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    torch.save(torch.from_numpy(w), tmp_path / "w.pt")
    for name in ("w.npy", "w.pt"):
        out = tmp_path / f"out_{name}"
        assert (
            cli(
                "edit",
                "-c",
                cfclip_64,
                "-l",
                tmp_path / name,
                "--text-embedding",
                embedding_file,
                "-o",
                out,
                "--save-latents",
            ).exit_code
            == 0
        )
        w_hat = official_w_hat(cfclip_64, np.repeat(w[:, None], 10, axis=1), np.load(embedding_file)[None])
        assert rel_l2(np.load(out / "latents.npy"), w_hat) <= TOLERANCE


def test_seed_latents_are_the_mapping_network_of_numpy_z(tmp_path, cli, cfclip_64, embedding_file):
    out = tmp_path / "out"
    assert (
        cli(
            "edit",
            "-c",
            cfclip_64,
            "--seed",
            11,
            "--num",
            3,
            "--truncation",
            1,
            "--text-embedding",
            embedding_file,
            "-o",
            out,
            "--strength",
            0,
            "--save-latents",
            "--side-by-side",
        ).exit_code
        == 0
    )
    state = torch.load(cfclip_64, weights_only=True)["state_dict"]
    decoder = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
    z = torch.from_numpy(np.random.default_rng(11).standard_normal((3, 512)).astype(np.float32))
    with torch.no_grad():
        w_plus = reference.mapping(decoder, z)[:, None].repeat(1, 10, 1)
        source_image = reference.generator(decoder, w_plus[:1])[0].numpy()
    assert rel_l2(np.load(out / "latents.npy"), w_plus.numpy()) <= TOLERANCE
    from PIL import Image

    pair = np.asarray(Image.open(out / "000000.png")).astype(np.int16)
    assert pair.shape == (64, 128, 3)
    # Strength 0: both halves are the official image of the unedited code (float rounding may move a value by 1).
    expected = png_values(source_image).astype(np.int16)
    for half in (pair[:, :64], pair[:, 64:]):
        assert np.abs(half - expected).max() <= 1 and np.mean(half != expected) < 0.01


@pytest.mark.parametrize("weights_fixture", ["clip_state_dict_file", "clip_safetensors_file"])
def test_embed_reproduces_open_clip_features(request, tmp_path, cli, weights_fixture):
    weights = request.getfixturevalue(weights_fixture)
    out = tmp_path / "features.npy"
    result = cli("embed", *PROMPTS, "--clip-weights", weights, "--out", out)
    assert result.exit_code == 0, result.stderr
    got = np.load(out)
    assert got.shape == (len(PROMPTS), 512) and got.dtype == np.float32
    expected = open_clip_features(PROMPTS)
    for row in range(len(PROMPTS)):
        assert rel_l2(got[row], expected[row]) <= TOLERANCE


def test_template_features_skip_the_padding_after_the_last_end_token_and_equal_open_clips():
    """CF-CLIP's templates run through CLIP up to their longest prompt's end-of-text token, not all 77 positions."""
    prompts = [*TOKENIZER_PROMPTS[:4], "word " * 75]  # short prompts beside one of 77 tokens: nothing to cut
    tokens = open_clip.tokenize(prompts)
    model = open_clip_model(CLIP_SEED)
    with torch.no_grad():
        for rows in (slice(0, 4), slice(0, 5)):
            got = encode_text_to_last_end(model, tokens[rows])
            expected = open_clip_features(prompts[rows])
            assert got.shape == (len(expected), 512)
            for row in range(len(expected)):
                assert rel_l2(got[row], expected[row]) <= 1e-6


@pytest.fixture(scope="session")
def clip_safetensors_file(files: Path) -> Path:
    from safetensors.torch import save_file

    path = files / "open_clip_model.safetensors"
    save_file(clip_text_state(seed=CLIP_SEED), str(path))
    return path
