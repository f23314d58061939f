"""CUDA and TensorRT paths against the CPU reference. They need a GPU (and TensorRT) and skip, saying so, without."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnxruntime
import pytest
import torch

from conftest import (
    TOLERANCE,
    checkpoint_with_generator_of,
    messages,
    official_edit,
    official_w_hat,
    rel_l2,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")
needs_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
    reason="TensorRT and a CUDA GPU are needed (TensorRT's libraries cannot be installed on machines without one)",
)
FP16_MIN_PSNR_DB = 40.0
FP32_CROSS_DEVICE_MIN_PSNR_DB = 45.0  # fp32 on two devices: only the kernels' rounding differs (±1 level is 48 dB)
needs_onnxruntime_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
    reason="this ONNX Runtime has no CUDA provider (install onnxruntime-gpu on a GPU machine)",
)


def psnr(images: np.ndarray, expected: np.ndarray) -> float:
    mse = float(np.mean((images.astype(np.float64) - expected) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("checkpoint_fixture,batch", [("cfclip_256", 1), ("cfclip_256", 8), ("cfclip_1024", 1)])
def test_torch_cuda_matches_the_cpu_reference(request, checkpoint_fixture, batch):
    from cfdeploy.backends.torch_backend import TorchBackend

    checkpoint = request.getfixturevalue(checkpoint_fixture)
    fp32 = TorchBackend.from_checkpoint(checkpoint, device="cuda")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((batch, fp32.n_latent, 512)).astype(np.float32)
    features = rng.standard_normal((1, 512)).astype(np.float32)
    expected_w_hat, expected_image = official_edit(checkpoint, w, features)
    w_hat = fp32.edit_latents(w, fp32.text_latents(features), 1.0)
    assert rel_l2(w_hat, expected_w_hat) <= TOLERANCE
    assert rel_l2(fp32.synthesize(w_hat), expected_image) <= TOLERANCE

    fp16 = TorchBackend.from_checkpoint(checkpoint, device="cuda", precision="fp16", cuda_graphs=True)
    assert rel_l2(fp16.edit_latents(w, fp16.text_latents(features), 1.0), expected_w_hat) <= TOLERANCE  # mappers fp32
    graphed = fp16.synthesize(w_hat)
    assert psnr(graphed, expected_image) >= FP16_MIN_PSNR_DB
    assert np.array_equal(fp16.synthesize(w_hat), graphed)  # replaying the captured graph is deterministic


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_engines_edit_like_the_reference_and_refit(
    tmp_path, cli, bundle_256, cfclip_256, latents_256, embedding_file
):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_256, bundle, ignore=shutil.ignore_patterns("cache", "tensorrt"))
    result = cli("build-engines", "--bundle", bundle, "--static-batch", 2)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    result = cli(
        "edit",
        "--bundle",
        bundle,
        "--backend",
        "tensorrt",
        "-l",
        latents_256,
        "--text-embedding",
        embedding_file,
        "-o",
        out,
        "-b",
        2,
        "--save-latents",
        "--save-raw",
    )
    assert result.exit_code == 0, result.stderr
    expected_w_hat, expected_image = official_edit(cfclip_256, np.load(latents_256), np.load(embedding_file)[None])
    assert rel_l2(np.load(out / "latents.npy"), expected_w_hat) <= 1e-3
    assert psnr(np.load(out / "images.npy"), expected_image) >= FP16_MIN_PSNR_DB

    key_path = bundle / "tensorrt" / "generator.key.json"
    key = json.loads(key_path.read_text())
    key_path.write_text(json.dumps({**key, "tensorrt_version": "1.0.0"}))
    result = cli(
        "edit",
        "--bundle",
        bundle,
        "--backend",
        "tensorrt",
        "-l",
        latents_256,
        "--text-embedding",
        embedding_file,
        "-o",
        tmp_path / "refused",
    )
    assert result.exit_code == 2 and "TensorRT version: engine has 1.0.0" in result.stderr
    assert cli("build-engines", "--bundle", bundle, "--static-batch", 2).exit_code == 2  # mismatch needs --rebuild
    assert cli("build-engines", "--bundle", bundle, "--static-batch", 2, "--rebuild").exit_code == 0

    result = cli(
        "build-engines", "--bundle", bundle, "--min-batch", 1, "--max-batch", 4, "--rebuild"
    )  # dynamic profile
    assert result.exit_code == 0, result.stderr
    dynamic = tmp_path / "dynamic"
    result = cli(
        "edit",
        "--bundle",
        bundle,
        "--backend",
        "tensorrt",
        "-l",
        latents_256,
        "--text-embedding",
        embedding_file,
        "-o",
        dynamic,
        "-b",
        5,
        "--save-latents",
        "--save-raw",
    )  # 5 codes: one call of 4, one of 1
    assert result.exit_code == 0, result.stderr
    assert rel_l2(np.load(dynamic / "latents.npy"), expected_w_hat) <= 1e-3
    assert psnr(np.load(dynamic / "images.npy"), expected_image) >= FP16_MIN_PSNR_DB

    other = tmp_path / "other.pt"
    checkpoint_with_generator_of(other, generator_seed=1, mapper_seed=7)
    result = cli("refit", "--bundle", bundle, "-c", other)
    assert result.exit_code == 0 and "refitted the latent_editor TensorRT engine" in result.stderr, result.stderr
    refitted = tmp_path / "refitted"
    result = cli(
        "edit",
        "--bundle",
        bundle,
        "--backend",
        "tensorrt",
        "-l",
        latents_256,
        "--text-embedding",
        embedding_file,
        "-o",
        refitted,
        "-b",
        2,
        "--save-latents",
    )
    assert result.exit_code == 0, result.stderr
    other_w_hat = official_w_hat(other, np.load(latents_256), np.load(embedding_file)[None])
    assert rel_l2(np.load(refitted / "latents.npy"), other_w_hat) <= 1e-3


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_paths_say_tensorrt_is_missing(
    tmp_path, cli, bundle_64, cfclip_64, clip_state_dict_file, latents_64, dac_bundle
):
    message = "needs TensorRT, which is not installed here (No module named 'tensorrt')"
    for args in (
        ["build-engines", "--bundle", bundle_64],
        ["edit", "--bundle", bundle_64, "--backend", "tensorrt", "-l", latents_64, "-t", "x", "-o", tmp_path / "out"],
        ["export", "-c", cfclip_64, "--clip-weights", clip_state_dict_file, "-o", tmp_path / "out", "--tensorrt"],
        ["dac", "build-engines", "--bundle", dac_bundle],
        ["dac", "edit", "--bundle", dac_bundle, "--backend", "tensorrt", "-o", tmp_path / "out"],
    ):
        result = cli(*args)
        assert result.exit_code == 2 and messages(result.stderr).count("\n") == 0 and message in result.stderr, (
            result.stderr
        )
    assert (
        not (tmp_path / "out").exists()
        and not (bundle_64 / "tensorrt").exists()
        and not (dac_bundle / "tensorrt").exists()
    )


@pytest.mark.gpu
@needs_cuda
def test_dac_abduction_and_edit_on_cuda_match_the_cpu(tmp_path, cli, dac_base, dac_image, dac_run):
    """DAC on CUDA: an abduction step's loss and a sample from the same latents agree with the CPU run (fp32; kernels
    differ, so not bit for bit); seeds on CUDA draw from a CUDA generator, as inference_t.py does."""
    out = tmp_path / "cuda-run"
    result = cli(
        "dac",
        "abduct",
        "-i",
        dac_image,
        "-p",
        "A cat.",
        "-t",
        "A cat wearing a wool cap.",
        "-b",
        dac_base,
        "-o",
        out,
        "--unet-steps",
        4,
        "--text-steps",
        4,
        "--rank",
        4,
        "--resolution",
        32,
        "--save-every",
        2,
        "--device",
        "cuda",
    )
    assert result.exit_code == 0, result.stderr
    cuda_losses = json.loads((out / "manifest.json").read_text())["losses"]
    cpu_losses = json.loads((dac_run / "manifest.json").read_text())["losses"]
    for phase, losses in cpu_losses.items():
        assert losses[0] == pytest.approx(
            cuda_losses[phase][0], rel=1e-3
        )  # the first step: the same draws, the same start
    from PIL import Image

    noise = tmp_path / "seed_29_cpu.npy"
    np.save(noise, torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(29)).numpy())
    cpu_edit, cuda_edit, cuda_seeded = tmp_path / "edit-cpu", tmp_path / "edit-cuda", tmp_path / "edit-cuda-seeded"
    assert cli("dac", "edit", "--run", dac_run, "-o", cpu_edit, "--num", 1, "--steps", 6).exit_code == 0
    assert (
        cli(
            "dac", "edit", "--run", dac_run, "-o", cuda_edit, "--noise", noise, "--steps", 6, "--device", "cuda"
        ).exit_code
        == 0
    )
    cpu = np.asarray(Image.open(cpu_edit / "seed_0029.png")).astype(np.float64)
    cuda = np.asarray(Image.open(cuda_edit / "noise_0000.png")).astype(np.float64)
    assert psnr(cuda / 127.5 - 1, cpu / 127.5 - 1) >= FP32_CROSS_DEVICE_MIN_PSNR_DB
    assert (
        cli("dac", "edit", "--run", dac_run, "-o", cuda_seeded, "--num", 1, "--steps", 2, "--device", "cuda").exit_code
        == 0
    )
    assert json.loads((cuda_seeded / "edit.json").read_text())["noise"] == ["torch.Generator(cuda) seed 29"]


@pytest.mark.gpu
@needs_onnxruntime_cuda
def test_dac_bundle_on_onnxruntime_cuda_matches_the_cpu(tmp_path, cli, dac_bundle):
    from PIL import Image

    edits = {device: tmp_path / f"edit-{device}" for device in ("cpu", "cuda")}
    for device, edit_dir in edits.items():
        result = cli(
            "dac", "edit", "--bundle", dac_bundle, "-o", edit_dir, "--num", 1, "--steps", 6, "--device", device
        )
        assert result.exit_code == 0, result.stderr
    assert json.loads((edits["cuda"] / "edit.json").read_text())["providers"][0] == "CUDAExecutionProvider"
    cpu, cuda = (np.asarray(Image.open(path / "seed_0029.png")).astype(np.float64) for path in edits.values())
    assert psnr(cuda / 127.5 - 1, cpu / 127.5 - 1) >= FP32_CROSS_DEVICE_MIN_PSNR_DB


@pytest.mark.gpu
@needs_tensorrt
def test_dac_tensorrt_engines_sample_like_onnxruntime_and_refit_another_run(
    tmp_path, cli, dac_bundle, dac_base, dac_image
):
    """fp16 UNet engine against ONNX Runtime fp32 on the CPU; then another run's U refitted into the same engine."""
    from PIL import Image

    from cfdeploy.dac.abduct import AbductInputs, abduct
    from cfdeploy.dac.run import AbductSettings

    bundle = tmp_path / "bundle"
    shutil.copytree(dac_bundle, bundle)
    result = cli("dac", "build-engines", "--bundle", bundle)
    assert result.exit_code == 0, result.stderr
    assert cli("dac", "build-engines", "--bundle", bundle).stderr.count("kept") == 3  # keyed: nothing rebuilt
    other = tmp_path / "other"
    abduct(
        AbductSettings(
            "A cat.", "A cat in the snow.", unet_steps=4, text_steps=4, rank=4, resolution=32, save_every=2, seed=7
        ),
        AbductInputs(dac_image, dac_base),
        other,
    )
    for extra in ([], ["--run", other]):
        outs = {backend: tmp_path / f"{backend}-{len(extra)}" for backend in ("onnxruntime", "tensorrt")}
        for backend, out in outs.items():
            result = cli(
                "dac", "edit", "--bundle", bundle, "-o", out, "--num", 1, "--steps", 6, "--backend", backend, *extra
            )
            assert result.exit_code == 0, result.stderr
        ort, trt_image = (np.asarray(Image.open(out / "seed_0029.png")).astype(np.float64) for out in outs.values())
        assert psnr(trt_image / 127.5 - 1, ort / 127.5 - 1) >= FP16_MIN_PSNR_DB, extra
