"""``cfdeploy refit`` on the ONNX Runtime path: another prompt's mappers, same generator, checked against the official edit."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import Result

from conftest import (
    TOLERANCE,
    checkpoint_with_generator_of,
    official_edit,
    official_w_hat,
    open_clip_features,
    rel_l2,
    run_cli,
)


@pytest.fixture
def bundle_copy(tmp_path, bundle_64) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_64, copy, ignore=shutil.ignore_patterns("cache"))
    return copy


def edit(cli, bundle: Path, out: Path, latents: Path, *text: str) -> np.ndarray:
    result = cli("edit", "--bundle", bundle, "-l", latents, *text, "-o", out, "--save-latents", "--save-raw")
    assert result.exit_code == 0, result.stderr
    return np.load(out / "latents.npy")


OLD_ENGINE = (
    "10.3.0",
    "Orin",
    "8.7",
    "fp32",
    (1, 4, 8),
    True,
)  # a TensorRT engine's key, but for the text mapper's hash


@dataclass
class Refit:
    bundle: Path
    checkpoint: Path  # the other prompt's file: its mappers, the bundle's generator
    before: np.ndarray  # an edit's w_hat before the refit
    generator_inode: int
    text_mapper_sha: str  # before the refit
    result: Result


@pytest.fixture(scope="module")
def refitted(tmp_path_factory, bundle_64, latents_64) -> Refit:
    """A copy of the session bundle holding an engine for its text mapper, edited once, then refitted with another
    prompt's mappers ("blue eyes", the same generator): one refit, which the tests below check from both sides."""
    from cfdeploy.trt.plan import EngineKey, engine_paths

    directory = tmp_path_factory.mktemp("refit")
    bundle = directory / "bundle"
    shutil.copytree(bundle_64, bundle, ignore=shutil.ignore_patterns("cache"))
    engine_dir = bundle / "tensorrt"
    engine_dir.mkdir()
    old_sha = json.loads((bundle / "manifest.json").read_text())["files"]["text_mapper.onnx"]
    engine_path, key_path = engine_paths(engine_dir, "text_mapper")
    engine_path.write_bytes(b"serialized engine")
    key_path.write_text(json.dumps(EngineKey("text_mapper", old_sha, *OLD_ENGINE).as_dict()))
    other = directory / "blue_eyes.pt"
    checkpoint_with_generator_of(other, generator_seed=6, mapper_seed=7, size=64, description="blue eyes")
    before = edit(run_cli, bundle, directory / "before", latents_64, "--text", "green lipstick")
    generator_inode = (bundle / "generator.onnx").stat().st_ino
    return Refit(bundle, other, before, generator_inode, old_sha, run_cli("refit", "--bundle", bundle, "-c", other))


def test_refit_swaps_mappers_and_next_edit_uses_them(tmp_path, cli, refitted, latents_64, embedding_file):
    bundle_copy, other, result = refitted.bundle, refitted.checkpoint, refitted.result
    assert result.exit_code == 0, result.stderr
    assert "blue eyes" in result.stderr

    w = np.load(latents_64)
    for name, text, features in [
        ("embedding", ("--text-embedding", embedding_file), np.load(embedding_file)[None]),
        ("stored_prompt", ("--text", "green lipstick"), open_clip_features(["green lipstick"])),
        ("new_prompt", ("--text", "red hat"), open_clip_features(["red hat"])),
    ]:
        w_hat = edit(cli, bundle_copy, tmp_path / name, latents_64, *text)
        assert rel_l2(w_hat, official_w_hat(other, w, features)) <= TOLERANCE, name
    _, expected_image = official_edit(other, w, features)  # the generator is the bundle's: one image check suffices
    assert rel_l2(np.load(tmp_path / "new_prompt" / "images.npy"), expected_image) <= TOLERANCE
    assert rel_l2(refitted.before, official_w_hat(other, w, features)) > 1e-2  # the old mappers edited differently

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    assert manifest["opts"]["description"] == "blue eyes"
    assert manifest["refits"][-1]["checkpoint"] == str(other)
    assert len(manifest["refits"][-1]["changed_weights"]["latent_editor"]) > 0
    assert (bundle_copy / "generator.onnx").stat().st_ino == refitted.generator_inode  # kept, not rewritten
    assert [p.name for p in bundle_copy.parent.glob(".bundle.*")] == []  # no lock, staging or old copy left


