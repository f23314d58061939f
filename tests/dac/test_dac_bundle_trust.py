"""A DAC bundle gives the guarantees a CF-CLIP bundle gives: pinning, confinement, and verified bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cfdeploy.dac.bundle import DacBundle
from cfdeploy.errors import CfdeployError
from cfdeploy.sessions import Sessions


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    copied = tmp_path / "bundle"
    shutil.copytree(bundle, copied)
    return copied


def rewrite_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_a_dac_bundle_opens_only_under_the_pinned_manifest(dac_bundle: Path):
    digest = hashlib.sha256((dac_bundle / "manifest.json").read_bytes()).hexdigest()
    assert DacBundle(dac_bundle, expect_manifest=digest.upper()).manifest_sha256 == digest
    with pytest.raises(CfdeployError, match=f"sha256 {digest[:12]}… is not the pinned {'0' * 12}…"):
        DacBundle(dac_bundle, expect_manifest="0" * 64)
    with pytest.raises(CfdeployError, match="pinned manifest sha256 'abc': expected 64 hex digits"):
        DacBundle(dac_bundle, expect_manifest="abc")


def test_a_dac_bundle_refuses_listed_paths_that_lead_outside_it(dac_bundle: Path, tmp_path: Path):
    bundle = copy_of(dac_bundle, tmp_path)
    rewrite_manifest(bundle, lambda manifest: manifest["files"].update({"../outside.npy": "0" * 64}))
    with pytest.raises(CfdeployError, match=r"files entry '\.\./outside\.npy' leads outside the bundle"):
        DacBundle(bundle)

    bundle = copy_of(dac_bundle, tmp_path / "symlinked")
    outside = tmp_path / "tokens.npy"
    shutil.move(bundle / "tokens.npy", outside)
    (bundle / "tokens.npy").symlink_to(outside)
    with pytest.raises(CfdeployError, match=r"files entry 'tokens\.npy' is a symlink leading outside the bundle"):
        DacBundle(bundle)


def test_a_dac_bundle_checks_each_file_when_it_is_used_not_before(dac_bundle: Path, tmp_path: Path):
    """Opening reads the manifest only; a file damaged after opening is refused where it would be used."""
    bundle_path = copy_of(dac_bundle, tmp_path)
    bundle = DacBundle(bundle_path)
    with open(bundle_path / "vae_decoder.onnx.data", "r+b") as handle:
        handle.seek(64)
        handle.write(b"\xff\xff\xff\xff")
    assert bundle.graph("text_encoder").content == (bundle_path / "text_encoder.onnx").read_bytes()
    with pytest.raises(CfdeployError, match=r"vae_decoder\.onnx\.data: sha256 .* differs from the manifest's"):
        bundle.graph("vae_decoder")


def test_onnx_runtime_runs_the_dac_graph_bytes_that_were_hashed_and_reads_no_file_after(
    dac_bundle: Path, tmp_path: Path
):
    bundle_path = copy_of(dac_bundle, tmp_path)
    graph = DacBundle(bundle_path).graph("vae_decoder")
    assert set(graph.external) == {"vae_decoder.onnx.data"}
    expected_session = ort.InferenceSession(str(dac_bundle / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    shutil.rmtree(bundle_path)  # nothing left on disk to read: the session must come from the verified bytes

    spec = expected_session.get_inputs()[0]
    latents = np.random.default_rng(0).standard_normal([1, *spec.shape[1:]]).astype(np.float32)
    got = Sessions(lambda name: graph)("vae_decoder", latents=latents)
    np.testing.assert_array_equal(got, expected_session.run(None, {"latents": latents})[0])


def test_inspect_describes_a_dac_bundle_with_the_manifest_sha256_to_pin(cli, dac_bundle: Path):
    result = cli("inspect", dac_bundle, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "cfdeploy DAC bundle"
    assert report["manifest_sha256"] == hashlib.sha256((dac_bundle / "manifest.json").read_bytes()).hexdigest()
    assert report["networks"] == ["text_encoder", "unet", "vae_decoder"]
    assert 0 <= report["worst_parity_rel_l2"] <= 1e-4
