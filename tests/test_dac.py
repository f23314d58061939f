"""DAC on a tiny random Stable Diffusion (tests/dac_models.py), on the CPU with 1 thread.

Every formula is checked against an independent computation: γ(t) against the paper's values, the −Δ
fold against PEFT's adapter weight −1, the prediction loop against diffusers' StableDiffusionPipeline
(fixed weights, and γ(t) set step by step through the pipeline's callback), a resumed abduction
against an uninterrupted one, adapter files against the layers they must fill.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import assert_refused  # noqa: E402
from dac_models import IMAGE_SIZE, build_tiny_base_model  # noqa: E402

from cfdeploy.dac import lora  # noqa: E402
from cfdeploy.dac.abduct import AbductInputs, AbductSettings, abduct  # noqa: E402
from cfdeploy.dac.base_model import inspect_base_model, load_base_model  # noqa: E402
from cfdeploy.dac.plms import anneal  # noqa: E402
from cfdeploy.dac.edits import PredictSettings, to_pixels  # noqa: E402
from cfdeploy.dac.predict import edit_embeddings, initial_latents, sample  # noqa: E402
from cfdeploy.dac.run import CHECKPOINT, EDIT_EMBEDDINGS, TEXT_LORA, UNET_LORA, read_run  # noqa: E402
from cfdeploy.errors import CfdeployError  # noqa: E402

PROMPT, TARGET = "A cat.", "A cat wearing a wool cap."
FAST = dict(unet_steps=4, text_steps=4, rank=4, resolution=IMAGE_SIZE, save_every=2)
UNET_LAYERS = 79  # the tiny UNet's modules named like DAC's 14 targets
TEXT_LAYERS = 8  # 2 layers × q, k, v, out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return build_tiny_base_model(tmp_path_factory.mktemp("dac") / "tiny-sd")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dac-image") / "cat.png"
    pixels = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, base_dir: Path, image_file: Path) -> Path:
    """A complete run, never interrupted."""
    out = tmp_path_factory.mktemp("dac-runs") / "cat_cap"
    abduct(AbductSettings(PROMPT, TARGET, **FAST), AbductInputs(image_file, base_dir), out)
    return out


def loaded(base_dir: Path, run_dir: Path | None = None, beta: float = 1.0):
    """The base model, with the run's U and Δ loaded when a run is given."""
    from cfdeploy.dac.predict import load_run_adapters

    base = load_base_model(inspect_base_model(base_dir))
    if run_dir is not None:
        load_run_adapters(base, read_run(run_dir))
    return base


def test_anneal_matches_the_papers_values():
    assert anneal(999, 0.8) == pytest.approx(0.8)
    assert anneal(0, 0.8) == pytest.approx(1.0)
    assert [round(anneal(t, 0.8), 3) for t in (750, 500, 250)] == [0.812, 0.85, 0.912]
    assert anneal(500, 1.0) == 1.0


def test_every_unet_target_is_adapted(base_dir: Path):
    base = loaded(base_dir)
    count = lora.add_adapter(base.unet, lora.AdapterSpec(lora.UNET_ADAPTER, 4, lora.UNET_TARGETS), seed=42)
    names = lora.lora_layers(base.unet, lora.UNET_ADAPTER)
    assert count == len(names) == UNET_LAYERS
    assert {target for target in lora.UNET_TARGETS if any(name.endswith("." + target) for name in names)} == set(lora.UNET_TARGETS)


def test_run_files_and_manifest(run_dir: Path, base_dir: Path):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([EDIT_EMBEDDINGS, "manifest.json", TEXT_LORA, UNET_LORA])
    assert manifest["adapted_layers"] == {lora.UNET_ADAPTER: UNET_LAYERS, lora.EDIT_ADAPTER: TEXT_LAYERS}
    assert manifest["base_model"]["weights_sha256"] == inspect_base_model(base_dir).weights_sha256
    assert manifest["settings"]["prompt"] == PROMPT and manifest["settings"]["target"] == TARGET
    assert [len(losses) for losses in manifest["losses"].values()] == [4, 4]
    assert set(manifest["versions"]) >= {"torch", "diffusers", "transformers", "peft"}


