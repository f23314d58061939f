"""DAC on a tiny random Stable Diffusion (cfdeploy.dac.synthetic), on the CPU with 1 thread.

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

from cfdeploy.dac import lora
from cfdeploy.dac.abduct import AbductInputs, abduct
from cfdeploy.dac.base_model import inspect_base_model, load_base_model
from cfdeploy.dac.edits import PredictSettings, to_pixels
from cfdeploy.dac.plms import anneal
from cfdeploy.dac.predict import edit_embeddings, initial_latents, sample
from cfdeploy.dac.run import (
    CHECKPOINT,
    EDIT_EMBEDDINGS,
    SOURCE_TEXT_LORA,
    TEXT_LORA,
    UNET_LORA,
    AbductSettings,
    read_run,
)
from cfdeploy.errors import CfdeployError
from conftest import DAC_IMAGE_SIZE as IMAGE_SIZE
from conftest import DAC_PROMPT, DAC_TARGET, FAST_DAC, assert_refused, torch_threads

PROMPT, TARGET, FAST = DAC_PROMPT, DAC_TARGET, FAST_DAC
UNET_LAYERS = 79  # the tiny UNet's modules named like DAC's 14 targets
TEXT_LAYERS = 8  # 2 layers × q, k, v, out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def source_of(path: Path) -> list:
    """How ``dac edit`` names ``path``: ``--bundle`` for a DAC bundle, ``--run`` for anything else (a run, or a folder
    that is neither, which the run check refuses)."""
    manifest = path / "manifest.json"
    is_bundle = manifest.is_file() and json.loads(manifest.read_text()).get("format") == "cfdeploy-dac-bundle"
    return ["--bundle" if is_bundle else "--run", path]


def loaded(dac_base: Path, dac_run: Path | None = None, beta: float = 1.0):
    """The base model, with the run's U and Δ loaded when a run is given."""
    from cfdeploy.dac.predict import load_run_adapters

    base = load_base_model(inspect_base_model(dac_base))
    if dac_run is not None:
        load_run_adapters(base, read_run(dac_run))
    return base


def test_anneal_matches_the_papers_values():
    assert anneal(999, 0.8) == pytest.approx(0.8)
    assert anneal(0, 0.8) == pytest.approx(1.0)
    assert [round(anneal(t, 0.8), 3) for t in (750, 500, 250)] == [0.812, 0.85, 0.912]
    assert anneal(500, 1.0) == 1.0


def test_every_unet_target_is_adapted(dac_base: Path):
    base = loaded(dac_base)
    count = lora.add_adapter(base.unet, lora.AdapterSpec(lora.UNET_ADAPTER, 4, lora.UNET_TARGETS), seed=42)
    names = lora.lora_layers(base.unet, lora.UNET_ADAPTER)
    assert count == len(names) == UNET_LAYERS
    assert {target for target in lora.UNET_TARGETS if any(name.endswith("." + target) for name in names)} == set(
        lora.UNET_TARGETS
    )


def test_run_files_and_manifest(dac_run: Path, dac_base: Path):
    manifest = json.loads((dac_run / "manifest.json").read_text())
    assert sorted(p.name for p in dac_run.iterdir()) == sorted([EDIT_EMBEDDINGS, "manifest.json", TEXT_LORA, UNET_LORA])
    assert manifest["adapted_layers"] == {lora.UNET_ADAPTER: UNET_LAYERS, lora.EDIT_ADAPTER: TEXT_LAYERS}
    assert manifest["base_model"]["files_sha256"] == inspect_base_model(dac_base).files_sha256
    assert {
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "tokenizer/merges.txt",
        "text_encoder/config.json",
    } <= set(manifest["base_model"]["files_sha256"])
    assert manifest["settings"]["prompt"] == PROMPT and manifest["settings"]["target"] == TARGET
    assert [len(losses) for losses in manifest["losses"].values()] == [4, 4]
    assert set(manifest["versions"]) >= {"torch", "diffusers", "transformers", "peft"}


def test_numpy_plms_matches_diffusers_pndm_step_for_step(dac_base: Path):
    from diffusers import PNDMScheduler

    from cfdeploy.dac.plms import PlmsScheduler

    config = json.loads((dac_base / "scheduler" / "scheduler_config.json").read_text())
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
            assert np.abs(ours.step(noise, int(timestep), x) - expected).max() <= 1e-6 * max(
                np.abs(expected).max(), 1.0
            )
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


def test_adapter_files_reload_every_layer(dac_run: Path, dac_base: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    base = loaded(dac_base, dac_run)
    saved = load_file(dac_run / UNET_LORA)
    assert len(saved) == 2 * UNET_LAYERS
    reloaded = lora.adapter_state(base.unet, lora.UNET_ADAPTER)
    assert reloaded.keys() == saved.keys() and all(torch.equal(reloaded[key], saved[key]) for key in saved)
    assert any(
        torch.count_nonzero(tensor) for key, tensor in saved.items() if "lora_B" in key
    )  # trained, not the zero init
    damaged = tmp_path / "damaged.safetensors"
    from safetensors import safe_open

    with safe_open(str(dac_run / UNET_LORA), framework="pt") as handle:
        metadata = handle.metadata()
    dropped = {key: tensor for key, tensor in saved.items() if ".attn1.to_q." not in key}
    save_file(dropped, damaged, metadata=metadata)
    fresh = loaded(dac_base)
    with pytest.raises(CfdeployError, match=rf"does not match this model's {UNET_LAYERS} adapted layers: \d+ missing"):
        lora.load_adapter(damaged, fresh.unet, lora.UNET_ADAPTER, lora.UNET_TARGETS)
    assert not lora.lora_layers(fresh.unet, lora.UNET_ADAPTER)  # nothing half-loaded stays


def test_minus_delta_fold_equals_peft_weight_minus_one(dac_run: Path, dac_base: Path):
    """W ← W − (α/r)·B·A in a plain text encoder gives what PEFT gives at adapter weight −1."""
    from safetensors.torch import load_file

    base = loaded(dac_base, dac_run)
    tokens = base.tokens(TARGET)
    with torch.no_grad():
        lora.activate(base.text_encoder, [lora.EDIT_ADAPTER])
        lora.set_weight(base.text_encoder, lora.EDIT_ADAPTER, -1.0)
        with_peft = base.text_encoder(tokens)[0]
    folded = copy.deepcopy(loaded(dac_base).text_encoder)
    state = load_file(dac_run / TEXT_LORA)
    assert {tensor.shape[0] for key, tensor in state.items() if "lora_A" in key} == {4}  # rank 4 = alpha, so α/r = 1
    with torch.no_grad():
        for name, module in folded.named_modules():
            key = f"{name}.lora_A.weight"
            if key in state:
                module.weight -= state[f"{name}.lora_B.weight"] @ state[key]
        by_fold = folded(tokens)[0]
    assert len([key for key in state if "lora_A" in key]) == TEXT_LAYERS
    assert (by_fold - with_peft).abs().max() <= 1e-5
    plain = loaded(dac_base).text_encoder(tokens)[0]
    assert (by_fold - plain).abs().max() > 1e-4  # Δ changes the embedding


def test_stored_edit_embeddings_are_beta_one(dac_run: Path, dac_base: Path):
    from safetensors.torch import load_file

    base = loaded(dac_base, dac_run)
    cond, uncond = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -1.0})
    stored = load_file(dac_run / EDIT_EMBEDDINGS)
    assert torch.equal(stored["cond"], cond) and torch.equal(stored["uncond"], uncond)