@pytest.mark.parametrize(
    "generator_seed,opts,message",
    [
        (9, {}, "generator weights"),
        (
            6,
            {"no_fine_mapper": True},
            "mapper groups ['coarse', 'medium'] differ from the bundle's ['coarse', 'medium', 'fine']",
        ),
    ],
)
def test_refit_refuses_another_generator_or_mapper_layout(tmp_path, cli, bundle_copy, generator_seed, opts, message):
    other = tmp_path / "other.pt"
    checkpoint_with_generator_of(other, generator_seed=generator_seed, mapper_seed=7, size=64, **opts)
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
    assert engines == {
        "text_mapper": "fp32, batch 1..8 (opt 4), TensorRT 10.3.0, Orin (compute 8.7); stale: the graph changed since"
    }
    new_sha = json.loads((bundle_copy / "manifest.json").read_text())["files"]["text_mapper.onnx"]
    assert new_sha != refitted.text_mapper_sha
    with pytest.raises(Exception, match=r"ONNX graph sha256: engine has [0-9a-f]{12}…, wanted [0-9a-f]{12}…"):
        check_engine(bundle_copy / "tensorrt", EngineKey("text_mapper", new_sha, *OLD_ENGINE))


# Refit with any checkpoint of the bundle's architecture: the bundle below is exported from a checkpoint whose
# mappers are as a new training run starts them (every bias zero, as `cfdeploy train` and the demo's files make
# them), and refitted with checkpoints whose weights and biases all differ from it.

EDIT_TOLERANCE = 1e-6  # refit against a fresh export: the same graphs, so (nearly) the same floats


def zero_mapper_biases(content: dict) -> dict:
    for key, value in content["state_dict"].items():
        if not key.startswith("decoder.") and key.endswith(".bias"):
            value.zero_()
    return content


def export_without_clip(checkpoint: Path, clip_weights: Path, out: Path) -> Path:
    from cfdeploy.exporter import export_bundle

    export_bundle(checkpoint, clip_weights, out, include_clip_text=False)
    return out


@pytest.fixture(scope="module")
def new_run_bundle(tmp_path_factory, cfclip_64, clip_state_dict_file) -> Path:
    """A 64 px bundle (no CLIP graph) of a checkpoint with cfclip_64's generator and freshly initialised mappers."""
    directory = tmp_path_factory.mktemp("refit_any")
    checkpoint = directory / "new_run.pt"
    torch.save(zero_mapper_biases(torch.load(cfclip_64, weights_only=True)), checkpoint)
    return export_without_clip(checkpoint, clip_state_dict_file, directory / "bundle")


def refitted_copy(bundle: Path, checkpoint: Path, out: Path) -> Path:
    from cfdeploy.refit import refit_bundle

    shutil.copytree(bundle, out)
    refit_bundle(out, checkpoint)
    return out


