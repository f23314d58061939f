"""Several edits at once: ``--text`` (or ``--text-embedding``) repeated composes ``w + Σᵢ sᵢ·0.1·Δᵢ``, every
delta taken from the source codes, an extension beyond the paper's single edit.

The reference is built from single-prompt runs alone: each run's ``w_hat_i − w`` is its ``sᵢ·0.1·Δᵢ``, and their
sum is added to ``w`` here in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cfdeploy.backends import open_backend
from cfdeploy.editing import EditJob, edit
from conftest import assert_refused

PROMPTS = ("green lipstick", "blue eyes")
STRENGTHS = (1.0, -0.5)


@pytest.fixture(scope="module")
def backend(cfclip_64: Path, clip_state_dict_file: Path):
    return open_backend("torch", cfclip_64, clip_weights=clip_state_dict_file)


@pytest.fixture(scope="module")
def codes(tmp_path_factory: pytest.TempPathFactory, latents_64: Path) -> Path:
    """Two W+ codes of the 64 px generator."""
    path = tmp_path_factory.mktemp("codes") / "two.npy"
    np.save(path, np.load(latents_64)[:2])
    return path


def test_several_prompts_add_each_prompts_edit_of_the_source_codes(
    cli, backend, cfclip_64, clip_state_dict_file, codes, tmp_path
):
    out = tmp_path / "edits"
    result = cli(
        "edit", "-c", cfclip_64, "--clip-weights", clip_state_dict_file,
        "-t", PROMPTS[0], "-t", PROMPTS[1], "-s", STRENGTHS[0], "-s", STRENGTHS[1],
        "--latents", codes, "--save-latents", "--save-raw", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    w = np.load(codes)
    singles = [
        edit(backend, EditJob(w, prompt, strength=strength)).w_hat
        for prompt, strength in zip(PROMPTS, STRENGTHS, strict=True)
    ]
    expected = w.astype(np.float64) + sum(single.astype(np.float64) - w for single in singles)
    composed = np.load(out / "latents.npy")
    np.testing.assert_allclose(composed, expected, rtol=0, atol=1e-6)
    assert not np.allclose(composed, singles[0], atol=1e-3)  # the second prompt moved the codes too

    in_memory = edit(backend, EditJob(w, list(PROMPTS), strength=list(STRENGTHS)))  # the Python API
    np.testing.assert_array_equal(in_memory.w_hat, composed)
    np.testing.assert_array_equal(in_memory.images, np.load(out / "images.npy"))
    summary = json.loads((out / "edit.json").read_text())
    assert (summary["prompt"], summary["strength"]) == (list(PROMPTS), list(STRENGTHS))


def test_one_strength_serves_every_prompt_and_text_features_compose_as_prompts_do(backend, codes):
    w = np.load(codes)
    features = [backend.text_features(backend.tokenize([prompt])) for prompt in PROMPTS]
    from_features = edit(backend, EditJob(w, text_features=features, strength=0.7)).w_hat
    from_prompts = edit(backend, EditJob(w, list(PROMPTS), strength=[0.7, 0.7])).w_hat
    np.testing.assert_array_equal(from_features, from_prompts)


def test_one_prompt_is_the_papers_edit_bit_for_bit(backend, codes):
    """One prompt, given alone or as a list of one, is the latent editor's output as it is."""
    w = np.load(codes)
    text_latents = backend.text_latents(backend.text_features(backend.tokenize([PROMPTS[0]])))
    direct = np.concatenate([backend.edit_latents(w[row : row + 1], text_latents, 0.7) for row in range(len(w))])
    for prompt in (PROMPTS[0], [PROMPTS[0]]):
        np.testing.assert_array_equal(edit(backend, EditJob(w, prompt, strength=0.7)).w_hat, direct)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ("-t", "a", "-t", "b", "-s", "1", "-s", "2", "-s", "3"),
            "3 strengths for 2 prompts: give one --strength for all",
        ),
        (
            ("-t", "a", "--text-embedding", "EMBEDDING"),
            "give --text or --text-embedding (each may be repeated), not both",
        ),
        (
            ("-t", "a", "-t", "b", "--refine-steps", "2", "--clip-weights", "CLIP"),
            "--refine-steps refines toward one prompt: give one --text",
        ),
    ],
)
def test_prompts_and_strengths_that_do_not_pair_are_refused_in_one_line(
    cli, cfclip_64, clip_state_dict_file, latents_64, embedding_file, tmp_path, options, message
):
    named = {"EMBEDDING": embedding_file, "CLIP": clip_state_dict_file}
    out = tmp_path / "edits"
    given = [named.get(option, option) for option in options]
    assert_refused(cli("edit", "-c", cfclip_64, *given, "--latents", latents_64, "--out", out), out, message)