def _pipeline(base):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler.from_config(base.info.configs["scheduler"])
    return StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_prediction_equals_diffusers_pipeline_at_fixed_weights(dac_run: Path, dac_base: Path):
    base = loaded(dac_base, dac_run)
    settings = PredictSettings(steps=5, samples=1)
    cond, uncond = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -1.0})
    ours = sample(base, cond, uncond, initial_latents(base, 29, IMAGE_SIZE), settings, lambda t: 0.9)
    lora.set_weight(base.unet, lora.UNET_ADAPTER, 0.9)
    theirs = _pipeline(base)(
        TARGET,
        negative_prompt="",
        num_inference_steps=5,
        guidance_scale=4.0,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        latents=initial_latents(base, 29, IMAGE_SIZE),
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours - theirs).abs().max() <= 1e-6


def test_annealed_prediction_matches_step_by_step_weights(dac_run: Path, dac_base: Path):
    """γ(t) per UNet call, recomputed through the pipeline: the weight for call i+1 is set in step i's callback."""
    base = loaded(dac_base, dac_run)
    settings = PredictSettings(steps=6, samples=1)
    cond, uncond = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -1.0})
    calls: list[int] = []
    ours = sample(
        base, cond, uncond, initial_latents(base, 30, IMAGE_SIZE), settings, lambda t: anneal(t, 0.8), calls.append
    )
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
    theirs = pipeline(
        TARGET,
        negative_prompt="",
        num_inference_steps=6,
        guidance_scale=4.0,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        latents=initial_latents(base, 30, IMAGE_SIZE),
        output_type="pt",
        callback_on_step_end=set_next_weight,
    ).images
    assert (ours - theirs).abs().max() <= 1e-6
    fixed = sample(base, cond, uncond, initial_latents(base, 30, IMAGE_SIZE), settings, lambda t: 1.0)
    assert (ours - fixed).abs().max() > 1e-4  # the annealing matters


def test_killed_and_resumed_abduction_equals_uninterrupted(
    dac_run: Path, dac_base: Path, dac_image: Path, tmp_path: Path
):
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
        abduct(settings, AbductInputs(dac_image, dac_base), out, on_progress=kill_at("Abduction-1", 3))
    assert (out / CHECKPOINT).is_file() and not (out / "manifest.json").exists()
    with pytest.raises(CfdeployError, match=r"no manifest\.json, an unfinished run"):
        read_run(out)
    changed = AbductSettings(PROMPT, TARGET, **{**FAST, "unet_steps": 5})
    with pytest.raises(
        CfdeployError,
        match=r"checkpoint.pt: --resume needs the settings of the interrupted run; these differ: unet_steps 4 → 5$",
    ):
        abduct(changed, AbductInputs(dac_image, dac_base), out, resume=True)
    with pytest.raises(
        CfdeployError, match=r"--resume needs the inputs of the interrupted run; the device type \(cpu → cuda\) changed"
    ):
        abduct(settings, AbductInputs(dac_image, dac_base), out, resume=True, device="cuda")
    from cfdeploy.outputs import DirectoryLock

    with (
        DirectoryLock(out),
        pytest.raises(CfdeployError, match=f"{out}: another cfdeploy run is writing this directory"),
    ):
        abduct(settings, AbductInputs(dac_image, dac_base), out, resume=True)
    with pytest.raises(Killed):
        abduct(settings, AbductInputs(dac_image, dac_base), out, resume=True, on_progress=kill_at("Abduction-2", 3))
    with pytest.raises(CfdeployError, match=r"holds an unfinished run \(--resume continues it, --force replaces it\)$"):
        abduct(settings, AbductInputs(dac_image, dac_base), out)
    manifest = abduct(settings, AbductInputs(dac_image, dac_base), out, resume=True)
    assert not (out / CHECKPOINT).exists()
    expected = json.loads((dac_run / "manifest.json").read_text())
    assert manifest["losses"] == expected["losses"]
    for name in (UNET_LORA, TEXT_LORA, EDIT_EMBEDDINGS):
        ours, theirs = load_file(out / name), load_file(dac_run / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours), name
    with pytest.raises(CfdeployError, match="the run is complete; nothing to resume"):
        abduct(settings, AbductInputs(dac_image, dac_base), out, resume=True)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(dac_base: Path, dac_image: Path, tmp_path: Path):
    out = tmp_path / "nan"
    settings = AbductSettings(PROMPT, TARGET, **{**FAST, "lr": 1e30, "save_every": 1})
    with pytest.raises(CfdeployError) as refused:
        abduct(settings, AbductInputs(dac_image, dac_base), out)
    step = int(str(refused.value).split(" at step ")[1].split(";")[0])
    assert str(refused.value) == (
        f"Abduction-1 (U): the loss became nan at step {step}; {out / CHECKPOINT} keeps step {step - 1} of this phase; "
        "--resume would replay the same steps: start again (--force) with a lower --lr"
    )
    assert (out / CHECKPOINT).is_file() and not (out / UNET_LORA).exists()
    kept = torch.load(out / CHECKPOINT, weights_only=True)
    assert kept["step"] == step - 1 and all(torch.isfinite(tensor).all() for tensor in kept["adapter"].values())


