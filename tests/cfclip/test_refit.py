"""``cfdeploy refit`` on the ONNX Runtime path: another prompt's mappers, same generator, checked against the official edit."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from typer.testing import Result

from conftest import TOLERANCE, checkpoint_with_generator_of, official_edit, open_clip_features, rel_l2, run_cli


@pytest.fixture
def bundle_copy(tmp_path, bundle_256) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_256, copy, ignore=shutil.ignore_patterns("cache"))
    return copy


def edit(cli, bundle: Path, out: Path, latents: Path, *text: str) -> np.ndarray:
    result = cli("edit", "--bundle", bundle, "-l", latents, *text, "-o", out, "--save-latents", "--save-raw")
    assert result.exit_code == 0, result.stderr
    return np.load(out / "latents.npy")


OLD_ENGINE = ("10.3.0", "Orin", "8.7", "fp32", (1, 4, 8), True)  # a TensorRT engine's key, but for the text mapper's hash


@dataclass
class Refit:
    bundle: Path
    checkpoint: Path  # the other prompt's file: its mappers, the bundle's generator
    before: np.ndarray  # an edit's w_hat before the refit
    generator_inode: int
    text_mapper_sha: str  # before the refit
    result: Result


@pytest.fixture(scope="module")
def refitted(tmp_path_factory, bundle_256, latents_256) -> Refit:
    """A copy of the session bundle holding an engine for its text mapper, edited once, then refitted with another
    prompt's mappers ("blue eyes", the same generator): one refit, which the tests below check from both sides."""
    from cfdeploy.trt.plan import EngineKey, engine_paths

    directory = tmp_path_factory.mktemp("refit")
    bundle = directory / "bundle"
    shutil.copytree(bundle_256, bundle, ignore=shutil.ignore_patterns("cache"))
    engine_dir = bundle / "tensorrt"
    engine_dir.mkdir()
    old_sha = json.loads((bundle / "manifest.json").read_text())["files"]["text_mapper.onnx"]
    engine_path, key_path = engine_paths(engine_dir, "text_mapper")
    engine_path.write_bytes(b"serialized engine")
    key_path.write_text(json.dumps(EngineKey("text_mapper", old_sha, *OLD_ENGINE).as_dict()))
    other = directory / "blue_eyes.pt"
    checkpoint_with_generator_of(other, generator_seed=1, mapper_seed=7, description="blue eyes")
    before = edit(run_cli, bundle, directory / "before", latents_256, "--text", "green lipstick")
    generator_inode = (bundle / "generator.onnx").stat().st_ino
    return Refit(bundle, other, before, generator_inode, old_sha, run_cli("refit", "--bundle", bundle, "-c", other))


def test_refit_swaps_mappers_and_next_edit_uses_them(tmp_path, cli, refitted, latents_256, embedding_file):
    bundle_copy, other, result = refitted.bundle, refitted.checkpoint, refitted.result
    assert result.exit_code == 0, result.stderr
    assert "blue eyes" in result.stderr

    w = np.load(latents_256)
    for name, text, features in [
        ("embedding", ("--text-embedding", embedding_file), np.load(embedding_file)[None]),
        ("stored_prompt", ("--text", "green lipstick"), open_clip_features(["green lipstick"])),
        ("new_prompt", ("--text", "red hat"), open_clip_features(["red hat"])),
    ]:
        w_hat = edit(cli, bundle_copy, tmp_path / name, latents_256, *text)
        expected_w_hat, expected_image = official_edit(other, w, features)
        assert rel_l2(w_hat, expected_w_hat) <= TOLERANCE, name
        assert rel_l2(np.load(tmp_path / name / "images.npy"), expected_image) <= TOLERANCE, name
    assert rel_l2(refitted.before, expected_w_hat) > 1e-2  # the old mappers really edited differently

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    assert manifest["opts"]["description"] == "blue eyes"
    assert manifest["refits"][-1]["checkpoint"] == str(other)
    assert len(manifest["refits"][-1]["changed_weights"]["latent_editor"]) > 0
    assert (bundle_copy / "generator.onnx").stat().st_ino == refitted.generator_inode  # kept, not rewritten
    assert [p.name for p in bundle_copy.parent.glob(".bundle.*")] == []  # no lock, staging or old copy left


@pytest.mark.parametrize("generator_seed,opts,message", [
    (9, {}, "generator weights"),
    (1, {"no_fine_mapper": True}, "mapper groups ['coarse', 'medium'] differ from the bundle's ['coarse', 'medium', 'fine']"),
])
def test_refit_refuses_another_generator_or_mapper_layout(tmp_path, cli, bundle_copy, generator_seed, opts, message):
    other = tmp_path / "other.pt"
    checkpoint_with_generator_of(other, generator_seed=generator_seed, mapper_seed=7, **opts)
    manifest = (bundle_copy / "manifest.json").read_bytes()
    result = cli("refit", "--bundle", bundle_copy, "-c", other)
    assert result.exit_code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert (bundle_copy / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")) == []


def test_refit_leaves_tensorrt_engines_it_cannot_refit_stale_and_refused(cli, refitted):
    from cfdeploy.trt.plan import EngineKey, check_engine

    bundle_copy, result = refitted.bundle, refitted.result
    assert result.exit_code == 0, result.stderr
    assert "engines for text_mapper not refitted here" in result.stderr
    engines = json.loads(cli("inspect", bundle_copy, "--json").stdout)["tensorrt_engines"]
    assert engines == {"text_mapper": "fp32, batch 1..8 (opt 4), TensorRT 10.3.0, Orin (compute 8.7); stale: the graph changed since"}
    new_sha = json.loads((bundle_copy / "manifest.json").read_text())["files"]["text_mapper.onnx"]
    assert new_sha != refitted.text_mapper_sha
    with pytest.raises(Exception, match=r"ONNX graph sha256: engine has [0-9a-f]{12}…, wanted [0-9a-f]{12}…"):
        check_engine(bundle_copy / "tensorrt", EngineKey("text_mapper", new_sha, *OLD_ENGINE))
