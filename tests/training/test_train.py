"""``cfdeploy train`` on a 64 px synthetic generator with random CLIP ViT-B/32 and ArcFace weights: one step
against an independent transcription of the official computation, exact resume, the official checkpoint
format that edit and export accept, and refusals."""

from __future__ import annotations

import gc
import json
import re
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch.nn import functional as F
from torchvision import transforms
from torchvision.transforms.functional import perspective

import synthetic_files
from cfdeploy import refine
from cfdeploy.checkpoints import load_cfclip
from cfdeploy.errors import CfdeployError
from cfdeploy.models import reference
from cfdeploy.models.arcface import ArcFace
from cfdeploy.refine import CLIP_MEAN, CLIP_STD, perspective_endpoints
from cfdeploy.training.run import prepare, train
from cfdeploy.training.trainer import TrainInputs, TrainSettings, batch_indices, step_generator
from conftest import TOLERANCE, assert_refused, official_edit, official_w_hat, rel_l2

PROMPT = "green lipstick"
N_LATENT_64 = 10


@pytest.fixture(scope="module")
def run_files(tmp_path_factory: pytest.TempPathFactory, cfclip_64: Path, clip_vit_b32_file: Path) -> dict[str, Path]:
    """The generator (a 64 px CF-CLIP checkpoint), full CLIP ViT-B/32 and ArcFace IR-SE-50 weights, W+ codes."""
    directory = tmp_path_factory.mktemp("train_files")
    files = {
        "generator": cfclip_64,
        "clip": clip_vit_b32_file,
        "arcface": directory / "arcface.pt",
        "latents": directory / "train.npy",
        "test": directory / "test.npy",
        "light_latents": directory / "light.npy",
    }
    torch.manual_seed(3)
    arcface = ArcFace()
    with torch.no_grad():  # running statistics other than 0 and 1, so eval-mode BatchNorm is exercised
        for module in arcface.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
    torch.save(arcface.state_dict(), files["arcface"])
    rng = np.random.default_rng(3)
    np.save(files["latents"], rng.standard_normal((6, N_LATENT_64, 512)).astype(np.float32))
    np.save(files["test"], rng.standard_normal((2, N_LATENT_64, 512)).astype(np.float32))
    np.save(files["light_latents"], np.load(files["latents"])[:2])
    return files


def inputs_of(files: dict[str, Path], identity: bool = True) -> TrainInputs:
    return TrainInputs(
        files["generator"], files["clip"], files["latents"], files["test"], files["arcface"] if identity else None
    )


def official_clip_features(clip, images: torch.Tensor) -> torch.Tensor:
    """CF-CLIP's image side: [-1, 1] → [0, 1] → Resize(224, bicubic) → CenterCrop(224) → Normalize → encode, L2-normalised."""
    preprocess = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(224),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return F.normalize(clip.encode_image(preprocess((images + 1) / 2)), dim=-1)


def official_text_features(clip, text: str, count: int) -> torch.Tensor:
    """The first ``count`` of the 79 template prompts' features (OpenAI's ImageNet templates but "many")."""
    templates = [template(text) for template in OPENAI_IMAGENET_TEMPLATES if template("{}") != "a photo of many {}."]
    templates = templates[:count]
    with torch.no_grad():
        return F.normalize(clip.encode_text(open_clip.tokenize(templates)), dim=-1)