def test_edit_cli_writes_samples_sheet_and_report(cli, dac_run: Path, dac_base: Path, tmp_path: Path):
    out = tmp_path / "edits"
    result = cli("dac", "edit", *source_of(dac_run), "--out", out, "--num", "2", "--steps", "3", "--seed", "7")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "edit.json", "seed_0007.png", "seed_0008.png"]
    report = json.loads((out / "edit.json").read_text())
    assert report["seeds"] == [7, 8] and len(report["unet_timesteps"]) == 4 and report["eta"] == 0.8
    base = loaded(dac_base, dac_run)
    cond, uncond = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -1.0})
    expected = to_pixels(
        sample(
            base, cond, uncond, initial_latents(base, 8, IMAGE_SIZE), PredictSettings(steps=3), lambda t: anneal(t, 0.8)
        ).numpy()
    )
    assert np.array_equal(np.asarray(Image.open(out / "seed_0008.png")), expected)
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape == (IMAGE_SIZE, 2 * IMAGE_SIZE, 3) and np.array_equal(sheet[:, IMAGE_SIZE:], expected)
    assert_refused(
        cli("dac", "edit", *source_of(dac_run), "--out", out, "--num", "1"), None, f"{out}: directory is not empty"
    )


def _copy_base(dac_base: Path, tmp_path: Path) -> Path:
    copy_dir = tmp_path / "base"
    shutil.copytree(dac_base, copy_dir)
    return copy_dir


def test_bad_base_models_are_refused_in_one_line(cli, dac_base: Path, dac_image: Path, tmp_path: Path):
    def refused(base: Path, *fragments: str) -> None:
        out = tmp_path / "out"
        result = cli(
            "dac",
            "abduct",
            "-i",
            dac_image,
            "--source-text",
            PROMPT,
            "-t",
            TARGET,
            "--base-model",
            base,
            "-o",
            out,
            "--rank",
            "4",
            "--resolution",
            IMAGE_SIZE,
        )
        assert_refused(result, out, *fragments)

    refused(tmp_path / "nowhere", "nowhere: not a directory")
    broken = _copy_base(dac_base, tmp_path)
    shutil.rmtree(broken / "vae")
    refused(broken, "vae/config.json: missing")
    shutil.rmtree(broken)
    other = _copy_base(dac_base, tmp_path)
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    refused(other, "expected a UNet2DConditionModel, found UNet2DModel")
    (other / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    refused(other, "extra conditioning ('text_time'")
    (other / "unet" / "config.json").write_text(json.dumps(config))
    scheduler = json.loads((other / "scheduler" / "scheduler_config.json").read_text())
    (other / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**scheduler, "prediction_type": "v_prediction"})
    )
    refused(other, "prediction_type 'v_prediction'", "stable-diffusion-2-1-base")
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    weights = other / "text_encoder" / "model.safetensors"
    weights.rename(other / "text_encoder" / "pytorch_model.bin")
    refused(other, "has only pickle weights (pytorch_model.bin)", "safetensors")


def test_bad_inputs_are_refused_in_one_line(cli, dac_base: Path, dac_image: Path, dac_run: Path, tmp_path: Path):
    out = tmp_path / "out"

    def abduct_with(*extra: object) -> object:
        return cli(
            "dac", "abduct", "--base-model", dac_base, "-o", out, "--rank", "4", "--resolution", IMAGE_SIZE, *extra
        )

    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    assert_refused(
        abduct_with("-i", text_file, "--source-text", PROMPT, "-t", TARGET),
        out,
        "notes.png: not a JPEG, PNG or WebP image",
    )
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (20, 20)).save(tiny)
    assert_refused(
        abduct_with("-i", tiny, "--source-text", PROMPT, "-t", TARGET), out, "20x20 pixels; DAC needs at least 64"
    )
    assert_refused(
        abduct_with("-i", dac_image, "--source-text", PROMPT, "-t", TARGET, "--eta", "nan"),
        out,
        "--eta must be a finite number",
    )
    assert_refused(
        abduct_with("-i", dac_image, "--source-text", PROMPT, "-t", TARGET, "--eta", "1.5"),
        out,
        "--eta must be from 0 to 1",
    )
    assert_refused(
        abduct_with("-i", dac_image, "--source-text", PROMPT, "-t", TARGET, "--resume", "--force"),
        out,
        "give one of them",
    )
    assert_refused(abduct_with("-i", dac_image, "-t", TARGET), out, "--source-text is needed")
    assert_refused(
        abduct_with("-i", dac_image, "--source-text", PROMPT, "-t", "word " * 80),
        out,
        "tokens; the text encoder reads at most 77",
    )
    other_image = tmp_path / "other.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(other_image)
    assert_refused(
        abduct_with("-i", other_image, "-t", TARGET, "--unet-lora", dac_run), out, "its U was fitted to another image"
    )

    moved = _copy_base(dac_base, tmp_path)
    text_config = json.loads((moved / "text_encoder" / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(moved / "vae" / "diffusion_pytorch_model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save_file(weights, moved / "vae" / "diffusion_pytorch_model.safetensors")
    assert text_config["hidden_size"] == 32
    edits = tmp_path / "edits"
    assert_refused(
        cli("dac", "edit", *source_of(dac_run), "-o", edits, "--base-model", moved),
        edits,
        "was fitted to another base model",
        "vae",
    )
    for changed in ("scheduler/scheduler_config.json", "tokenizer/merges.txt"):  # the pipeline, not only the weights
        other = _copy_base(dac_base, tmp_path / changed.replace("/", "_"))
        with open(other / changed, "a") as handle:
            handle.write("\n")
        assert_refused(
            cli("dac", "edit", *source_of(dac_run), "-o", edits, "--base-model", other),
            edits,
            "was fitted to another base model",
            f"{changed} in ",
        )

    without_unet = tmp_path / "without_unet"
    shutil.copytree(dac_run, without_unet)
    (without_unet / UNET_LORA).unlink()
    assert_refused(
        cli("dac", "edit", *source_of(without_unet), "-o", edits), edits, f"{UNET_LORA}: missing from the DAC run"
    )
    poisoned = tmp_path / "poisoned"
    shutil.copytree(dac_run, poisoned)
    state = load_file(poisoned / TEXT_LORA)
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    from safetensors import safe_open

    with safe_open(str(dac_run / TEXT_LORA), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(state, poisoned / TEXT_LORA, metadata=metadata)
    assert_refused(cli("dac", "edit", *source_of(poisoned), "-o", edits), edits, f"{key} holds NaN or infinite values")
    assert_refused(
        cli("dac", "edit", *source_of(dac_run), "-o", edits, "--beta", "inf"), edits, "--beta must be a finite number"
    )
    assert_refused(
        cli("dac", "edit", *source_of(dac_run), "-o", edits, "--scheduler", "euler"),
        edits,
        "--scheduler must be one of pndm, ddim",
    )
    (tmp_path / "empty").mkdir()
    assert_refused(
        cli("dac", "edit", *source_of(tmp_path / "empty"), "-o", edits),
        edits,
        "no manifest.json, not a DAC run or bundle",
    )


def test_onnx_unet_with_lora_scale_matches_peft_at_several_scales(dac_bundle: Path, dac_run: Path, dac_base: Path):
    import onnxruntime

    base = loaded(dac_base, dac_run)
    session = onnxruntime.InferenceSession(str(dac_bundle / "unet.onnx"), providers=["CPUExecutionProvider"])
    assert [entry.name for entry in session.get_inputs()] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "lora_scale",
    ]
    rng = np.random.default_rng(3)
    sample_in = rng.standard_normal((2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2), dtype=np.float32)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)
    for scale, timestep in ((0.8, 999), (0.85, 500), (1.0, 1), (-0.3, 250)):
        lora.set_weight(base.unet, lora.UNET_ADAPTER, scale)
        with torch.no_grad():
            expected = base.unet(
                torch.from_numpy(sample_in), torch.tensor([timestep]), encoder_hidden_states=torch.from_numpy(context)
            ).sample.numpy()
        got = session.run(
            None,
            {
                "sample": sample_in,
                "timestep": np.array([timestep], np.float32),
                "encoder_hidden_states": context,
                "lora_scale": np.array([scale], np.float32),
            },
        )[0]
        assert np.abs(got - expected).max() <= 1e-5, scale


def test_onnx_text_encoder_with_delta_scale_matches_peft(dac_bundle: Path, dac_run: Path, dac_base: Path):
    import onnxruntime

    base = loaded(dac_base, dac_run)
    session = onnxruntime.InferenceSession(str(dac_bundle / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    tokens = np.load(dac_bundle / "tokens.npy")
    assert np.array_equal(tokens, torch.cat([base.tokens(""), base.tokens(TARGET)]).numpy())
    for beta in (1.0, 0.5, 2.0):
        cond, uncond = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -beta})
        got = session.run(None, {"tokens": tokens, "text_lora_scale": np.array([-beta], np.float32)})[0]
        assert np.abs(got - torch.cat([uncond, cond]).numpy()).max() <= 1e-5
    at_one = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -1.0})
    assert np.array_equal(np.load(dac_bundle / "edit_embeddings.npy"), torch.cat([at_one[1], at_one[0]]).numpy())