def test_numpy_plms_matches_diffusers_pndm_step_for_step(base_dir: Path):
    from diffusers import PNDMScheduler

    from cfdeploy.dac.plms import PlmsScheduler

    config = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
    rng = np.random.default_rng(5)
    for steps in (30, 4, 2, 1):
        theirs = PNDMScheduler.from_config(config)
        theirs.set_timesteps(steps)
        ours = PlmsScheduler(config)
        timesteps = ours.set_timesteps(steps)
        assert timesteps.tolist() == theirs.timesteps.tolist() and len(timesteps) == steps + (steps > 1)
        chained = x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
        for timestep in timesteps:  # each step from the same x and noise history: only the step itself differs
            noise = x * 0.9 + 0.1 * rng.standard_normal(x.shape, dtype=np.float32)  # an ε estimate near x
            expected = theirs.step(torch.from_numpy(noise), int(timestep), torch.from_numpy(x)).prev_sample.numpy()
            assert np.abs(ours.step(noise, int(timestep), x) - expected).max() <= 1e-6 * max(np.abs(expected).max(), 1.0)
            x = expected
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        end = torch.from_numpy(chained)
        for timestep in timesteps:  # and a whole run, each on its own output
            noise = chained * 0.5
            chained = ours.step(noise, int(timestep), chained)
            end = theirs.step(torch.from_numpy(noise), int(timestep), end).prev_sample
        assert np.abs(chained - end.numpy()).max() <= 1e-5 * np.abs(end.numpy()).max()
    assert PlmsScheduler(config).set_timesteps(30)[:4].tolist() == [958, 925, 925, 892]


def test_adapter_files_reload_every_layer(run_dir: Path, base_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    base = loaded(base_dir, run_dir)
    saved = load_file(run_dir / UNET_LORA)
    assert len(saved) == 2 * UNET_LAYERS
    reloaded = lora.adapter_state(base.unet, lora.UNET_ADAPTER)
    assert reloaded.keys() == saved.keys() and all(torch.equal(reloaded[key], saved[key]) for key in saved)
    assert any(torch.count_nonzero(tensor) for key, tensor in saved.items() if "lora_B" in key)  # trained, not the zero init
    damaged = tmp_path / "damaged.safetensors"
    from safetensors import safe_open

    with safe_open(str(run_dir / UNET_LORA), framework="pt") as handle:
        metadata = handle.metadata()
    dropped = {key: tensor for key, tensor in saved.items() if ".attn1.to_q." not in key}
    save_file(dropped, damaged, metadata=metadata)
    fresh = loaded(base_dir)
    with pytest.raises(CfdeployError, match=rf"does not match this model's {UNET_LAYERS} adapted layers: \d+ missing"):
        lora.load_adapter(damaged, fresh.unet, lora.UNET_ADAPTER, lora.UNET_TARGETS)
    assert not lora.lora_layers(fresh.unet, lora.UNET_ADAPTER)  # nothing half-loaded stays


def test_minus_delta_fold_equals_peft_weight_minus_one(run_dir: Path, base_dir: Path):
    """W ← W − (α/r)·B·A in a plain text encoder gives what PEFT gives at adapter weight −1."""
    from safetensors.torch import load_file

    base = loaded(base_dir, run_dir)
    tokens = base.tokens(TARGET)
    with torch.no_grad():
        lora.activate(base.text_encoder, [lora.EDIT_ADAPTER])
        lora.set_weight(base.text_encoder, lora.EDIT_ADAPTER, -1.0)
        with_peft = base.text_encoder(tokens)[0]
    folded = copy.deepcopy(loaded(base_dir).text_encoder)
    state = load_file(run_dir / TEXT_LORA)
    rank = 4  # FAST's text rank: alpha = r, so α/r = 1
    with torch.no_grad():
        for name, module in folded.named_modules():
            key = f"{name}.lora_A.weight"
            if key in state:
                module.weight -= (rank / rank) * state[f"{name}.lora_B.weight"] @ state[key]
        by_fold = folded(tokens)[0]
    assert len([key for key in state if "lora_A" in key]) == TEXT_LAYERS
    assert (by_fold - with_peft).abs().max() <= 1e-5
    plain = loaded(base_dir).text_encoder(tokens)[0]
    assert (by_fold - plain).abs().max() > 1e-4  # Δ changes the embedding


def test_stored_edit_embeddings_are_beta_one(run_dir: Path, base_dir: Path):
    from safetensors.torch import load_file

    base = loaded(base_dir, run_dir)
    cond, uncond = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -1.0})
    stored = load_file(run_dir / EDIT_EMBEDDINGS)
    assert torch.equal(stored["cond"], cond) and torch.equal(stored["uncond"], uncond)


