"""ONNX bundles: export, ONNX Runtime edits against the official formulation, caching, bad bundles."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TOLERANCE, assert_refused, official_edit, official_w_hat, open_clip_features, rel_l2


def test_manifest_lists_every_file_with_hash_contract_and_parity(bundle_64):
    from cfdeploy.files import sha256_file

    manifest = json.loads((bundle_64 / "manifest.json").read_text())
    assert manifest["format"] == "cfdeploy-bundle" and manifest["format_version"] == 1
    assert manifest["opts"] == {
        "size": 64,
        "n_latent": 10,
        "style_dim": 512,
        "description": "green lipstick",
        "source_text": "face",
        "w_space": False,
        "mapper_groups": ["coarse", "medium", "fine"],
    }
    assert set(manifest["networks"]) == {"clip_text", "text_mapper", "latent_editor", "generator", "mapping"}
    for network in manifest["networks"].values():
        assert set(network["parity"]) == {"batch_1", "batch_3"}
        assert all(result["rel_l2"] <= 1e-5 for result in network["parity"].values())
    on_disk = sorted(
        str(p.relative_to(bundle_64)) for p in bundle_64.rglob("*") if p.is_file() and "cache" not in p.parts
    )
    assert sorted([*manifest["files"], "manifest.json"]) == on_disk
    assert all(sha256_file(bundle_64 / name) == digest for name, digest in manifest["files"].items())
    assert manifest["networks"]["generator"]["inputs"] == [
        {"name": "latents", "shape": ["batch", 10, 512], "dtype": "float32"}
    ]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_onnxruntime_edit_reproduces_official(
    tmp_path, cli, bundle_64, cfclip_64, latents_64, embedding_file, batch_size
):
    out = tmp_path / "out"
    result = cli(
        "edit",
        "--bundle",
        bundle_64,
        "--backend",
        "onnxruntime",
        "-l",
        latents_64,
        "--text-embedding",
        embedding_file,
        "-o",
        out,
        "-b",
        batch_size,
        "--save-latents",
        "--save-raw",
    )
    assert result.exit_code == 0, result.stderr
    w_hat, image = official_edit(cfclip_64, np.load(latents_64), np.load(embedding_file)[None])
    assert rel_l2(np.load(out / "latents.npy"), w_hat) <= TOLERANCE
    assert rel_l2(np.load(out / "images.npy"), image) <= TOLERANCE
    assert len(list(out.glob("*.png"))) == 5 and json.loads((out / "edit.json").read_text())["backend"] == "onnxruntime"


def test_text_prompt_is_encoded_by_the_bundle_then_cached(tmp_path, cli, bundle_64, cfclip_64, latents_64):
    prompt = "Purple   HAIR &amp; beard"
    runs = []
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        result = cli("edit", "--bundle", bundle_64, "-l", latents_64, "--text", prompt, "-o", out, "--save-latents")
        assert result.exit_code == 0, result.stderr
        runs.append((np.load(out / "latents.npy"), json.loads((out / "edit.json").read_text())["timings_s"]))
    (first, first_timings), (second, second_timings) = runs
    assert "clip_text" in first_timings and "clip_text" not in second_timings and "text_mapper" not in second_timings
    assert np.array_equal(first, second)
    assert len(list((bundle_64 / "cache").glob("*.npy"))) >= 1
    w_hat = official_w_hat(cfclip_64, np.load(latents_64), open_clip_features([prompt]))
    assert rel_l2(first, w_hat) <= TOLERANCE


def test_precomputed_prompt_needs_no_clip(tmp_path, cli, bundle_64, cfclip_64, latents_64):
    out = tmp_path / "out"
    assert (
        cli(
            "edit", "--bundle", bundle_64, "-l", latents_64, "--text", "green lipstick", "-o", out, "--save-latents"
        ).exit_code
        == 0
    )
    assert "text_encoder" not in json.loads((out / "edit.json").read_text())["timings_s"]
    w_hat = official_w_hat(cfclip_64, np.load(latents_64), open_clip_features(["green lipstick"]))
    assert rel_l2(np.load(out / "latents.npy"), w_hat) <= TOLERANCE


def test_seed_latents_on_a_bundle_match_the_torch_backend(tmp_path, cli, bundle_64, cfclip_64, embedding_file):
    results = {}
    for backend, source in (("onnxruntime", ("--bundle", bundle_64)), ("torch", ("--checkpoint", cfclip_64))):
        out = tmp_path / backend
        assert (
            cli(
                "edit",
                *source,
                "--backend",
                backend,
                "--seed",
                3,
                "--num",
                2,
                "--truncation",
                0.5,
                "--text-embedding",
                embedding_file,
                "-o",
                out,
                "--save-latents",
            ).exit_code
            == 0
        )
        results[backend] = np.load(out / "latents.npy")
    assert rel_l2(results["onnxruntime"], results["torch"]) <= TOLERANCE


@pytest.fixture
def bundle_copy(tmp_path, bundle_64) -> Path:
    """A cheap copy (hard links) of the session bundle that a test may damage."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_64, copy, copy_function=os.link, ignore=shutil.ignore_patterns("cache"))
    manifest = copy / "manifest.json"
    manifest.unlink()
    shutil.copyfile(bundle_64 / "manifest.json", manifest)
    return copy