def test_bundle_edit_equals_the_torch_edit(cli, dac_bundle: Path, dac_run: Path, tmp_path: Path):
    """ONNX Runtime with numpy PLMS against PyTorch with diffusers' PNDM: the same PNGs, also at another β."""
    for beta in ("1", "0.5"):
        torch_out, bundle_out = tmp_path / f"torch-{beta}", tmp_path / f"bundle-{beta}"
        for source, out in ((dac_run, torch_out), (dac_bundle, bundle_out)):
            result = cli("dac", "edit", *source_of(source), "--out", out, "--num", "2", "--steps", "6", "--beta", beta)
            assert result.exit_code == 0, result.stderr
        assert json.loads((bundle_out / "edit.json").read_text())["backend"] == "onnxruntime"
        for name in ("seed_0029.png", "seed_0030.png"):
            ours = np.asarray(Image.open(bundle_out / name)).astype(int)
            theirs = np.asarray(Image.open(torch_out / name)).astype(int)
            assert np.abs(ours - theirs).max() <= 1, (beta, name)  # a pixel may round the other way


RANDN_CHECK = """
import json, sys
import numpy as np, torch
from cfdeploy.dac.torch_randn import TorchCpuGenerator, aten_cpu_kernel
mismatches = []
for seed in (0, 29, 30, 2**32 + 29):
    ours, theirs = TorchCpuGenerator(seed), torch.Generator("cpu").manual_seed(seed)
    for shape in ((1, 4, 64, 64), (1, 4, 16, 16), (1, 4, 7, 7), (17,), (2, 3), (1,), (1, 4, 16, 16), (2, 3)):
        drawn, expected = ours.randn(shape), torch.randn(shape, generator=theirs).numpy()
        if drawn.shape != expected.shape or not np.array_equal(drawn.view(np.int32), expected.view(np.int32)):
            mismatches.append([seed, list(shape)])
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "kernel": aten_cpu_kernel(), "mismatches": mismatches}))
"""


def _cpu_flags() -> set[str]:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return set(next((line for line in lines if line.startswith("flags")), "").split())