def _pipeline(base):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler.from_config(base.info.configs["scheduler"])
    return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_prediction_equals_diffusers_pipeline_at_fixed_weights(run_dir: Path, base_dir: Path):
    base = loaded(base_dir, run_dir)
    settings = PredictSettings(steps=5, samples=1)
    cond, uncond = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -1.0})
    ours = sample(base, cond, uncond, initial_latents(base, 29, IMAGE_SIZE), settings, lambda t: 0.9)
    lora.set_weight(base.unet, lora.UNET_ADAPTER, 0.9)
    theirs = _pipeline(base)(TARGET, negative_prompt="", num_inference_steps=5, guidance_scale=4.0, height=IMAGE_SIZE,
                             width=IMAGE_SIZE, latents=initial_latents(base, 29, IMAGE_SIZE), output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours - theirs).abs().max() <= 1e-6


def test_annealed_prediction_matches_step_by_step_weights(run_dir: Path, base_dir: Path):
    """γ(t) per UNet call, recomputed through the pipeline: the weight for call i+1 is set in step i's callback."""
    base = loaded(base_dir, run_dir)
    settings = PredictSettings(steps=6, samples=1)
    cond, uncond = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -1.0})
    calls: list[int] = []
    ours = sample(base, cond, uncond, initial_latents(base, 30, IMAGE_SIZE), settings, lambda t: anneal(t, 0.8), calls.append)
    assert len(calls) == 7 and calls[1] == calls[2]  # PNDM (PLMS): steps + 1 calls, the second timestep twice
    pipeline = _pipeline(base)
    pipeline.scheduler.set_timesteps(6)
    timesteps = [int(t) for t in pipeline.scheduler.timesteps]
    assert timesteps == calls

    def set_next_weight(pipe, index, timestep, tensors):
        if index + 1 < len(timesteps):
            lora.set_weight(base.unet, lora.UNET_ADAPTER, anneal(timesteps[index + 1], 0.8))
        return tensors

    lora.set_weight(base.unet, lora.UNET_ADAPTER, anneal(timesteps[0], 0.8))
    theirs = pipeline(TARGET, negative_prompt="", num_inference_steps=6, guidance_scale=4.0, height=IMAGE_SIZE, width=IMAGE_SIZE,
                      latents=initial_latents(base, 30, IMAGE_SIZE), output_type="pt", callback_on_step_end=set_next_weight).images
    assert (ours - theirs).abs().max() <= 1e-6
    fixed = sample(base, cond, uncond, initial_latents(base, 30, IMAGE_SIZE), settings, lambda t: 1.0)
    assert (ours - fixed).abs().max() > 1e-4  # the annealing matters


