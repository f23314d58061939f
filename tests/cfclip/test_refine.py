"""CLIP-NCE refinement on small synthetic models: the formula, the gradients, the loop, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from cfdeploy.models.clip_text import ClipText
from cfdeploy.models.stylegan2 import Generator, GeneratorConfig
from cfdeploy.refine import ClipNCELoss, RefineSettings, level_mask, nce_templates, refine_latents
from conftest import assert_refused


@pytest.fixture(scope="module")
def clip_with_visual() -> ClipText:
    """A one-layer, 64-wide CLIP with random weights: CLIP's tokens, 224 px input and 512-d features.

    The loss and the loop do not depend on CLIP's depth or width; ViT-B/32 makes each step ~50x slower.
    """
    torch.manual_seed(7)
    vision = CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=32, image_size=224)
    clip = CLIP(512, vision, CLIPTextCfg(width=64, heads=2, layers=1), quick_gelu=True)
    return ClipText(clip, has_visual_weights=True).eval()


@pytest.fixture(scope="module")
def loss_fn(clip_with_visual) -> ClipNCELoss:
    return ClipNCELoss(clip_with_visual, "face", "green lipstick", augmentations=2)


@pytest.fixture(scope="module")
def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return Generator(GeneratorConfig(32, max_channels=32)).eval()


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_templates_are_the_79_imagenet_templates():
    templates = nce_templates()
    assert len(templates) == 79 and "a photo of many {}." not in templates and templates[0] == "a bad photo of a {}."


def test_loss_equals_the_formula_on_fixed_features(loss_fn):
    rng = np.random.default_rng(0)
    edited = normalise(rng.standard_normal((4, 512)))
    source = np.repeat(normalise(rng.standard_normal((2, 512))), 2, axis=0)
    t_src = loss_fn.source_text.numpy().astype(np.float64)
    target_mean = loss_fn.target_mean.numpy().astype(np.float64)
    t_tgt_minus_src_mean = loss_fn.text_direction.numpy().astype(np.float64)  # n(mean_t(T_tgt - T_src)), checked below
    query = normalise(edited - source)
    positives = np.concatenate([np.repeat(t_tgt_minus_src_mean, 4, axis=0), normalise(target_mean - source)])
    negatives = normalise(t_src - source[:1])
    queries = np.concatenate([query, query])
    logits = np.concatenate([(queries * positives).sum(1, keepdims=True), queries @ negatives.T], axis=1) / 0.1
    expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0])
    got = loss_fn.loss_from_features(torch.from_numpy(edited).float(), torch.from_numpy(source).float())
    assert float(got) == pytest.approx(expected, rel=1e-4)
    assert loss_fn.source_text.shape == (79, 512)


def test_text_direction_is_mean_of_template_differences(clip_with_visual, loss_fn):
    from cfdeploy.tokenizer import ClipTokenizer

    tokenizer = ClipTokenizer()
    src = loss_fn.template_features("face", tokenizer).numpy()
    tgt = loss_fn.template_features("green lipstick", tokenizer).numpy()
    np.testing.assert_allclose(loss_fn.text_direction.numpy()[0], normalise((tgt - src).mean(0)), atol=1e-5)
    np.testing.assert_allclose(loss_fn.target_mean.numpy()[0], tgt.mean(0), atol=1e-6)


def test_refinement_lowers_the_loss_and_only_the_latent_gets_gradients(tiny_generator, loss_fn):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1, tiny_generator.config.n_latent, 512)).astype(np.float32)
    w_hat = w + 0.1 * rng.standard_normal(w.shape).astype(np.float32)
    settings = RefineSettings(steps=6, lr=0.05, l2=0.0, patience=10, seed=3)
    refined, curve = refine_latents(tiny_generator, loss_fn, w, w_hat, settings)
    assert len(curve) == 6 and min(curve[1:]) < curve[0]
    assert not np.array_equal(refined, w_hat)
    assert all(p.grad is None for p in [*tiny_generator.parameters(), *loss_fn.parameters()])
    again, again_curve = refine_latents(tiny_generator, loss_fn, w, w_hat, settings)
    assert again_curve == curve and np.array_equal(again, refined)  # seeded augmentation: reproducible


def test_refining_only_medium_levels_leaves_the_others(tiny_generator, loss_fn):
    w = np.random.default_rng(2).standard_normal((1, tiny_generator.config.n_latent, 512)).astype(np.float32)
    settings = RefineSettings(steps=4, lr=0.05, l2=0.0, layers="medium", patience=10)
    refined, curve = refine_latents(tiny_generator, loss_fn, w, w, settings)  # 32 px: 8 levels, no fine ones
    assert np.array_equal(refined[:, :4], w[:, :4])
    assert min(curve[1:]) < curve[0] and not np.array_equal(refined[:, 4:], w[:, 4:])
    assert [float(level_mask(14, group).sum()) for group in ("coarse", "medium", "fine", "all")] == [4, 4, 6, 14]


def test_curve_starts_at_the_edit_and_the_best_latent_seen_is_returned(tiny_generator, loss_fn):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((1, tiny_generator.config.n_latent, 512)).astype(np.float32)
    w_hat = w + 0.1 * rng.standard_normal(w.shape).astype(np.float32)
    settings = RefineSettings(steps=3, lr=0.01, l2=0.5, patience=10, seed=5)
    refined, curve = refine_latents(tiny_generator, loss_fn, w, w_hat, settings)

    def objective(latent: np.ndarray) -> float:
        """NCE on the same seeded warps plus the L2 pull toward w_hat, computed here."""
        with torch.no_grad():
            source = tiny_generator(torch.from_numpy(w))
            warps = torch.Generator().manual_seed(settings.seed)
            nce = loss_fn(tiny_generator(torch.from_numpy(latent)), source, warps)
        return float(nce) + settings.l2 * float(np.mean((latent.astype(np.float64) - w_hat) ** 2))

    assert curve[0] == pytest.approx(objective(w_hat), rel=1e-5)
    assert int(np.argmin(curve)) == 1  # neither the start nor the last latent: returning either would show
    assert objective(refined) == pytest.approx(min(curve), rel=1e-5)


def test_refinement_on_the_command_line_writes_its_loss_curve(
    cli, tmp_path, cfclip_64, embedding_file, clip_vit_b32_file
):
    weights = clip_vit_b32_file  # ViT-B/32 text and image towers
    latents = tmp_path / "w.npy"
    np.save(latents, np.random.default_rng(3).standard_normal((1, 10, 512)).astype(np.float32))
    out = tmp_path / "out"
    result = cli(
        "edit",
        "-c",
        cfclip_64,
        "-l",
        latents,
        "--text-embedding",
        embedding_file,
        "--clip-weights",
        weights,
        "-o",
        out,
        "--refine-steps",
        2,
        "--save-latents",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads((out / "edit.json").read_text())
    assert len(summary["refinement"]["loss_curves"][0]) == 2 and "refine" in summary["timings_s"]
    assert summary["refinement"]["settings"]["source_text"] == "face"


def test_refinement_options_are_refused_in_one_line(
    cli, tmp_path, cfclip_64, latents_64, embedding_file, clip_state_dict_file
):
    base = ["edit", "-c", cfclip_64, "-l", latents_64, "--text-embedding", embedding_file, "-o", tmp_path / "out"]
    assert_refused(cli(*base, "--refine-steps", -1), tmp_path / "out", "--refine-steps must be 0 or more, got -1")
    assert_refused(cli(*base, "--refine-steps", 1), tmp_path / "out", "--refine-steps needs --clip-weights")
    assert_refused(
        cli(*base, "--refine-steps", 1, "--clip-weights", clip_state_dict_file), tmp_path / "out", "no visual.* weights"
    )