@pytest.mark.parametrize("capability", [None, "default", "avx2", "avx512"])
def test_bundle_noise_equals_torch_cpu_randn_bit_for_bit(capability: str | None):
    """The numpy transcription against torch.randn for the latents' shapes, a tail (size % 16), the small-size path,
    consecutive draws from one generator and a seed above 2³², under each CPU capability torch can start with: the
    machine's own, and each forced through ATEN_CPU_CAPABILITY (read once, at start-up). AVX-512 runs ATen's AVX2
    normal kernel, so forcing it is safe on any AVX2 CPU."""
    import os
    import subprocess
    import sys

    if capability in ("avx2", "avx512") and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX2 and FMA, so ATen cannot run its AVX2 kernels")
    environment = {key: value for key, value in os.environ.items() if key != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        environment["ATEN_CPU_CAPABILITY"] = capability
    process = subprocess.run(
        [sys.executable, "-c", RANDN_CHECK], env=environment, capture_output=True, text=True, timeout=120, check=False
    )
    assert process.returncode == 0, process.stderr
    report = json.loads(process.stdout)
    assert report["kernel"] == ("avx2" if report["capability"] in ("AVX2", "AVX512") else "scalar"), report
    assert report["mismatches"] == [], report


def test_aten_kernel_follows_the_capability_variable_then_the_cpu_flags(tmp_path: Path):
    from cfdeploy.dac.torch_randn import aten_cpu_kernel

    avx512, old = tmp_path / "avx512", tmp_path / "old"
    avx512.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512vl avx512bw avx512dq\n")
    old.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")
    assert [aten_cpu_kernel({}, avx512), aten_cpu_kernel({}, old)] == ["avx2", "scalar"]
    assert [aten_cpu_kernel({"ATEN_CPU_CAPABILITY": value}, old) for value in ("avx2", "avx512")] == ["avx2", "avx2"]
    assert aten_cpu_kernel({"ATEN_CPU_CAPABILITY": "default"}, avx512) == "scalar"
    assert aten_cpu_kernel({"ATEN_CPU_CAPABILITY": "AVX2"}, old) == "scalar"  # torch ignores what it does not know


def _recorded_latents(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """The initial latents each sampler starts from, as ``dac edit`` hands them over."""
    from cfdeploy.dac.bundle import BundleSampler
    from cfdeploy.dac.predict import TorchSampler

    recorded: list[np.ndarray] = []
    for sampler in (TorchSampler, BundleSampler):

        def recording(self, latents, on_call, original=sampler.sample):
            recorded.append(latents.copy())
            return original(self, latents, on_call)

        monkeypatch.setattr(sampler, "sample", recording)
    return recorded


def test_dac_edit_starts_from_the_official_generators_latents(
    cli, dac_run: Path, dac_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Seed S is torch.randn from torch.Generator(device).manual_seed(S), as inference_t.py draws it, one generator per
    seed; a bundle starts from the CPU generator's very numbers."""
    recorded = _recorded_latents(monkeypatch)
    for source, name in ((dac_run, "torch"), (dac_bundle, "bundle")):
        result = cli(
            "dac", "edit", *source_of(source), "--out", tmp_path / name, "--num", "2", "--steps", "2", "--seed", "41"
        )
        assert result.exit_code == 0, result.stderr
    for index, seed in enumerate((41, 42, 41, 42)):
        expected = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(seed)).numpy()
        assert np.array_equal(recorded[index], expected), seed
    torch_report, bundle_report = (
        json.loads((tmp_path / name / "edit.json").read_text()) for name in ("torch", "bundle")
    )
    assert torch_report["noise"] == ["torch.Generator(cpu) seed 41", "torch.Generator(cpu) seed 42"]
    assert bundle_report["noise"][0].startswith("torch.Generator(cpu) seed 41 (numpy, ATen's ")
    assert torch_report["seeds"] == bundle_report["seeds"] == [41, 42]


def test_noise_file_gives_the_initial_latents_on_both_paths(
    cli, dac_run: Path, dac_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """--noise: [N,C,H,W] samples N edits, [C,H,W] one; seed 29's own latents from a file make seed 29's edit."""
    seeded = tmp_path / "seeded"
    assert cli("dac", "edit", *source_of(dac_run), "--out", seeded, "--num", "1", "--steps", "3").exit_code == 0
    official = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(29)).numpy()
    other = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(1000)).numpy()
    pair, single = tmp_path / "pair.npy", tmp_path / "single.npy"
    np.save(pair, np.concatenate([official, other]))
    np.save(single, other[0].astype(np.float64))
    recorded = _recorded_latents(monkeypatch)
    for source, noise, name in ((dac_run, pair, "torch"), (dac_bundle, pair, "bundle"), (dac_bundle, single, "single")):
        result = cli("dac", "edit", *source_of(source), "--out", tmp_path / name, "--steps", "3", "--noise", noise)
        assert result.exit_code == 0, result.stderr
    assert [
        np.array_equal(latents, expected)
        for latents, expected in zip(recorded, [official, other] * 2 + [other], strict=True)
    ] == [True] * 5
    assert sorted(path.name for path in (tmp_path / "torch").iterdir()) == [
        "contact_sheet.png",
        "edit.json",
        "noise_0000.png",
        "noise_0001.png",
    ]
    report = json.loads((tmp_path / "torch" / "edit.json").read_text())
    assert report["noise"] == [f"file {pair} [0]", f"file {pair} [1]"]
    assert report["seeds"] is None and report["settings"]["seed"] is None and report["settings"]["samples"] == 2
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "torch" / "noise_0000.png")), np.asarray(Image.open(seeded / "seed_0029.png"))
    )
    for name in ("noise_0000.png", "noise_0001.png"):
        ours = np.asarray(Image.open(tmp_path / "bundle" / name)).astype(int)
        theirs = np.asarray(Image.open(tmp_path / "torch" / name)).astype(int)
        assert np.abs(ours - theirs).max() <= 1, name  # a pixel may round the other way
    assert json.loads((tmp_path / "single" / "edit.json").read_text())["noise"] == [f"file {single} [0]"]


def test_bad_noise_files_are_refused_in_one_line(cli, dac_run: Path, dac_bundle: Path, tmp_path: Path):
    wrong_shape, not_finite, integers = tmp_path / "wrong.npy", tmp_path / "nan.npy", tmp_path / "integers.npy"
    np.save(wrong_shape, np.zeros((2, 4, 8, 8), np.float32))
    latents = np.zeros((1, 4, 16, 16), np.float32)
    latents[0, 1, 2, 3] = np.nan
    np.save(not_finite, latents)
    np.save(integers, np.zeros((1, 4, 16, 16), np.int64))
    out = tmp_path / "edits"
    for source in (dac_run, dac_bundle):
        assert_refused(
            cli("dac", "edit", *source_of(source), "-o", out, "--noise", wrong_shape),
            out,
            f"{wrong_shape}: expected initial latents [N,4,16,16]",
            "found [2, 4, 8, 8]",
        )
        assert_refused(
            cli("dac", "edit", *source_of(source), "-o", out, "--noise", not_finite),
            out,
            f"{not_finite}: initial latents contain 1 NaN/inf values",
        )
    assert_refused(
        cli("dac", "edit", *source_of(dac_run), "-o", out, "--noise", integers),
        out,
        f"{integers}: expected floating-point",
    )
    assert_refused(
        cli("dac", "edit", *source_of(dac_run), "-o", out, "--noise", tmp_path / "absent.npy"), out, "absent.npy"
    )
    assert_refused(
        cli("dac", "edit", *source_of(dac_run), "-o", out, "--noise", wrong_shape, "--seed", "3"),
        out,
        "--noise gives the initial latents; leave out --seed and --num",
    )


