"""The commands as users run them: demo, inspect, help, warnings, and the rosinality loader."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import synthetic_files
from cfdeploy.checkpoints import load_stylegan2
from cfdeploy.errors import CfdeployError
from cfdeploy.models import reference


def test_demo_writes_before_after_pairs_and_says_weights_are_synthetic(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli("demo", "--out", out, "--size", 64, "--num", 3)
    assert result.exit_code == 0, result.stderr
    assert "synthetic weights" in result.stderr and "not meaningful" in result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(out / "000001.png").size == (128, 64)
    summary = json.loads((out / "edit.json").read_text())
    assert summary["inputs"]["synthetic_weights"] is True and summary["prompt"] == "green lipstick"
    assert np.load(out / "latents.npy").shape == (3, 10, 512)
    assert cli("demo", "--out", out, "--size", 64).exit_code == 2  # not empty, no --force


def test_inspect_of_a_cfclip_checkpoint_reports_size_description_and_mapper_parameters(cli, cfclip_256):
    result = cli("inspect", cfclip_256, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "CF-CLIP checkpoint"
    assert (report["resolution"], report["n_latent"], report["trained_description"]) == (256, 14, "green lipstick")
    assert report["mapper_groups"] == ["coarse", "medium", "fine"]
    expected = sum(
        int(np.prod(shape))
        for key, shape, _ in synthetic_files.manifest("cfclip_manifest_256.json")["keys"]
        if key.startswith("mapper.") and "kernel" not in key
    )
    assert report["parameters"]["mapper"] == expected


def test_inspect_of_a_checkpoint_without_coarse_mapper_lists_the_other_groups(cli, tmp_path):
    path = tmp_path / "no_coarse.pt"
    torch.save(synthetic_files.cfclip_checkpoint(64, no_coarse_mapper=True), path)
    report = json.loads(cli("inspect", path, "--json").stdout)
    assert report["mapper_groups"] == ["medium", "fine"]


def test_inspect_of_a_clip_archive_and_arrays_reports_kind_parameters_and_shape(
    cli, clip_torchscript_file, latents_256, embedding_file
):
    report = json.loads(cli("inspect", clip_torchscript_file, "--json").stdout)
    assert report["kind"] == "CLIP weights" and report["format"].startswith("TorchScript")
    assert report["parameters"]["text_tower"] == sum(
        int(np.prod(shape))
        for key, shape, _ in synthetic_files.manifest("clip_text_manifest.json")["keys"]
        if key != "logit_scale"
    )
    assert json.loads(cli("inspect", latents_256, "--json").stdout)["shape"] == [3, 14, 512]
    table = cli("inspect", embedding_file)
    assert table.exit_code == 0 and "one CLIP text embedding" in table.stdout


def test_rosinality_checkpoint_loads_with_namespace_args_and_matches_reference(tmp_path, cli):
    content = synthetic_files.rosinality_checkpoint(seed=5)
    path = tmp_path / "stylegan2-ffhq-config-f.pt"
    torch.save(content, path)
    loaded = load_stylegan2(path)
    assert loaded.generator.config.size == 1024 and torch.equal(loaded.latent_avg, content["latent_avg"])
    z = torch.randn(2, 512)
    with torch.no_grad():
        assert torch.allclose(loaded.generator.mapping(z), reference.mapping(content["g_ema"], z), rtol=1e-5, atol=1e-6)
    report = json.loads(cli("inspect", path, "--json").stdout)
    assert report["kind"].startswith("StyleGAN2") and report["training_state"] == ["args"]


def test_rosinality_checkpoint_without_noise_buffers_is_refused(tmp_path):
    content = synthetic_files.rosinality_checkpoint(training=False)
    for key in [k for k in content["g_ema"] if k.startswith("noises.")]:
        del content["g_ema"][key]
    path = tmp_path / "old_converter.pt"
    torch.save(content, path)
    with pytest.raises(CfdeployError, match=r"missing keys g_ema.noises.noise_0, .* and 13 more \(no noise buffers"):
        load_stylegan2(path)


def test_prompt_other_than_trained_description_warns(cli, tmp_path, cfclip_64, latents_64, clip_state_dict_file):
    result = cli(
        "edit",
        "-c",
        cfclip_64,
        "-l",
        latents_64,
        "--text",
        "blue dog",
        "--clip-weights",
        clip_state_dict_file,
        "-o",
        tmp_path / "out",
        "--batch-size",
        5,
    )
    assert result.exit_code == 0, result.stderr
    assert "trained for 'green lipstick', not 'blue dog'" in result.stderr


@pytest.mark.parametrize("command", ["edit", "embed", "inspect", "demo"])
def test_help_documents_every_command(command):
    process = subprocess.run([sys.executable, "-m", "cfdeploy", command, "--help"], capture_output=True, text=True)
    assert process.returncode == 0
    assert "Usage: cfdeploy " + command in " ".join(process.stdout.split())


def test_cli_start_up_does_not_import_torch():
    code = "import sys, cfdeploy.cli; assert 'torch' not in sys.modules, 'torch imported at start-up'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loading_a_checkpoint_leaves_torchs_compiler_unimported(cfclip_64, e4e_64):
    """Modules are built on the meta device before a load; an out-of-place op there runs a Python reference kernel
    that imports torch._dynamo, seconds of a fresh `cfdeploy edit -c` process."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom cfdeploy.checkpoints import load_cfclip, load_e4e\n"
        "load_cfclip(Path(sys.argv[1])); load_e4e(Path(sys.argv[2]))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported by a load'"
    )
    done = subprocess.run([sys.executable, "-c", code, cfclip_64, e4e_64], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