def edit_end_to_end(bundle: Path, w: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w_hat`` and the image, every stage through the bundle's graphs in ONNX Runtime."""
    from cfdeploy.backends import open_backend

    backend = open_backend("onnxruntime", bundle, providers=["CPUExecutionProvider"])
    text_latents = np.repeat(backend.text_latents(features), len(w), axis=0)
    w_hat = backend.edit_latents(w, text_latents, 1.0)
    return w_hat, backend.synthesize(w_hat)


def network_outputs(bundle: Path, network: str) -> list[np.ndarray]:
    from cfdeploy.backends import open_backend
    from cfdeploy.exporter import parity_cases

    backend = open_backend("onnxruntime", bundle, providers=["CPUExecutionProvider"])
    return [backend.run(network, **inputs) for inputs in parity_cases(backend.bundle.contracts[network]).values()]


def test_refit_with_a_checkpoint_whose_weights_and_biases_all_differ_matches_its_fresh_export(
    tmp_path, new_run_bundle, cfclip_64, other_prompt_64, other_prompt_bundle_64
):
    """``other_prompt_bundle_64`` is the fresh export of ``other_prompt_64`` (``cfclip_64``'s generator)."""
    from cfdeploy.refit import REFIT_NETWORKS, initializer_weights

    other, fresh = other_prompt_64, other_prompt_bundle_64
    bundled = zero_mapper_biases(torch.load(cfclip_64, weights_only=True))["state_dict"]
    for key, value in torch.load(other, weights_only=True)["state_dict"].items():
        if not key.startswith("decoder."):  # every mapper tensor differs from the bundle's; no bias is zero
            assert not torch.equal(value, bundled[key]) and (not key.endswith(".bias") or value.all()), key
        else:
            assert torch.equal(value, bundled[key]), key

    refitted = refitted_copy(new_run_bundle, other, tmp_path / "refitted")
    reused = json.loads((fresh / "manifest.json").read_text())["export"]["reused"]
    assert not set(REFIT_NETWORKS) & set(reused), reused  # the refitted graphs traced anew; the generator may be reused

    for network in REFIT_NETWORKS:
        graph = f"{network}.onnx"
        assert initializer_weights(onnx.load(refitted / graph)) == initializer_weights(onnx.load(fresh / graph)), (
            network
        )
        for got, expected in zip(network_outputs(refitted, network), network_outputs(fresh, network), strict=True):
            assert rel_l2(got, expected) <= EDIT_TOLERANCE, network
    w = np.random.default_rng(5).standard_normal((2, 10, 512)).astype(np.float32)
    features = np.random.default_rng(6).standard_normal((1, 512)).astype(np.float32)
    (w_hat, image), (fresh_w_hat, fresh_image) = (
        edit_end_to_end(refitted, w, features),
        edit_end_to_end(fresh, w, features),
    )
    assert rel_l2(w_hat, fresh_w_hat) <= EDIT_TOLERANCE and rel_l2(image, fresh_image) <= EDIT_TOLERANCE
    expected_w_hat, expected_image = official_edit(other, w, features)
    assert rel_l2(w_hat, expected_w_hat) <= TOLERANCE and rel_l2(image, expected_image) <= TOLERANCE
    assert rel_l2(edit_end_to_end(new_run_bundle, w, features)[0], w_hat) > 1e-2  # the refit really changed the edit


def test_refit_names_in_one_line_the_weight_it_cannot_place_and_why():
    from cfdeploy.errors import CfdeployError
    from cfdeploy.refit import WeightInfo, match_weights

    bundle = {
        "mapper_0.mapping.1.weight_t": WeightInfo((4, 4), "a"),
        "mapper_0.mapping.1.bias": WeightInfo((4,), "b"),
        "val_0": WeightInfo((1,), "c"),
    }
    weights = ["mapper_0.mapping.1.weight_t", "mapper_0.mapping.1.bias"]
    cases = [
        (
            {**bundle, "mapper_0.mapping.1.bias": WeightInfo((5,), "b")},
            "text_mapper: cannot place the checkpoint's weight mapper_0.mapping.1.bias [5]: the bundle's is [4]",
        ),
        (
            {**bundle, "mapper_1.mapping.1.bias": WeightInfo((4,), "d")},
            "text_mapper: cannot place the checkpoint's weight mapper_1.mapping.1.bias [4]: the bundle's graph has no "
            "initializer of that name",
        ),
        (
            {name: info for name, info in bundle.items() if name != "val_0"},
            "text_mapper: the bundle's weight val_0 [1] has no counterpart in the checkpoint's graph",
        ),
    ]
    for new, message in cases:
        with pytest.raises(CfdeployError) as refused:
            match_weights("text_mapper", bundle, new, weights)
        assert str(refused.value) == message
    older = {"mul_111": WeightInfo((4,), "b"), "mul_15": WeightInfo((4,), "b"), "val_7": WeightInfo((4, 4), "a")}
    with pytest.raises(CfdeployError) as refused:
        match_weights("text_mapper", older, bundle, weights)
    assert "\n" not in str(refused.value) and "mul_" not in str(refused.value).split("(")[0]
    assert "weight mapper_0.mapping.1.weight_t: the bundle's graph names its weights after" in str(refused.value)
    assert "export the bundle again, then refit it" in str(refused.value)
    assert match_weights(
        "text_mapper", bundle, {**bundle, "mapper_0.mapping.1.bias": WeightInfo((4,), "e")}, weights
    ) == ["mapper_0.mapping.1.bias"]


def test_at_32_px_refit_places_every_weight_the_graph_holds_as_a_fresh_export_of_the_new_mappers_does(tmp_path):
    """At 32 px (8 levels) the fine mapper group has no levels: export leaves its weights out of the graph, and refit
    writes the others, giving the initializers a fresh export of the new checkpoint has."""
    from cfdeploy.contracts import network_contracts
    from cfdeploy.exporter import DEFAULT_OPSET, export_graph
    from cfdeploy.models.mappers import LatentEditor, LevelsMapper, MapperConfig
    from cfdeploy.refit import initializer_weights, refitted_graph

    contract = network_contracts(32, 8, 512)["latent_editor"]
    torch.manual_seed(3)
    bundled, other = (LatentEditor(LevelsMapper(MapperConfig(n_latent=8))).eval() for _ in range(2))
    export_graph(bundled, contract, tmp_path / "bundled.onnx", DEFAULT_OPSET)
    export_graph(other, contract, tmp_path / "fresh.onnx", DEFAULT_OPSET)
    graph, changed = refitted_graph("latent_editor", (tmp_path / "bundled.onnx").read_bytes(), other)
    fresh = initializer_weights(onnx.load(tmp_path / "fresh.onnx"))
    assert any(name.startswith("mapper.fine_mapping.") for name, _ in other.named_parameters())
    assert not any(name.startswith("mapper.fine_mapping.") for name in fresh)
    assert initializer_weights(onnx.load_from_string(graph)) == fresh
    assert changed and set(changed) < set(fresh)