def test_merged_export_is_a_stock_unet_and_records_its_error(cli, dac_run: Path, dac_bundle: Path, tmp_path: Path):
    """Exported after ``dac_bundle`` (the same run, the exact UNet): its text encoder and VAE decoder are reused."""
    import onnxruntime

    out = tmp_path / "merged"
    result = cli("dac", "export", "--run", dac_run, "--out", out, "--unet", "merged")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["reused"] == ["text_encoder", "vae_decoder"]
    assert "; text_encoder, vae_decoder reused from earlier exports)" in " ".join(result.stderr.split())
    for name in ("text_encoder.onnx", "text_encoder.onnx.data", "vae_decoder.onnx", "vae_decoder.onnx.data"):
        assert (out / name).read_bytes() == (dac_bundle / name).read_bytes(), name
    session = onnxruntime.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"])
    assert "lora_scale" not in [entry.name for entry in session.get_inputs()]
    config = json.loads((out / "scheduler_config.json").read_text())
    from diffusers import PNDMScheduler

    reference = PNDMScheduler.from_config(config)
    reference.set_timesteps(30)
    assert manifest["unet"]["merged_scale"] == pytest.approx(
        np.mean([anneal(int(t), 0.8) for t in reference.timesteps])
    )
    assert 1e-4 < manifest["parity"]["unet"]["merged_vs_exact_rel_l2"] < 0.1
    assert manifest["parity"]["unet"]["rel_l2"] <= 1e-5
    assert "merged UNet vs the exact γ(t) path: rel L2" in result.stderr