def official_nce(clip, edited, source, warps: torch.Generator, augmentations: int, t_src, t_tgt):
    """criteria/nce_loss.py as the spec states it, written out here; ``t_src``, ``t_tgt``: the source and target
    prompts' template features (:func:`official_text_features`)."""
    height, width = edited.shape[-2:]
    corners = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
    augmented = torch.cat(
        [
            perspective(
                edited,
                corners,
                perspective_endpoints(width, height, 0.5, warps),
                transforms.InterpolationMode.BILINEAR,
                fill=[0.0],
            )
            for _ in range(augmentations)
        ]
    )
    source_features = official_clip_features(clip, source).repeat(augmentations, 1)
    query = F.normalize(official_clip_features(clip, augmented) - source_features, dim=-1)
    positive_1 = F.normalize((t_tgt - t_src).mean(0, keepdim=True), dim=-1).expand_as(query)
    positive_2 = F.normalize(t_tgt.mean(0, keepdim=True) - source_features, dim=-1)
    negatives = F.normalize(t_src - source_features[:1], dim=-1)
    queries, positives = torch.cat([query, query]), torch.cat([positive_1, positive_2])
    logits = torch.cat([(queries * positives).sum(1, keepdim=True), queries @ negatives.t()], dim=1) / 0.1
    return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long))


def official_identity(state, edited, source):
    """criteria/id_loss.py: pool to 256 unless already 256, crop [35:223, 32:220], pool to 112, ArcFace; mean of 1 - cos."""
    pool, face_pool = torch.nn.AdaptiveAvgPool2d((256, 256)), torch.nn.AdaptiveAvgPool2d((112, 112))

    def features(x):
        if x.shape[2] != 256:
            x = pool(x)
        return reference.arcface(state, face_pool(x[:, :, 35:223, 32:220]))

    target, got = features(source).detach(), features(edited)
    return sum(1 - got[i].dot(target[i]) for i in range(len(got))) / len(got)


# The loss's 79 template prompts are each a 77-token pass of CLIP's text tower in the reference, most of the test's
# time; the computation is the same for any number of them, so both sides take the first few here
# (tests/cfclip/test_refine.py checks the list itself).
FEW_TEMPLATES = 6


def test_one_step_reproduces_the_official_computation(run_files, monkeypatch):
    templates = refine.nce_templates()[:FEW_TEMPLATES]
    monkeypatch.setattr(refine, "nce_templates", lambda: templates)
    settings = TrainSettings(PROMPT, steps=1, seed=5, augmentations=2)
    trainer = prepare(settings, inputs_of(run_files), "cpu", lambda stage: None)
    trainer.model.double()  # both sides in float64: float32 alone differs by ~4e-5 in the gradients after 20-odd layers
    mappers = {"text_mapper": trainer.model.text_mapper, "mapper": trainer.model.mapper}
    start = {
        name: {key: value.detach().clone() for key, value in module.state_dict().items()}
        for name, module in mappers.items()
    }
    progress = trainer.train_step()
    del trainer  # the mappers keep their gradients; its float64 CLIP, ArcFace and generator (~2 GB) go
    gc.collect()  # before the reference builds its own

    content = torch.load(run_files["generator"], weights_only=True)
    generator_state = {
        key[len("decoder.") :]: value.double()
        for key, value in content["state_dict"].items()
        if key.startswith("decoder.")
    }
    clip = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    clip.load_state_dict(torch.load(run_files["clip"], weights_only=True), strict=False)
    # The template prompts are constants of the loss, computed in float32 as the trainer computes them (in
    # float64 they would take most of this test's time); everything the gradients flow through runs in float64.
    t_src, t_tgt = (official_text_features(clip.eval(), text, FEW_TEMPLATES).double() for text in ("face", PROMPT))
    clip.double()
    arcface_state = {
        key: value.double() if value.is_floating_point() else value
        for key, value in torch.load(run_files["arcface"], weights_only=True).items()
    }
    rows = batch_indices(5, 1, 6, 2)
    w = torch.from_numpy(np.load(run_files["latents"])[rows]).double()
    leaves = {
        name: {key: value.clone().requires_grad_(True) for key, value in state.items()} for name, state in start.items()
    }
    with torch.no_grad():
        text_features = clip.encode_text(open_clip.tokenize([PROMPT]))
        source = reference.generator(generator_state, w)
    text_latents = reference.text_mapper(leaves["text_mapper"], text_features.expand(2, -1), N_LATENT_64)
    w_hat = w + 0.1 * reference.levels_mapper(leaves["mapper"], torch.cat([w, text_latents], dim=2), {})
    edited = reference.generator(generator_state, w_hat)
    expected = {
        "nce": official_nce(clip, edited, source, step_generator(5, 1), 2, t_src, t_tgt),
        "l2": F.mse_loss(w_hat, w),
        "id": official_identity(arcface_state, edited, source),
    }
    expected["loss"] = 0.3 * expected["nce"] + 0.8 * expected["l2"] + 0.2 * expected["id"]
    for name, value in expected.items():
        assert progress.losses[name] == pytest.approx(float(value.detach()), rel=1e-5), name
    assert expected["id"] > 1e-4  # the identity term is not trivially zero

    names = [(name, key) for name in leaves for key in leaves[name]]
    grads = torch.autograd.grad(expected["loss"], [leaves[name][key] for name, key in names])
    for (name, key), grad in zip(names, grads, strict=True):
        parameter = dict(mappers[name].named_parameters())[key]
        assert rel_l2(parameter.grad, grad) <= 1e-5, f"{name}.{key} gradient"
        # Ranger's first step is momentum SGD with bias correction: w - lr * centralised g.
        centred = grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True) if grad.dim() > 1 else grad
        assert rel_l2(parameter.detach() - start[name][key], -0.5 * centred) <= 1e-5, f"{name}.{key} update"