def test_killed_and_resumed_abduction_equals_uninterrupted(run_dir: Path, base_dir: Path, image_file: Path, tmp_path: Path):
    from safetensors.torch import load_file

    class Killed(Exception):
        pass

    def kill_at(phase: str, step: int):
        def on_progress(progress):
            if progress.phase.startswith(phase) and progress.step == step:
                raise Killed

        return on_progress

    out = tmp_path / "resumed"
    settings = AbductSettings(PROMPT, TARGET, **FAST)
    with pytest.raises(Killed):
        abduct(settings, AbductInputs(image_file, base_dir), out, on_progress=kill_at("Abduction-1", 3))
    assert (out / CHECKPOINT).is_file() and not (out / "manifest.json").exists()
    with pytest.raises(CfdeployError, match="no manifest.json, an unfinished run"):
        read_run(out)
    with pytest.raises(Killed):
        abduct(settings, AbductInputs(image_file, base_dir), out, resume=True, on_progress=kill_at("Abduction-2", 3))
    manifest = abduct(settings, AbductInputs(image_file, base_dir), out, resume=True)
    assert not (out / CHECKPOINT).exists()
    expected = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["losses"] == expected["losses"]
    for name in (UNET_LORA, TEXT_LORA, EDIT_EMBEDDINGS):
        ours, theirs = load_file(out / name), load_file(run_dir / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours), name
    with pytest.raises(CfdeployError, match="the run is complete; nothing to resume"):
        abduct(settings, AbductInputs(image_file, base_dir), out, resume=True)
    changed = AbductSettings(PROMPT, TARGET, **{**FAST, "unet_steps": 5})
    shutil.copy(run_dir / "manifest.json", tmp_path / "kept.json")
    (out / "manifest.json").unlink()
    (out / CHECKPOINT).write_bytes(b"")
    with pytest.raises(CfdeployError, match="checkpoint.pt"):
        abduct(changed, AbductInputs(image_file, base_dir), out, resume=True)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(base_dir: Path, image_file: Path, tmp_path: Path):
    out = tmp_path / "nan"
    settings = AbductSettings(PROMPT, TARGET, **{**FAST, "lr": 1e30, "save_every": 1})
    with pytest.raises(CfdeployError, match=r"Abduction-1 \(U\): the loss became (nan|inf) at step \d; its checkpoint at step \d is kept"):
        abduct(settings, AbductInputs(image_file, base_dir), out)
    assert (out / CHECKPOINT).is_file() and not (out / UNET_LORA).exists()


def test_edit_cli_writes_samples_sheet_and_report(cli, run_dir: Path, base_dir: Path, tmp_path: Path):
    out = tmp_path / "edits"
    result = cli("dac", "edit", run_dir, "--out", out, "--samples", "2", "--steps", "3", "--seed", "7")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "edit.json", "seed_0007.png", "seed_0008.png"]
    report = json.loads((out / "edit.json").read_text())
    assert report["seeds"] == [7, 8] and len(report["unet_timesteps"]) == 4 and report["eta"] == 0.8
    base = loaded(base_dir, run_dir)
    cond, uncond = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -1.0})
    expected = to_pixels(sample(base, cond, uncond, initial_latents(base, 8, IMAGE_SIZE), PredictSettings(steps=3),
                                lambda t: anneal(t, 0.8)).numpy())
    assert np.array_equal(np.asarray(Image.open(out / "seed_0008.png")), expected)
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape == (IMAGE_SIZE, 2 * IMAGE_SIZE, 3) and np.array_equal(sheet[:, IMAGE_SIZE:], expected)
    assert_refused(cli("dac", "edit", run_dir, "--out", out, "--samples", "1"), None, f"{out}: directory is not empty")


def _copy_base(base_dir: Path, tmp_path: Path) -> Path:
    copy_dir = tmp_path / "base"
    shutil.copytree(base_dir, copy_dir)
    return copy_dir