def test_damaged_bundles_are_refused_in_one_line(cli, dac_bundle: Path, tmp_path: Path):
    damaged = tmp_path / "damaged"
    shutil.copytree(dac_bundle, damaged)
    with open(damaged / "unet.onnx.data", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    edits = tmp_path / "edits"
    assert_refused(
        cli("dac", "edit", *source_of(damaged), "-o", edits),
        edits,
        "unet.onnx.data: sha256 ",
        "differs from the manifest's",
        "(file changed or damaged)",
    )
    assert_refused(
        cli("dac", "edit", *source_of(dac_bundle), "-o", edits, "--scheduler", "ddim"),
        edits,
        "--scheduler ddim: a bundle samples with the base model's PNDM scheduler only",
    )
    assert_refused(
        cli("dac", "edit", *source_of(dac_bundle), "-o", edits, "--base-model", tmp_path),
        edits,
        "--base-model is for runs",
    )


def test_a_reused_unet_lora_makes_a_complete_run(
    cli, dac_run: Path, dac_base: Path, dac_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """--unet-lora copies U into the new run (which edits on its own), fitted into the working directory itself."""
    from safetensors.torch import load_file

    out = tmp_path / "dog_cap"
    out.mkdir()
    (out / "old.txt").write_text("replaced with --force")
    monkeypatch.chdir(out)
    options = ["--text-steps", "2", "--rank", "4", "--resolution", IMAGE_SIZE]
    assert_refused(
        cli(
            "dac",
            "abduct",
            "-i",
            dac_image,
            "-t",
            "A dog.",
            "--base-model",
            dac_base,
            "-o",
            dac_run,
            "--force",
            "--unet-lora",
            dac_run,
            *options,
        ),
        None,
        f"{dac_run}: is the input {dac_run}",
    )
    result = cli(
        "dac",
        "abduct",
        "-i",
        dac_image,
        "-t",
        "A dog.",
        "--base-model",
        dac_base,
        "-o",
        ".",
        "--force",
        "--unet-lora",
        dac_run,
        *options,
    )
    assert result.exit_code == 0, result.stderr
    assert Path.cwd() == out and sorted(p.name for p in out.iterdir()) == sorted(
        [EDIT_EMBEDDINGS, "manifest.json", TEXT_LORA, UNET_LORA]
    )
    ours, theirs = load_file(out / UNET_LORA), load_file(dac_run / UNET_LORA)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    manifest = read_run(out).manifest
    assert manifest["unet_lora_from"] == str(dac_run) and list(manifest["losses"]) == ["Abduction-2 (Δ)"]
    assert manifest["settings"]["prompt"] == PROMPT  # taken from the reused run
    result = cli("dac", "edit", *source_of(out), "--out", tmp_path / "edits", "--num", "1", "--steps", "2")
    assert result.exit_code == 0, result.stderr


def test_variant_t_predicts_with_t_plus_one_and_delta_minus_beta(cli, dac_base: Path, dac_image: Path, tmp_path: Path):
    from safetensors.torch import load_file

    out = tmp_path / "variant_t"
    manifest = abduct(
        AbductSettings(PROMPT, TARGET, **{**FAST, "variant": "t"}), AbductInputs(dac_image, dac_base), out
    )
    assert list(manifest["losses"]) == ["Abduction-1 (U)", "Abduction-T (T)", "Abduction-2 (Δ)"]
    assert manifest["adapted_layers"] == {
        lora.UNET_ADAPTER: UNET_LAYERS,
        lora.SOURCE_ADAPTER: TEXT_LAYERS,
        lora.EDIT_ADAPTER: TEXT_LAYERS,
    }
    base = loaded(dac_base, out)
    both = edit_embeddings(base, TARGET, {lora.SOURCE_ADAPTER: 1.0, lora.EDIT_ADAPTER: -1.0})
    stored = load_file(out / EDIT_EMBEDDINGS)
    assert (
        max((stored["cond"] - both[0]).abs().max(), (stored["uncond"] - both[1]).abs().max()) <= 1e-5
    )  # adapter order
    delta_only = edit_embeddings(base, TARGET, {lora.EDIT_ADAPTER: -1.0})
    assert (delta_only[0] - both[0]).abs().max() > 1e-4  # T takes part
    t_state, delta_state = load_file(out / SOURCE_TEXT_LORA), load_file(out / TEXT_LORA)
    assert t_state.keys() == delta_state.keys() and not torch.equal(
        next(iter(t_state.values())), next(iter(delta_state.values()))
    )
    edits = tmp_path / "edits"
    result = cli("dac", "edit", *source_of(out), "--out", edits, "--num", "1", "--steps", "2", "--beta", "0.5")
    assert result.exit_code == 0, result.stderr
    half = edit_embeddings(base, TARGET, {lora.SOURCE_ADAPTER: 1.0, lora.EDIT_ADAPTER: -0.5})
    expected = to_pixels(
        sample(
            base,
            half[0],
            half[1],
            initial_latents(base, 29, IMAGE_SIZE),
            PredictSettings(steps=2),
            lambda t: anneal(t, 0.8),
        ).numpy()
    )
    assert np.array_equal(np.asarray(Image.open(edits / "seed_0029.png")), expected)


def test_ctrl_c_in_abduct_says_how_to_resume(
    cli, dac_base: Path, dac_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from cfdeploy.dac.abduct import Abduction

    real_loss = Abduction.loss

    def interrupted_at_step_3(self, phase, phase_index, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_loss(self, phase, phase_index, step)

    monkeypatch.setattr(Abduction, "loss", interrupted_at_step_3)
    out = tmp_path / "run"
    result = cli(
        "dac",
        "abduct",
        "-i",
        dac_image,
        "--source-text",
        PROMPT,
        "-t",
        TARGET,
        "--base-model",
        dac_base,
        "-o",
        out,
        "--unet-steps",
        "4",
        "--text-steps",
        "4",
        "--rank",
        "4",
        "--resolution",
        IMAGE_SIZE,
        "--save-every",
        "2",
    )
    assert result.exit_code == 130
    assert error_lines(result.stderr) == [
        f"error: interrupted; {out / CHECKPOINT} keeps the last save: continue with the same command and --resume"
    ]
    early = tmp_path / "early"
    result = cli(
        "dac",
        "abduct",
        "-i",
        dac_image,
        "--source-text",
        PROMPT,
        "-t",
        TARGET,
        "--base-model",
        dac_base,
        "-o",
        early,
        "--unet-steps",
        "4",
        "--rank",
        "4",
        "--resolution",
        IMAGE_SIZE,
        "--save-every",
        "3",
    )
    assert result.exit_code == 130 and error_lines(result.stderr) == ["error: interrupted; nothing was written"]


def error_lines(stderr: str) -> list[str]:
    """The error, as the last line of what the run printed (its estimate and progress come before it)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and [line for line in lines if line.startswith("error:")] == lines[-1:], stderr
    return lines[-1:]


def test_devices_are_honoured_or_refused(cli, dac_bundle: Path, dac_run: Path, tmp_path: Path):
    import onnxruntime

    edits = tmp_path / "edits"
    for source in (dac_bundle, dac_run):
        assert_refused(
            cli("dac", "edit", *source_of(source), "-o", edits, "--device", "cudafoo"),
            edits,
            "--device 'cudafoo': expected cpu, cuda or cuda:N",
        )
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert_refused(
            cli("dac", "edit", *source_of(dac_bundle), "-o", edits, "--device", "cuda:1"),
            edits,
            "--device cuda:1: this ONNX Runtime has no CUDA provider",
            "onnxruntime-gpu",
        )
    result = cli("dac", "edit", *source_of(dac_bundle), "-o", edits, "--device", "cpu", "--num", "1", "--steps", "1")
    assert result.exit_code == 0, result.stderr
    assert json.loads((edits / "edit.json").read_text())["providers"] == ["CPUExecutionProvider"]


def test_damaged_runs_adapters_and_weights_are_refused(
    cli, dac_run: Path, dac_bundle: Path, dac_base: Path, dac_image: Path, tmp_path: Path
):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    edits = tmp_path / "edits"

    def damaged_run(name: str) -> Path:
        copy_dir = tmp_path / name
        shutil.copytree(dac_run, copy_dir)
        return copy_dir

    swapped = damaged_run("swapped")
    shutil.copy(dac_run / TEXT_LORA, swapped / UNET_LORA)
    assert_refused(
        cli("dac", "edit", *source_of(swapped), "-o", edits), edits, f"{UNET_LORA}: holds adapter 'delta', expected 'U'"
    )
    relabelled = damaged_run("relabelled")
    with safe_open(str(dac_run / TEXT_LORA), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(load_file(dac_run / TEXT_LORA), relabelled / TEXT_LORA, metadata={**metadata, "rank": "8"})
    assert_refused(cli("dac", "edit", *source_of(relabelled), "-o", edits), edits, "not rank 8 as its metadata says")
    stale = damaged_run("stale")
    embeddings = load_file(dac_run / EDIT_EMBEDDINGS)
    save_file({"cond": embeddings["cond"][:, :5]}, stale / EDIT_EMBEDDINGS)
    assert_refused(
        cli("dac", "edit", *source_of(stale), "-o", edits),
        edits,
        f"{EDIT_EMBEDDINGS}: expected 'cond' of shape (1, 77, 32), found (1, 5, 32)",
    )
    garbled = damaged_run("garbled")
    manifest = json.loads((dac_run / "manifest.json").read_text())
    (garbled / "manifest.json").write_text(
        json.dumps({**manifest, "settings": {**manifest["settings"], "eta": "high"}})
    )
    assert_refused(
        cli("dac", "edit", *source_of(garbled), "-o", edits),
        edits,
        "manifest.json: settings.eta is 'high', expected a float",
    )
    (garbled / "manifest.json").write_text(json.dumps({**manifest, "settings": {**manifest["settings"], "eta": 7.0}}))
    assert_refused(
        cli("dac", "export", "--run", garbled, "-o", edits),
        edits,
        "recorded settings refused: --eta must be from 0 to 1",
    )

    bundle = tmp_path / "bundle"
    shutil.copytree(dac_bundle, bundle)
    bundle_manifest = json.loads((dac_bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**bundle_manifest, "latent_shape": [4, -16, 16]}))
    assert_refused(cli("dac", "edit", *source_of(bundle), "-o", edits), edits, "latent_shape is [4, -16, 16]")

    base = _copy_base(dac_base, tmp_path)
    weights = load_file(base / "text_encoder" / "model.safetensors")
    dropped = sorted(weights)[0]
    save_file(
        {key: value for key, value in weights.items() if key != dropped}, base / "text_encoder" / "model.safetensors"
    )
    out = tmp_path / "out"
    result = cli(
        "dac",
        "abduct",
        "-i",
        dac_image,
        "--source-text",
        PROMPT,
        "-t",
        TARGET,
        "--base-model",
        base,
        "-o",
        out,
        "--rank",
        "4",
        "--resolution",
        IMAGE_SIZE,
    )
    assert_refused(result, out, "text_encoder: its weights do not fit its config.json: 1 missing keys", dropped)


def test_export_refusals(cli, dac_run: Path, tmp_path: Path):
    assert_refused(
        cli("dac", "export", "--run", dac_run, "-o", tmp_path / "b", "--unet", "fp8"),
        tmp_path / "b",
        "--unet must be one of scale-input, merged, got 'fp8'",
    )
    assert_refused(
        cli("dac", "export", "--run", dac_run, "-o", dac_run / "bundle"), None, f"lies inside the input {dac_run}"
    )
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / CHECKPOINT).write_bytes(b"")
    assert_refused(cli("dac", "export", "--run", unfinished, "-o", tmp_path / "b"), tmp_path / "b", "an unfinished run")


def test_the_bundle_records_where_each_unet_lora_tensor_is(dac_bundle: Path, dac_run: Path):
    """The refit map, checked against the graph's own initializers (read with onnx) and the run's U."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    refit = json.loads((dac_bundle / "manifest.json").read_text())["unet"]["refit"]
    assert refit["adapter"] == lora.UNET_ADAPTER and refit["rank"] == FAST["rank"]
    unet_lora = load_file(dac_run / UNET_LORA)
    assert set(refit["weights"]) == set(unet_lora) and len(unet_lora) == 2 * UNET_LAYERS
    initializers = {
        entry.name: entry
        for entry in onnx.load(str(dac_bundle / "unet.onnx"), load_external_data=False).graph.initializer
    }
    for key, entry in refit["weights"].items():
        stored = numpy_helper.to_array(initializers[entry["initializer"]], base_dir=str(dac_bundle))
        assert np.array_equal(stored.T if entry["transposed"] else stored, unet_lora[key]), key


def test_lora_tensors_are_found_by_value_where_names_are_anonymised(dac_run: Path):
    from safetensors.numpy import load_file

    from cfdeploy.dac.refit_map import match_initializers, refit_weights

    state = dict(sorted(load_file(dac_run / UNET_LORA).items())[:6])
    stored = {f"val_{index}": (value.T if index % 2 else value) for index, (key, value) in enumerate(state.items())}
    stored["conv_in.weight"] = np.ones((4, 4, 3, 3), np.float32)
    shapes = {name: value.shape for name, value in stored.items()}
    mapping = match_initializers(shapes, stored.__getitem__, state, lora.UNET_ADAPTER)
    assert [(entry["initializer"], entry["transposed"]) for entry in mapping.values()] == [
        (f"val_{index}", bool(index % 2 and state[key].ndim == 2)) for index, key in enumerate(state)
    ]
    other = {key: value * 2 for key, value in state.items()}
    weights = refit_weights(mapping, other, Path("other.safetensors"))
    assert all(np.array_equal(weights[f"val_{index}"], stored[f"val_{index}"] * 2) for index in range(len(state)))
    first = next(iter(state))
    duplicated = {**stored, "val_copy": stored["val_0"]}
    with pytest.raises(CfdeployError, match=rf"{first} \(.*\) matches 2 of the graph's initializers"):
        match_initializers(
            {name: value.shape for name, value in duplicated.items()}, duplicated.__getitem__, state, lora.UNET_ADAPTER
        )
    del stored["val_0"]
    with pytest.raises(
        CfdeployError, match=rf"{first} \(.*\) is not among the graph's initializers, by name or by value"
    ):
        match_initializers(
            {name: value.shape for name, value in stored.items()}, stored.__getitem__, state, lora.UNET_ADAPTER
        )
    with pytest.raises(CfdeployError, match=r"other.safetensors: .* has shape \(2, 2\)"):
        refit_weights(mapping, {**other, first: np.zeros((2, 2), np.float32)}, Path("other.safetensors"))


def test_another_run_sampled_on_a_bundle_equals_its_torch_edit(
    cli, dac_bundle: Path, dac_base: Path, dac_image: Path, tmp_path: Path
):
    """--run puts another run's U in place of the bundle's (by the refit map) and samples its stored embeddings."""
    other = tmp_path / "other"
    abduct(
        AbductSettings(PROMPT, "A cat in the snow.", **{**FAST, "seed": 7}), AbductInputs(dac_image, dac_base), other
    )
    torch_out, bundle_out = tmp_path / "torch", tmp_path / "bundle"
    assert cli("dac", "edit", *source_of(other), "--out", torch_out, "--num", 1, "--steps", 4).exit_code == 0
    result = cli("dac", "edit", *source_of(dac_bundle), "--run", other, "--out", bundle_out, "--num", 1, "--steps", 4)
    assert result.exit_code == 0, result.stderr
    report = json.loads((bundle_out / "edit.json").read_text())
    assert report["refit_run"] == str(other) and report["target"] == "A cat in the snow."
    ours = np.asarray(Image.open(bundle_out / "seed_0029.png")).astype(int)
    assert np.abs(ours - np.asarray(Image.open(torch_out / "seed_0029.png")).astype(int)).max() <= 1
    own = tmp_path / "own"
    assert cli("dac", "edit", *source_of(dac_bundle), "--out", own, "--num", 1, "--steps", 4).exit_code == 0
    assert np.abs(ours - np.asarray(Image.open(own / "seed_0029.png")).astype(int)).max() > 8  # the other U took effect

    edits = tmp_path / "edits"
    assert_refused(
        cli("dac", "edit", *source_of(dac_bundle), "--run", other, "-o", edits, "--beta", "0.5"),
        edits,
        f"--run samples {other}'s stored embeddings (β 1); for --beta 0.5 export that run",
    )
    assert_refused(
        cli("dac", "edit", *source_of(other), "-o", edits, "--backend", "tensorrt"), edits, "a run samples with PyTorch"
    )
    assert_refused(
        cli("dac", "edit", *source_of(dac_bundle), "-o", edits, "--backend", "torch"),
        edits,
        "--backend torch: a bundle runs on onnxruntime or tensorrt",
    )
    wider = tmp_path / "wider"
    abduct(AbductSettings(PROMPT, TARGET, **{**FAST, "rank": 8}), AbductInputs(dac_image, dac_base), wider)
    assert_refused(
        cli("dac", "edit", *source_of(dac_bundle), "--run", wider, "-o", edits),
        edits,
        f"{wider / UNET_LORA}: ",
        "has shape (8, ",
        "the bundle's UNet needs (4, ",
    )