def metric_lines(path: Path) -> list[dict]:
    return [
        {key: value for key, value in json.loads(line).items() if key != "step_s"}
        for line in path.read_text().splitlines()
    ]


def test_a_resumed_run_equals_the_uninterrupted_one(run_files, embedding_file, tmp_path):
    def settings(steps: int) -> TrainSettings:
        # the state a resumption restores is the mappers' and the optimiser's: the loss terms' models add only time
        return TrainSettings(
            PROMPT, steps=steps, batch_size=1, val_every=1, save_every=1, seed=9, nce_lambda=0, id_lambda=0
        )

    inputs = light_inputs(run_files, embedding_file, test_latents=run_files["test"])
    train(settings(2), inputs, tmp_path / "whole")
    train(settings(1), inputs, tmp_path / "parts")
    with (tmp_path / "parts" / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 2, "loss": 0}\n')  # a step logged after the last save, as a killed run leaves it
    train(settings(2), inputs, tmp_path / "parts", resume=True)
    for name in ("iteration_2.pt", "best_model.pt"):
        whole = torch.load(tmp_path / "whole" / name, weights_only=True)["state_dict"]
        parts = torch.load(tmp_path / "parts" / name, weights_only=True)["state_dict"]
        assert list(whole) == list(parts) and all(torch.equal(whole[key], parts[key]) for key in whole), name
    assert metric_lines(tmp_path / "whole" / "metrics.jsonl") == metric_lines(tmp_path / "parts" / "metrics.jsonl")
    start = torch.load(tmp_path / "whole" / "iteration_1.pt", weights_only=True)["state_dict"]
    end = torch.load(tmp_path / "whole" / "iteration_2.pt", weights_only=True)["state_dict"]
    assert not torch.equal(start["mapper.fc.weight"], end["mapper.fc.weight"])