def run_on(cli, bundle: Path, out: Path, latents: Path, embedding: Path):
    return cli("edit", "--bundle", bundle, "-l", latents, "--text-embedding", embedding, "-o", out)


def test_a_bundle_missing_a_graph_is_refused_naming_it(tmp_path, cli, bundle_copy, latents_64, embedding_file):
    (bundle_copy / "generator.onnx").unlink()
    assert_refused(
        run_on(cli, bundle_copy, tmp_path / "out", latents_64, embedding_file),
        tmp_path / "out",
        f"{bundle_copy / 'generator.onnx'}: missing from the bundle",
    )


def test_a_bundle_file_with_the_wrong_hash_is_refused(tmp_path, cli, bundle_copy, latents_64, embedding_file):
    graph = bundle_copy / "latent_editor.onnx"
    data = bytearray(graph.read_bytes())
    graph.unlink()
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    assert_refused(
        run_on(cli, bundle_copy, tmp_path / "out", latents_64, embedding_file),
        tmp_path / "out",
        str(graph),
        "differs from the manifest",
    )


def test_a_bundle_of_an_unknown_format_version_is_refused(tmp_path, cli, bundle_copy, latents_64, embedding_file):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(
        run_on(cli, bundle_copy, tmp_path / "out", latents_64, embedding_file),
        tmp_path / "out",
        "bundle format version 99, this cfdeploy reads version 1",
    )


def test_a_directory_without_a_manifest_is_refused_as_no_bundle(tmp_path, cli, latents_64, embedding_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(
        run_on(cli, empty, tmp_path / "out", latents_64, embedding_file),
        tmp_path / "out",
        "manifest.json: missing; not a cfdeploy bundle",
    )


def test_latents_for_another_generator_size_than_the_bundles_are_refused(tmp_path, cli, bundle_64, embedding_file):
    latents = tmp_path / "w1024.npy"
    np.save(latents, np.zeros((2, 18, 512), np.float32))
    assert_refused(
        run_on(cli, bundle_64, tmp_path / "out", latents, embedding_file),
        tmp_path / "out",
        str(latents),
        "latents have 18 levels, the generator needs 10",
    )


def test_an_unavailable_onnxruntime_provider_is_refused(tmp_path, cli, bundle_64, latents_64, embedding_file):
    result = cli(
        "edit",
        "--bundle",
        bundle_64,
        "-l",
        latents_64,
        "--text-embedding",
        embedding_file,
        "-o",
        tmp_path / "out",
        "--providers",
        "NoSuchExecutionProvider",
    )
    assert_refused(result, tmp_path / "out", "NoSuchExecutionProvider are not available here")


def test_export_refuses_existing_bundle_without_force(tmp_path, cli, bundle_64, cfclip_64, clip_state_dict_file):
    before = (bundle_64 / "manifest.json").read_bytes()
    result = cli("export", "-c", cfclip_64, "--clip-weights", clip_state_dict_file, "--out", bundle_64)
    assert result.exit_code == 2 and "not empty (use --force" in result.stderr
    assert (bundle_64 / "manifest.json").read_bytes() == before


def test_inspect_of_a_bundle_reports_size_prompts_and_parity(cli, bundle_64):
    report = json.loads(cli("inspect", bundle_64, "--json").stdout)
    assert report["kind"] == "cfdeploy bundle" and report["resolution"] == 64
    assert report["precomputed_prompts"] == ["green lipstick"] and report["worst_parity_rel_l2"] <= 1e-5