def test_bad_base_models_are_refused_in_one_line(cli, base_dir: Path, image_file: Path, tmp_path: Path):
    def refused(base: Path, *fragments: str) -> None:
        out = tmp_path / "out"
        result = cli("dac", "abduct", "-i", image_file, "-p", PROMPT, "-t", TARGET, "-b", base, "-o", out, "--rank", "4",
                     "--resolution", IMAGE_SIZE)
        assert_refused(result, out, *fragments)

    refused(tmp_path / "nowhere", "nowhere: not a directory")
    broken = _copy_base(base_dir, tmp_path)
    shutil.rmtree(broken / "vae")
    refused(broken, "vae/config.json: missing")
    shutil.rmtree(broken)
    other = _copy_base(base_dir, tmp_path)
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    refused(other, "expected a UNet2DConditionModel, found UNet2DModel")
    (other / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    refused(other, "extra conditioning ('text_time'")
    (other / "unet" / "config.json").write_text(json.dumps(config))
    scheduler = json.loads((other / "scheduler" / "scheduler_config.json").read_text())
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, "prediction_type": "v_prediction"}))
    refused(other, "prediction_type 'v_prediction'", "stable-diffusion-2-1-base")
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    weights = other / "text_encoder" / "model.safetensors"
    weights.rename(other / "text_encoder" / "pytorch_model.bin")
    refused(other, "has only pickle weights (pytorch_model.bin)", "safetensors")


def test_bad_inputs_are_refused_in_one_line(cli, base_dir: Path, image_file: Path, run_dir: Path, tmp_path: Path):
    out = tmp_path / "out"

    def abduct_with(*extra: object) -> object:
        return cli("dac", "abduct", "-b", base_dir, "-o", out, "--rank", "4", "--resolution", IMAGE_SIZE, *extra)

    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    assert_refused(abduct_with("-i", text_file, "-p", PROMPT, "-t", TARGET), out, "notes.png: not a JPEG, PNG or WebP image")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (20, 20)).save(tiny)
    assert_refused(abduct_with("-i", tiny, "-p", PROMPT, "-t", TARGET), out, "20x20 pixels; DAC needs at least 64")
    assert_refused(abduct_with("-i", image_file, "-p", PROMPT, "-t", TARGET, "--eta", "nan"), out, "--eta must be a finite number")
    assert_refused(abduct_with("-i", image_file, "-p", PROMPT, "-t", TARGET, "--eta", "1.5"), out, "--eta must be from 0 to 1")
    assert_refused(abduct_with("-i", image_file, "-p", PROMPT, "-t", TARGET, "--resume", "--force"), out, "give one of them")
    assert_refused(abduct_with("-i", image_file, "-t", TARGET), out, "--prompt is needed")
    assert_refused(abduct_with("-i", image_file, "-p", PROMPT, "-t", "word " * 80), out, "tokens; the text encoder reads at most 77")
    other_image = tmp_path / "other.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(other_image)
    assert_refused(abduct_with("-i", other_image, "-t", TARGET, "--unet-lora", run_dir), out, "its U was fitted to another image")

    moved = _copy_base(base_dir, tmp_path)
    text_config = json.loads((moved / "text_encoder" / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(moved / "vae" / "diffusion_pytorch_model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save_file(weights, moved / "vae" / "diffusion_pytorch_model.safetensors")
    assert text_config["hidden_size"] == 32
    edits = tmp_path / "edits"
    assert_refused(cli("dac", "edit", run_dir, "-o", edits, "-b", moved), edits, "was fitted to another base model", "vae")

    without_unet = tmp_path / "without_unet"
    shutil.copytree(run_dir, without_unet)
    (without_unet / UNET_LORA).unlink()
    assert_refused(cli("dac", "edit", without_unet, "-o", edits), edits, f"{UNET_LORA}: missing from the DAC run")
    poisoned = tmp_path / "poisoned"
    shutil.copytree(run_dir, poisoned)
    state = load_file(poisoned / TEXT_LORA)
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    from safetensors import safe_open

    with safe_open(str(run_dir / TEXT_LORA), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(state, poisoned / TEXT_LORA, metadata=metadata)
    assert_refused(cli("dac", "edit", poisoned, "-o", edits), edits, f"{key} holds NaN or infinite values")
    assert_refused(cli("dac", "edit", run_dir, "-o", edits, "--beta", "inf"), edits, "--beta must be a finite number")
    assert_refused(cli("dac", "edit", run_dir, "-o", edits, "--scheduler", "euler"), edits, "--scheduler must be one of pndm, ddim")
    (tmp_path / "empty").mkdir()
    assert_refused(cli("dac", "edit", tmp_path / "empty", "-o", edits), edits, "no manifest.json, not a DAC run or bundle")