def test_cli_writes_official_checkpoints_that_edit_and_refit_accept(
    cli, run_files, tmp_path, embedding_file, bundle_64_without_clip
):
    out = tmp_path / "run"
    result = cli(
        "train",
        "-t",
        PROMPT,
        "-g",
        run_files["generator"],
        "--text-embedding",  # no CLIP: the CLIP-NCE term is checked above, and on the command line below
        embedding_file,
        "--nce-lambda",
        0,
        "-l",
        run_files["latents"],
        "--test-latents",
        run_files["test"],
        "--identity-weights",
        run_files["arcface"],
        "-o",
        out,
        "--steps",
        2,
        "--batch-size",
        1,
        "--val-every",
        1,
        "--save-every",
        2,
    )
    assert result.exit_code == 0, result.stderr
    assert {"best_model.pt", "iteration_2.pt", "training_state.pt", "metrics.jsonl", "loss.png"} <= {
        p.name for p in out.iterdir()
    }
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_000001.png", "step_000002.png"]
    content = torch.load(out / "iteration_2.pt", weights_only=True)
    assert set(content) == {"state_dict", "opts"}
    keys = list(content["state_dict"])
    assert set(keys) == {key for key, _, _ in synthetic_files.cfclip_keys(64)}
    assert [key.split(".")[0] for key in keys] == sorted(
        (key.split(".")[0] for key in keys), key=["mapper", "decoder", "text_mapper"].index
    )
    official_opts = synthetic_files.manifest("cfclip_manifest_1024.json")["checkpoint_opts"]
    assert set(content["opts"]) == set(official_opts)
    assert content["opts"]["description"] == PROMPT and content["opts"]["stylegan_size"] == 64
    assert content["opts"]["id_lambda"] == 0.2 and content["opts"]["max_steps"] == 2
    generator = torch.load(run_files["generator"], weights_only=True)["state_dict"]
    assert all(
        torch.equal(value, generator[key]) for key, value in content["state_dict"].items() if key.startswith("decoder.")
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 1, 2, 2] and set(metrics[0]) >= {
        "loss",
        "nce",
        "l2",
        "id",
        "lr",
        "step_s",
    }
    assert load_cfclip(out / "best_model.pt").description == PROMPT

    edited = tmp_path / "edited"
    latents = np.load(run_files["test"])
    result = cli(
        "edit",
        "-c",
        out / "best_model.pt",
        "-l",
        run_files["test"],
        "--text-embedding",
        embedding_file,
        "-o",
        edited,
        "--save-latents",
    )
    assert result.exit_code == 0, result.stderr
    expected_w_hat = official_w_hat(out / "best_model.pt", latents, np.load(embedding_file).reshape(1, 512))
    assert rel_l2(np.load(edited / "latents.npy"), expected_w_hat) <= 1e-5
    # refit a bundle of the generator's own checkpoint with the run's: the next edit is the run's official one
    bundle = shutil.copytree(bundle_64_without_clip, tmp_path / "bundle")  # run_files["generator"]'s export
    result = cli("refit", "--bundle", bundle, "-c", out / "iteration_2.pt")
    assert result.exit_code == 0, result.stderr
    refitted = tmp_path / "refitted"
    result = cli(
        "edit",
        "--bundle",
        bundle,
        "-l",
        run_files["test"],
        "--text-embedding",
        embedding_file,
        "-o",
        refitted,
        "--save-latents",
        "--save-raw",
    )
    assert result.exit_code == 0, result.stderr
    features = np.load(embedding_file)[None]
    expected_w_hat, expected_image = official_edit(out / "iteration_2.pt", latents, features)
    assert rel_l2(np.load(refitted / "latents.npy"), expected_w_hat) <= TOLERANCE
    assert rel_l2(np.load(refitted / "images.npy"), expected_image) <= TOLERANCE
    assert rel_l2(official_w_hat(run_files["generator"], latents, features), expected_w_hat) > 1e-2  # it changed


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"-l": "levels18"}, ("latents have 18 levels, the generator needs 10",)),
        ({"-l": "nan"}, ("contain 1 NaN/inf values",)),
        ({"-t": " ".join(["lipstick"] * 80)}, ("is 82 tokens; CLIP reads at most 77",)),
        ({"--precision": "fp16"}, ("--precision fp16 needs --device cuda",)),
        ({"--steps": "0"}, ("--steps must be 1 or more, got 0",)),
        ({"--identity-weights": "clip"}, ("expected the ArcFace IR-SE-50 state dict",)),
    ],
)
def test_cli_refuses_bad_input_before_writing(cli, run_files, tmp_path, change, fragments):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "levels18.npy", rng.standard_normal((4, 18, 512)).astype(np.float32))
    nan = rng.standard_normal((4, N_LATENT_64, 512)).astype(np.float32)
    nan[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    named = {"levels18": tmp_path / "levels18.npy", "nan": tmp_path / "nan.npy", "clip": run_files["clip"]}
    options = {
        "-t": PROMPT,
        "-g": run_files["generator"],
        "--clip-weights": run_files["clip"],
        "-l": run_files["latents"],
        "-o": tmp_path / "run",
        "--steps": "2",
    }
    options.update({key: named.get(value, value) for key, value in change.items()})
    result = cli("train", *[item for pair in options.items() for item in pair])
    assert_refused(result, tmp_path / "run", *fragments)


def test_existing_output_needs_force_and_resume_needs_a_save(cli, run_files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    base = [
        "train",
        "-t",
        PROMPT,
        "-g",
        run_files["generator"],
        "--clip-weights",
        run_files["clip"],
        "-l",
        run_files["latents"],
        "-o",
        out,
        "--steps",
        1,
    ]
    result = cli(*base)
    assert result.exit_code == 2 and "--force" in result.stderr and (out / "notes.txt").read_text() == "mine"
    result = cli(*base, "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.stderr
    (out / "training_state.pt").write_bytes(b"a save")
    result = cli(*base)
    assert result.exit_code == 2
    assert f"{out}: holds a run that can go on (--resume continues it, --force replaces it)" in result.stderr


def test_a_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(run_files, tmp_path):
    settings = TrainSettings(
        PROMPT, steps=4, batch_size=1, val_every=10, save_every=1, seed=1, lr=1e30, nce_lambda=0, id_lambda=0
    )
    with pytest.raises(CfdeployError) as refused:
        train(settings, inputs_of(run_files, identity=False), tmp_path / "run")
    assert str(refused.value) == (
        "step 2: the loss is not finite (loss nan, nce 0, l2 nan, id 0); the weights were not updated; "
        f"the last good checkpoint is {tmp_path / 'run' / 'iteration_1.pt'}"
    )
    saved = torch.load(tmp_path / "run" / "iteration_1.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(value).all() for value in saved.values() if value.is_floating_point())
    assert not (tmp_path / "run" / "iteration_2.pt").exists()


@pytest.fixture(scope="module")
def init_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """CF-CLIP checkpoints to start from (mappers unlike the generator file's) and a prompt's text features."""
    directory = tmp_path_factory.mktemp("init_files")
    files = {
        "init": directory / "init.pt",
        "no_coarse": directory / "no_coarse.pt",
        "levels12": directory / "levels12.pt",
        "embedding": directory / "prompt.npy",
        "bad_embedding": directory / "bad.npy",
    }
    torch.save(synthetic_files.cfclip_checkpoint(64, seed=11), files["init"])
    torch.save(synthetic_files.cfclip_checkpoint(64, seed=12, no_coarse_mapper=True), files["no_coarse"])
    torch.save(synthetic_files.cfclip_checkpoint(128, seed=13), files["levels12"])
    rng = np.random.default_rng(21)
    np.save(files["embedding"], (4 * rng.standard_normal(512)).astype(np.float32))
    np.save(files["bad_embedding"], rng.standard_normal((2, 511)).astype(np.float32))
    return files


def test_one_step_from_a_checkpoint_and_a_text_embedding_is_the_official_update(run_files, init_files):
    """The official loop with checkpoint_path set: mappers from the checkpoint, a fresh Ranger, one update. With
    --text-embedding and --nce-lambda 0 no CLIP file is given and none is loaded."""
    # one code: test_one_step_reproduces_the_official_computation checks a batch of two
    settings = TrainSettings(PROMPT, steps=1, batch_size=1, seed=4, nce_lambda=0)
    inputs = TrainInputs(
        run_files["generator"],
        None,
        run_files["latents"],
        run_files["test"],
        run_files["arcface"],
        init_files["init"],
        init_files["embedding"],
    )
    trainer = prepare(settings, inputs, "cpu", lambda stage: None)
    assert trainer.model.nce is None and not trainer.optimizer.state
    trainer.model.double()
    mappers = {"text_mapper": trainer.model.text_mapper, "mapper": trainer.model.mapper}
    init_state = torch.load(init_files["init"], weights_only=True)["state_dict"]
    start = {
        name: {key[len(name) + 1 :]: value.double() for key, value in init_state.items() if key.startswith(name + ".")}
        for name in mappers
    }
    for name, module in mappers.items():  # the checkpoint's mappers, key for key
        assert set(module.state_dict()) == set(start[name])
        assert all(torch.equal(value, start[name][key]) for key, value in module.state_dict().items()), name
    progress = trainer.train_step()
    del trainer  # the mappers keep their update; its float64 ArcFace and generator go
    gc.collect()  # before the reference builds its own

    content = torch.load(run_files["generator"], weights_only=True)
    generator_state = {
        key[len("decoder.") :]: value.double()
        for key, value in content["state_dict"].items()
        if key.startswith("decoder.")
    }
    arcface_state = {
        key: value.double() if value.is_floating_point() else value
        for key, value in torch.load(run_files["arcface"], weights_only=True).items()
    }
    rows = batch_indices(4, 1, 6, 1)
    w = torch.from_numpy(np.load(run_files["latents"])[rows]).double()
    text_features = torch.from_numpy(np.load(init_files["embedding"])).double().reshape(1, 512)
    leaves = {
        name: {key: value.clone().requires_grad_(True) for key, value in state.items()} for name, state in start.items()
    }
    with torch.no_grad():
        source = reference.generator(generator_state, w)
    text_latents = reference.text_mapper(leaves["text_mapper"], text_features.expand(1, -1), N_LATENT_64)
    w_hat = w + 0.1 * reference.levels_mapper(leaves["mapper"], torch.cat([w, text_latents], dim=2), {})
    edited = reference.generator(generator_state, w_hat)
    expected = {"l2": F.mse_loss(w_hat, w), "id": official_identity(arcface_state, edited, source)}
    expected["loss"] = 0.8 * expected["l2"] + 0.2 * expected["id"]
    for name, value in expected.items():
        assert progress.losses[name] == pytest.approx(float(value.detach()), rel=1e-5), name
    assert progress.losses["nce"] == 0 and expected["id"] > 1e-4

    names = [(name, key) for name in leaves for key in leaves[name]]
    grads = torch.autograd.grad(expected["loss"], [leaves[name][key] for name, key in names])
    for (name, key), grad in zip(names, grads, strict=True):
        parameter = dict(mappers[name].named_parameters())[key]
        centred = grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True) if grad.dim() > 1 else grad
        assert rel_l2(parameter.detach() - start[name][key], -0.5 * centred) <= 1e-5, f"{name}.{key} update"


def test_cli_trains_from_a_checkpoint_with_a_text_embedding(cli, run_files, init_files, tmp_path):
    """Both branches: without CLIP (--nce-lambda 0), and with CLIP for the NCE term only."""
    base = [
        "train",
        "-t",
        PROMPT,
        "-g",
        run_files["generator"],
        "-l",
        run_files["latents"],
        "--test-latents",  # validated on 2 codes, not the first 4 training codes
        run_files["test"],
        "--steps",
        1,
        "--batch-size",
        1,
        "--init-from",
        init_files["init"],
        "--text-embedding",
        init_files["embedding"],
        "--id-lambda",
        0,
    ]
    result = cli(*base, "--nce-lambda", 0, "-o", tmp_path / "no_clip")
    assert result.exit_code == 0, result.stderr
    content = torch.load(tmp_path / "no_clip" / "iteration_1.pt", weights_only=True)
    assert content["opts"]["checkpoint_path"] == str(init_files["init"]) and content["opts"]["nce_lambda"] == 0
    result = cli(*base, "--clip-weights", run_files["clip"], "--seed", 2, "-o", tmp_path / "nce")
    assert result.exit_code == 0, result.stderr
    losses = json.loads((tmp_path / "nce" / "metrics.jsonl").read_text().splitlines()[0])
    assert losses["nce"] > 0 and losses["id"] == 0


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"--init-from": "no_coarse"}, ("no_coarse.pt: --init-from checkpoint was trained with --no-coarse-mapper",)),
        ({"--init-from": "levels12"}, ("mappers are for 12 levels of width 512; the generator has 10 levels",)),
        ({"--text-embedding": "bad_embedding"}, ("bad.npy: expected text features [512] or [N,512], found [2, 511]",)),
        ({"--clip-weights": None}, ("the CLIP-NCE loss needs CLIP: pass --clip-weights",)),
        (
            {"--clip-weights": None, "--text-embedding": None, "--nce-lambda": "0"},
            ("the prompt's text features needs CLIP",),
        ),
    ],
)
def test_cli_refuses_a_checkpoint_or_embedding_that_does_not_fit(
    cli, run_files, init_files, tmp_path, change, fragments
):
    options = {
        "-t": PROMPT,
        "-g": run_files["generator"],
        "--clip-weights": run_files["clip"],
        "-l": run_files["latents"],
        "-o": tmp_path / "run",
        "--steps": "1",
        "--init-from": init_files["init"],
        "--text-embedding": init_files["embedding"],
    }
    options.update({key: init_files.get(value, value) for key, value in change.items()})
    result = cli("train", *[item for key, value in options.items() if value is not None for item in (key, value)])
    assert_refused(result, tmp_path / "run", *fragments)


