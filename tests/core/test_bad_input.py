"""Every bad input: one line on stderr naming the file and the problem, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import synthetic_files
from conftest import assert_refused, messages


@pytest.fixture
def edit(cli, tmp_path, cfclip_64, latents_64, embedding_file):
    """Run ``cfdeploy edit`` with good defaults, any of them overridden by keyword."""

    def run(**overrides):
        options = {
            "--checkpoint": cfclip_64,
            "--latents": latents_64,
            "--text-embedding": embedding_file,
            "--out": tmp_path / "out",
            **overrides,
        }
        args = [part for key, value in options.items() if value is not None for part in (key, value)]
        return cli("edit", *args)

    return run


def saved(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        torch.save(content, path)
    return path


def test_a_missing_checkpoint_is_refused_naming_it(edit, tmp_path):
    missing = tmp_path / "nope.pt"
    assert_refused(edit(**{"--checkpoint": missing}), tmp_path / "out", str(missing), "no such file")


def test_a_truncated_checkpoint_is_refused_as_truncated_or_corrupt(edit, tmp_path, cfclip_64):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(cfclip_64.read_bytes()[: 1 << 20])
    assert_refused(edit(**{"--checkpoint": truncated}), tmp_path / "out", str(truncated), "truncated or corrupt")


def test_a_file_that_is_no_torch_checkpoint_is_refused(edit, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 100)
    assert_refused(edit(**{"--checkpoint": garbage}), tmp_path / "out", str(garbage), "not a readable torch checkpoint")


def test_a_checkpoint_missing_a_noise_buffer_is_refused_never_inventing_noise(edit, tmp_path):
    content = synthetic_files.cfclip_checkpoint(256)
    del content["state_dict"]["decoder.noises.noise_3"]
    path = saved(tmp_path, "no_noise.pt", content)
    assert_refused(
        edit(**{"--checkpoint": path}),
        tmp_path / "out",
        str(path),
        "missing keys decoder.noises.noise_3",
        "never invents noise",
    )


def test_a_checkpoint_weight_of_the_wrong_shape_is_refused_naming_both_shapes(edit, tmp_path):
    content = synthetic_files.cfclip_checkpoint(256)
    content["state_dict"]["mapper.fc.weight"] = torch.zeros(512, 512)
    path = saved(tmp_path, "wrong_shape.pt", content)
    assert_refused(
        edit(**{"--checkpoint": path}),
        tmp_path / "out",
        str(path),
        "wrong shapes mapper.fc.weight [512, 512] (expected [512, 1024])",
    )


def test_a_checkpoint_with_an_unexpected_key_is_refused_naming_it(edit, tmp_path):
    content = synthetic_files.cfclip_checkpoint(256)
    content["state_dict"]["text_mapper.mapper_14.mapping.1.weight"] = torch.zeros(512, 512)
    path = saved(tmp_path, "extra_key.pt", content)
    assert_refused(
        edit(**{"--checkpoint": path}), tmp_path / "out", "unexpected keys text_mapper.mapper_14.mapping.1.weight"
    )


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_never_runs(edit, tmp_path):
    marker = tmp_path / "code_ran"
    path = saved(tmp_path, "evil.pt", {"state_dict": {"x": RunsCode(marker)}, "opts": {}})
    assert_refused(edit(**{"--checkpoint": path}), tmp_path / "out", str(path), "refused to load", "system")
    assert not marker.exists()


@pytest.mark.parametrize(
    "shape,message",
    [
        ((2, 10, 256), "expected latents [N,10,512] (W+) or [N,512] (W), found [2, 10, 256]"),
        ((2, 18, 512), "latents have 18 levels, the generator needs 10"),
        ((2, 3, 14, 512), "found [2, 3, 14, 512]"),
    ],
)
def test_latents_of_the_wrong_shape_are_refused_naming_the_shape(edit, tmp_path, shape, message):
    path = saved(tmp_path, "bad_latents.npy", np.zeros(shape, np.float32))
    assert_refused(edit(**{"--latents": path}), tmp_path / "out", str(path), message)


def test_latents_with_nan_and_inf_are_refused_counting_them(edit, tmp_path):
    latents = np.zeros((3, 10, 512), np.float32)
    latents[1, 2, 3], latents[2, 0, 0] = np.nan, np.inf
    path = saved(tmp_path, "nan.npy", latents)
    assert_refused(edit(**{"--latents": path}), tmp_path / "out", str(path), "2 NaN/inf values")


def test_text_embeddings_numbering_neither_one_nor_one_per_latent_are_refused(edit, tmp_path):
    path = saved(tmp_path, "two.npy", np.zeros((2, 512), np.float32))
    assert_refused(
        edit(**{"--text-embedding": path}),
        tmp_path / "out",
        str(path),
        "2 text embeddings match neither 1",
        "the 5 latents",
    )


def test_an_unknown_device_is_refused(edit, tmp_path):
    assert_refused(edit(**{"--device": "tpu"}), tmp_path / "out", "--device 'tpu': expected cpu, cuda or cuda:N")


def test_cuda_without_a_gpu_is_refused(edit, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert_refused(edit(**{"--device": "cuda"}), tmp_path / "out", "sees no CUDA GPU")


def test_cuda_graphs_on_the_cpu_are_refused(cli, tmp_path, cfclip_64, latents_64, embedding_file):
    out = tmp_path / "out"
    result = cli(
        "edit", "-c", cfclip_64, "-l", latents_64, "--text-embedding", embedding_file, "-o", out, "--cuda-graphs"
    )
    assert_refused(result, out, "CUDA graphs need --device cuda")


def test_a_torch_precision_with_a_bundle_backend_is_refused(cli, tmp_path, latents_64, embedding_file):
    out = tmp_path / "out"
    (tmp_path / "bundle").mkdir()
    result = cli(
        "edit",
        "--bundle",
        tmp_path / "bundle",
        "-l",
        latents_64,
        "--text-embedding",
        embedding_file,
        "-o",
        out,
        "--backend",
        "onnxruntime",
        "--precision",
        "fp16",
    )
    assert_refused(result, out, "--precision fp16: the onnxruntime backend offers fp32")


def test_text_without_clip_weights_is_refused(edit, tmp_path):
    assert_refused(
        edit(**{"--text-embedding": None, "--text": "blue dog"}), tmp_path / "out", "--text needs --clip-weights"
    )


def test_a_prompt_over_77_tokens_is_refused(edit, tmp_path, clip_state_dict_file):
    prompt = "a very " * 60 + "blue dog"
    result = edit(**{"--text-embedding": None, "--text": prompt, "--clip-weights": clip_state_dict_file})
    assert_refused(result, tmp_path / "out", "CLIP reads at most 77")


def test_non_empty_out_needs_force_and_is_left_untouched(edit, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    result = edit()
    assert result.exit_code == 2 and "not empty (use --force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_force_replaces_the_previous_output(cli, tmp_path, cfclip_64, latents_64, embedding_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    result = cli("edit", "-c", cfclip_64, "-l", latents_64, "--text-embedding", embedding_file, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert not (out / "mine.txt").exists() and (out / "000002.png").exists()


def test_failure_mid_run_leaves_nothing(edit, tmp_path, monkeypatch):
    from cfdeploy.backends.torch_backend import TorchBackend
    from cfdeploy.errors import CfdeployError

    calls = []

    def synthesize_then_fail(self, latents):
        calls.append(len(latents))
        if len(calls) == 2:
            raise CfdeployError("simulated failure on the second batch")
        return np.zeros((len(latents), 3, 256, 256), np.float32)

    monkeypatch.setattr(TorchBackend, "synthesize", synthesize_then_fail)
    assert_refused(edit(**{"--batch-size": 2}), tmp_path / "out", "simulated failure")


def test_real_process_prints_one_line_and_exits_2(tmp_path, cfclip_64, latents_64):
    missing = tmp_path / "missing.npy"
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "cfdeploy",
            "edit",
            "-c",
            str(cfclip_64),
            "-l",
            str(latents_64),
            "--text-embedding",
            str(missing),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "40"},
    )
    assert process.returncode == 2
    assert messages(process.stderr) == f"error: {missing}: no such file"
    assert not (tmp_path / "out").exists()


def test_a_file_given_as_a_bundle_is_called_a_file(cli, tmp_path, embedding_file):
    checkpoint = tmp_path / "green_lipstick.pt"
    checkpoint.write_bytes(b"a checkpoint, not a bundle")
    out = tmp_path / "out"
    result = cli("edit", "--bundle", checkpoint, "--seed", "1", "--text-embedding", embedding_file, "-o", out)
    assert_refused(result, out, f"{checkpoint}: a file, not a bundle directory (make one with cfdeploy export)")
