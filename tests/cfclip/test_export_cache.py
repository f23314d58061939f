"""Exported graphs reused by later exports (``cfdeploy.exporter.export_cache``): the same checkpoint's graphs come
back byte for byte, another prompt's checkpoint reuses only what it shares, and a reused graph is checked again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil

import numpy as np
import onnx
import torch

from cfdeploy.exporter import EXPORTED_GRAPH, EXPORTS_DIR, module_sha256
from cfdeploy.graph_cache import ENTRY_RECORD, cache_root
from cfdeploy.models.layers import EqualLinear
from conftest import official_w_hat, rel_l2

NETWORKS = ["text_mapper", "latent_editor", "generator", "mapping"]  # a --without-clip bundle's, in export order


def test_a_second_export_of_a_checkpoint_reuses_every_graph_byte_for_byte(
    cli, tmp_path, cfclip_64, bundle_64_without_clip
):
    """``bundle_64_without_clip`` is ``cfclip_64`` exported earlier in this run, through the run's cache."""
    result = cli("export", "-c", cfclip_64, "--without-clip", "-o", tmp_path / "again")
    assert result.exit_code == 0, result.stderr
    assert "(text_mapper, latent_editor, generator, mapping reused from earlier exports)" in result.stderr
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["export"]["reused"] == NETWORKS
    for network in NETWORKS:
        name = f"{network}.onnx"
        assert (tmp_path / "again" / name).read_bytes() == (bundle_64_without_clip / name).read_bytes(), name
        assert set(manifest["networks"][network]["parity"]) == {"batch_1", "batch_3"}  # checked again, not copied
        assert all(case["rel_l2"] <= 1e-5 for case in manifest["networks"][network]["parity"].values())


def test_another_prompts_checkpoint_reuses_the_shared_generator_and_exports_its_own_mappers(
    cli,
    tmp_path,
    cfclip_64,
    bundle_64_without_clip,
    other_prompt_64,
    other_prompt_bundle_64,
    latents_64,
    embedding_file,
):
    """``other_prompt_bundle_64``: ``other_prompt_64`` (``cfclip_64``'s generator) exported after
    ``bundle_64_without_clip``."""
    manifest = json.loads((other_prompt_bundle_64 / "manifest.json").read_text())
    assert manifest["export"]["reused"] == ["generator", "mapping"]
    for name in ("generator.onnx", "mapping.onnx"):
        assert (other_prompt_bundle_64 / name).read_bytes() == (bundle_64_without_clip / name).read_bytes()
    result = cli(
        "edit", "--bundle", other_prompt_bundle_64, "-l", latents_64, "--text-embedding", embedding_file,
        "-o", tmp_path / "edits", "--save-latents",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    latents, features = np.load(latents_64), np.load(embedding_file).reshape(1, 512)
    expected = official_w_hat(other_prompt_64, latents, features)
    assert rel_l2(np.load(tmp_path / "edits" / "latents.npy"), expected) <= 1e-5
    assert rel_l2(official_w_hat(cfclip_64, latents, features), expected) > 1e-2


def test_a_reused_graph_that_fails_its_check_is_exported_afresh_and_replaced(
    cli, tmp_path, monkeypatch, cfclip_64, bundle_64_without_clip
):
    """An entry intact by its hashes but wrong (here: a text mapper bias doubled, its record rewritten to match)
    fails the check against torch; that graph is exported again and its entry replaced."""
    private = tmp_path / "cache"
    graphs = {(bundle_64_without_clip / f"{network}.onnx").read_bytes() for network in NETWORKS}
    sizes = {len(graph) for graph in graphs}
    # This export's entries from the run's cache, hard-linked (a file changed below is unlinked first, so the run's
    # cache stays as it is); the other worker may replace an entry meanwhile.
    for graph in (cache_root() / EXPORTS_DIR).glob(f"[!.]*/{EXPORTED_GRAPH}"):
        with contextlib.suppress(FileNotFoundError):
            if graph.stat().st_size in sizes and graph.read_bytes() in graphs:
                shutil.copytree(graph.parent, private / EXPORTS_DIR / graph.parent.name, copy_function=os.link)
    monkeypatch.setenv("CFDEPLOY_CACHE_DIR", str(private))
    right = (bundle_64_without_clip / "text_mapper.onnx").read_bytes()
    entries = [
        graph.parent for graph in (private / EXPORTS_DIR).glob(f"*/{EXPORTED_GRAPH}") if graph.read_bytes() == right
    ]
    wrong = onnx.load_from_string(right)
    weight = next(tensor for tensor in wrong.graph.initializer if tensor.name.endswith(".bias"))
    weight.CopyFrom(onnx.numpy_helper.from_array(2 * onnx.numpy_helper.to_array(weight), weight.name))
    for entry in entries:
        record = json.loads((entry / ENTRY_RECORD).read_text())
        record["files"][EXPORTED_GRAPH] = hashlib.sha256(wrong.SerializeToString()).hexdigest()
        for name, content in ((EXPORTED_GRAPH, wrong.SerializeToString()), (ENTRY_RECORD, json.dumps(record).encode())):
            (entry / name).unlink()
            (entry / name).write_bytes(content)
    assert entries

    result = cli("export", "-c", cfclip_64, "--without-clip", "-o", tmp_path / "bundle")
    assert result.exit_code == 0, result.stderr
    assert "the reused text_mapper graph failed its check (text_mapper: ONNX graph differs from torch" in result.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["export"]["reused"] == ["latent_editor", "generator", "mapping"]
    assert all(case["rel_l2"] <= 1e-5 for case in manifest["networks"]["text_mapper"]["parity"].values())
    replaced = [
        entry / EXPORTED_GRAPH for entry in (private / EXPORTS_DIR).iterdir() if (entry / EXPORTED_GRAPH).exists()
    ]
    assert (tmp_path / "bundle" / "text_mapper.onnx").read_bytes() in {path.read_bytes() for path in replaced}
    assert wrong.SerializeToString() not in {path.read_bytes() for path in replaced}


def test_the_module_digest_follows_weights_buffers_and_plain_settings_and_nothing_else():
    def layer(lr_mul: float = 0.01) -> EqualLinear:
        torch.manual_seed(0)
        return EqualLinear(4, 3, lr_mul=lr_mul)

    digest = module_sha256(layer())
    assert module_sha256(layer()) == digest  # another object with the same weights and settings
    assert module_sha256(layer(lr_mul=0.02)) != digest  # a setting the graph bakes in as a constant
    changed = layer()
    with torch.no_grad():
        changed.bias[1] += 1e-7
    assert module_sha256(changed) != digest
    buffered = layer()
    buffered.register_buffer("mask", torch.zeros(2))
    assert module_sha256(buffered) != digest
    half = layer().to(torch.bfloat16)  # dtypes numpy cannot hold are hashed by their bytes too
    assert module_sha256(half) != digest