def test_help_keeps_the_id_lambda_default_and_the_new_options(cli):
    result = cli("train", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "[default: 0.2 with" in text and "--init-from" in text and "--text-embedding" in text


def light_settings(steps: int) -> TrainSettings:
    """Settings without CLIP-NCE or identity, one code a step: a step takes the generator alone, once (what
    resumption is about; the batch and the loss terms are checked against the official update above)."""
    return TrainSettings(
        PROMPT, steps=steps, batch_size=1, save_every=1, val_every=1, seed=6, nce_lambda=0, id_lambda=0
    )


def light_inputs(run_files: dict[str, Path], embedding: Path, **changed: Path) -> TrainInputs:
    """The generator, two codes (validation runs on both) and the prompt's text features: a run that loads no CLIP."""
    files = {"generator": run_files["generator"], "latents": run_files["light_latents"], "text_embedding": embedding}
    return TrainInputs(clip_weights=None, **{**files, **changed})


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory, run_files, embedding_file) -> Path:
    """A run saved after its first step: the state the resumption tests damage, each in its own copy."""
    out = tmp_path_factory.mktemp("saved") / "run"
    train(light_settings(1), light_inputs(run_files, embedding_file), out)
    return out


def copied_run(saved_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


def resume_refused(run: Path, inputs: TrainInputs) -> str:
    """The one-line refusal of resuming ``run``; nothing after step 1 may be written."""
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    with pytest.raises(CfdeployError) as refused:
        train(light_settings(3), inputs, run, resume=True)
    message = str(refused.value)
    del refused  # its traceback holds the trainer's frames, and this frame holds it: a cycle of a GB until collected
    assert "\n" not in message
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    return message


def _reshaped(state: dict) -> None:
    state["mapper"]["fc.weight"] = state["mapper"]["fc.weight"][:, :-1].clone()


def _nan_moment(state: dict) -> None:
    state["optimizer"]["state"][0]["exp_avg"][0] = float("nan")


def _half_counter(state: dict) -> None:
    state["optimizer"]["state"][1]["step"] = 0.5


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda state: state["text_mapper"].popitem(), "damaged training state: 'text_mapper': no "),
        (_reshaped, "damaged training state: 'mapper': 'fc.weight' is torch.float32 [512, 1023], expected"),
        (lambda state: state.update(step=1.5), "damaged training state: 'step' is 1.5, not a step number"),
        (lambda state: state.update(step="1"), "damaged training state: 'step' is '1', not a step number"),
        (lambda state: state.update(step=10**30), f"the run is at step {10**30}, beyond --steps 3"),
        (_nan_moment, "damaged training state: optimiser: parameter 0 exp_avg holds NaN or infinite values"),
        (_half_counter, "damaged training state: optimiser: parameter 1 step must be an integer from 0 to the run's"),
        (
            lambda state: state.update(best_validation=float("inf")),
            "'best_validation' must be a finite number, found inf",
        ),
        (
            lambda state: state["optimizer"]["param_groups"][0].update(lr=float("nan")),
            "optimiser: lr is nan, the run's settings give 0.5",
        ),
    ],
    ids=[
        "missing",
        "shape",
        "float-step",
        "text-step",
        "huge-step",
        "nan-moment",
        "half-counter",
        "inf-best",
        "nan-lr",
    ],
)
def test_a_state_that_does_not_fit_the_model_is_refused_before_any_step(
    run_files, embedding_file, saved_run, tmp_path, damage, message
):
    run = copied_run(saved_run, tmp_path)
    state_path = run / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    damage(state)
    torch.save(state, state_path)
    refusal = resume_refused(run, light_inputs(run_files, embedding_file))
    assert refusal.startswith(f"{state_path}: ") and message in refusal, refusal


def test_a_damaged_training_state_is_refused_naming_what_is_missing(run_files, embedding_file, saved_run, tmp_path):
    run = copied_run(saved_run, tmp_path)
    state_path = run / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["mapper"]
    torch.save(state, state_path)
    assert resume_refused(run, light_inputs(run_files, embedding_file)) == (
        f"{state_path}: damaged training state: no 'mapper'"
    )


def test_resuming_with_other_input_files_is_refused_naming_the_file(
    run_files, embedding_file, init_files, saved_run, tmp_path
):
    run = copied_run(saved_run, tmp_path)
    other_latents = tmp_path / "other.npy"
    np.save(other_latents, np.load(run_files["light_latents"])[::-1].copy())
    refusal = resume_refused(run, light_inputs(run_files, embedding_file, latents=other_latents))
    assert refusal.startswith(f"{other_latents}: not the --latents file the run was trained on (sha256 ")
    refusal = resume_refused(run, light_inputs(run_files, embedding_file, generator=init_files["init"]))
    assert refusal.startswith(f"{init_files['init']}: not the --generator file the run was trained on")
    refusal = resume_refused(run, light_inputs(run_files, embedding_file, test_latents=run_files["test"]))
    assert refusal == f"{run_files['test']}: the run was trained without --test-latents; resume without it"
    train(light_settings(2), light_inputs(run_files, embedding_file), run, resume=True)  # its own files resume
    assert (run / "iteration_2.pt").is_file()


def test_a_metrics_file_cut_mid_line_is_repaired_with_a_warning(run_files, embedding_file, saved_run, tmp_path):
    run = copied_run(saved_run, tmp_path)
    metrics = run / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 2, "loss": 0.12')  # the killed run was writing step 2's record
    warnings: list[str] = []
    train(light_settings(2), light_inputs(run_files, embedding_file), run, resume=True, on_warning=warnings.append)
    assert warnings == [f'{metrics}: dropped line 3, cut short when the run stopped ({{"step": 2, "loss": 0.12)']
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 1, 2, 2] and metrics.read_text().startswith(whole)
    metrics.write_text(whole.replace("\n", "\n{oops\n", 1))
    with pytest.raises(CfdeployError, match=rf"^{re.escape(str(metrics))}: line 2 is not a metrics record"):
        train(light_settings(3), light_inputs(run_files, embedding_file), run, resume=True)
