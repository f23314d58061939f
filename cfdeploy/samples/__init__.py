"""Sample files for every journey of the README, written by ``cfdeploy samples -o DIR``: seeded synthetic weights in
the official formats (:mod:`cfdeploy.samples.official`, the maker the tests use too), a photo set with its landmarks,
W+ codes and their shards, a tiny Stable Diffusion folder and an image for DAC, and ``COMMANDS.md``: one ready-to-run
command line per journey, using them.

The weights are random, so the pictures mean nothing; the files load, export, train, serve and edit exactly as the
official ones do, so every command can be tried before any download.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZES = (64, 256, 1024)
GROUPS = {
    "cfclip": "CF-CLIP: two checkpoints of one generator, CLIP ViT-B/32, W+ codes and their shards",
    "photos": "your own photos: an e4e encoder, ArcFace weights, two photos and their landmarks",
    "dac": "DAC: a tiny random Stable Diffusion folder and an image to edit",
}
PROMPT, OTHER_PROMPT = "green lipstick", "blue dog"
DAC_SOURCE_TEXT, DAC_TEXT = "A cat.", "A cat wearing a wool cap."
DAC_RESOLUTION = 32  # the tiny model's image size: 16 x 16 latents, a step in milliseconds on a CPU
CHECKPOINT_SEED, OTHER_MAPPER_SEED = 1, 5
CLIP_SEED, E4E_SEED, ARCFACE_SEED, PHOTO_SEED, LATENT_SEED = 3, 13, 11, 3, 4
TRAINING_CODES, SHARDS, CODES_PER_SHARD = 8, 3, 4
COMMANDS = "COMMANDS.md"


@dataclass(frozen=True)
class Sample:
    """One file (or folder) of the set: where it goes in DIR, its group, what it stands for, how it is written."""

    name: str
    group: str
    what: str
    write: Callable[[Path], None]


def n_latent(size: int) -> int:
    return 2 * int(np.log2(size)) - 2


def _torch_save(content_of: Callable[[], object]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import torch

        torch.save(content_of(), path)

    return write


def _cfclip(size: int, mapper_seed: int, prompt: str) -> Callable[[Path], None]:
    from cfdeploy.samples import official

    return _torch_save(
        lambda: official.checkpoint_with_generator_of(CHECKPOINT_SEED, mapper_seed, size, description=prompt)
    )


def _clip(path: Path) -> None:
    """CLIP ViT-B/32 with both towers (training and refinement read the image tower), an open_clip state dict in
    float16 like OpenAI's weights; ``ViT-B-32.pt`` itself, TorchScript, loads the same way but five times slower."""
    import torch

    from cfdeploy.models.clip_text import ClipText

    torch.save({key: value.half() for key, value in ClipText.random(CLIP_SEED).clip.state_dict().items()}, path)


def _e4e(size: int) -> Callable[[Path], None]:
    """e4e for the checkpoints' generator (the official file's generator is the one its codes belong to)."""
    from cfdeploy.samples import official

    def content() -> dict:
        encoder = official.e4e_checkpoint(seed=E4E_SEED, size=size)
        generator = official.cfclip_checkpoint(size, seed=CHECKPOINT_SEED)["state_dict"]
        encoder["state_dict"].update({key: value for key, value in generator.items() if key.startswith("decoder.")})
        return encoder

    return _torch_save(content)


def _codes(count: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, n_latent(size), 512)).astype(np.float32)


def _shards(size: int) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        folder.mkdir()
        for index in range(SHARDS):
            np.save(folder / f"part-{index:03d}.npy", _codes(CODES_PER_SHARD, size, LATENT_SEED + 1 + index))

    return write


def _photos(folder: Path) -> None:
    from cfdeploy.samples import official

    official.write_photos(folder, folder.parent / "points.json", seed=PHOTO_SEED)


def dac_model_writer() -> Callable[..., Path]:
    """:func:`cfdeploy.dac.synthetic.write_random_base_model`; a one-line error naming the extra where diffusers or
    transformers is missing (asked before anything is written)."""
    from cfdeploy.errors import missing_extra

    try:
        import diffusers  # noqa: F401  (the folder is written with diffusers' and transformers' classes)
        import transformers  # noqa: F401
    except ModuleNotFoundError as missing:
        raise missing_extra(missing.name or "diffusers", "the dac samples (leave them out with --only)") from None
    from cfdeploy.dac.synthetic import write_random_base_model

    return write_random_base_model


def _tiny_sd(folder: Path) -> None:
    dac_model_writer()(folder, "tiny")


def _dac_image(path: Path) -> None:
    from cfdeploy.samples import official

    official.dac_image(seed=0).save(path)


def sample_files(size: int) -> list[Sample]:
    """The set at ``size`` px (the CF-CLIP checkpoints, the e4e generator and the codes), in the order written."""
    from cfdeploy.samples import official

    arcface = _torch_save(lambda: official.arcface_state(ARCFACE_SEED))
    return [
        Sample(
            "green_lipstick.pt",
            "cfclip",
            f"CF-CLIP checkpoint, {size} px, {PROMPT!r}",
            _cfclip(size, CHECKPOINT_SEED, PROMPT),
        ),
        Sample(
            "blue_dog.pt",
            "cfclip",
            f"CF-CLIP checkpoint, {OTHER_PROMPT!r}, same generator (for refit)",
            _cfclip(size, OTHER_MAPPER_SEED, OTHER_PROMPT),
        ),
        Sample("clip_vit_b32.pt", "cfclip", "CLIP ViT-B/32, text and image towers (float16 state dict)", _clip),
        Sample(
            "latents.npy",
            "cfclip",
            f"W+ codes [{TRAINING_CODES},{n_latent(size)},512]",
            lambda path: np.save(path, _codes(TRAINING_CODES, size, LATENT_SEED)),
        ),
        Sample("shards", "cfclip", f"W+ codes in {SHARDS} shards of {CODES_PER_SHARD} (for batch)", _shards(size)),
        Sample("e4e_ffhq_encode.pt", "photos", f"e4e encoder for the {size} px generator", _e4e(size)),
        Sample("model_ir_se50.pth", "photos", "ArcFace IR-SE-50 (identity scores and loss)", arcface),
        Sample("photos", "photos", "two photos, a.jpg and b.png, one face each; points.json: their landmarks", _photos),
        Sample("tiny-sd", "dac", "a tiny random Stable Diffusion folder (diffusers layout)", _tiny_sd),
        Sample("cat.png", "dac", "an image for DAC to edit", _dac_image),
    ]


def write_samples(
    directory: Path,
    size: int = 256,
    groups: tuple[str, ...] = tuple(GROUPS),
    *,
    final: Path | None = None,
    on_start: Callable[[Sample], None] = lambda sample: None,
    on_file: Callable[[Sample, Path, float], None] = lambda sample, path, seconds: None,
) -> list[tuple[str, list[str]]]:
    """Write the samples of ``groups`` into ``directory`` (an empty folder) and ``COMMANDS.md``, whose commands name
    ``final`` (where the folder will be, if it is being staged); returns the journeys' commands."""
    if "dac" in groups:
        dac_model_writer()
    for sample in sample_files(size):
        if sample.group in groups:
            on_start(sample)
            started = time.perf_counter()
            sample.write(directory / sample.name)
            on_file(sample, directory / sample.name, time.perf_counter() - started)
    commands = sample_commands(final or directory, groups)
    (directory / COMMANDS).write_text(commands_markdown(final or directory, size, groups, commands))
    return commands


def sample_commands(directory: Path, groups: tuple[str, ...] = tuple(GROUPS)) -> list[tuple[str, list[str]]]:
    """``(journey, command lines)`` for each README journey that ``groups`` has the files for, in the README's order.
    Every output goes under ``DIR/out``."""

    def at(*parts: str) -> str:
        return shlex.quote(str(directory.joinpath(*parts)))

    def to(*parts: str) -> str:
        return at("out", *parts)

    prompt = shlex.quote(PROMPT)
    checkpoint, clip, latents = at("green_lipstick.pt"), at("clip_vit_b32.pt"), at("latents.npy")
    e4e, arcface, photos, points = at("e4e_ffhq_encode.pt"), at("model_ir_se50.pth"), at("photos"), at("points.json")
    bundle, other_bundle = to("engines", "green_lipstick"), to("engines", "blue_dog")
    photo_files = f" --encoder {e4e} --identity-weights {arcface}" if "photos" in groups else ""
    journeys: list[tuple[str, list[str]]] = []
    if "cfclip" in groups:
        journeys += [
            (
                "1. Edit with the official files",
                [
                    f"cfdeploy inspect {checkpoint}",
                    f"cfdeploy edit -c {checkpoint} --clip-weights {clip} --text {prompt} --latents {latents} "
                    f"--side-by-side --out {to('edits')}",
                ],
            ),
            (
                "2. Export once, deploy anywhere; refit a copy of the bundle to another prompt",
                [
                    f"cfdeploy export -c {checkpoint} --clip-weights {clip} --text {prompt}{photo_files} --out {bundle}",
                    f"cfdeploy edit --bundle {bundle} --text {prompt} --latents {latents} --out {to('edits-bundle')}",
                    f"cp -r {bundle} {other_bundle}",
                    f"cfdeploy refit --bundle {other_bundle} -c {at('blue_dog.pt')}",
                ],
            ),
        ]
    if "cfclip" in groups and "photos" in groups:
        journeys.append(
            (
                "3. Your own photos",
                [
                    f"cfdeploy invert {photos} --encoder {e4e} --landmarks {points} --out {to('codes')}",
                    f"cfdeploy edit -c {checkpoint} --clip-weights {clip} --encoder {e4e} --images {photos} "
                    f"--landmarks {points} --text {prompt} --identity-weights {arcface} --save-mask "
                    f"--out {to('edits-photos')}",
                    f"cfdeploy edit --bundle {bundle} --images {photos} --landmarks {points} --text {prompt} "
                    f"--out {to('edits-photos-bundle')}",
                ],
            )
        )
    if "cfclip" in groups:
        request = json.dumps({"bundle": "green_lipstick", "prompt": PROMPT, "seed": 1})
        journeys += [
            (
                "4. Serve over HTTP (until Ctrl-C; curl from another terminal), or edit a dataset",
                [
                    f"cfdeploy serve --bundle {bundle} --bundle {other_bundle} --port 8000",
                    "curl -s localhost:8000/v1/edits -H 'Accept: image/png' -o edit.png -d " + shlex.quote(request),
                    f"cfdeploy batch --bundle {bundle} --latents {at('shards', '*.npy')} --text {prompt} "
                    f"--out {to('edits-batch')} --workers 2",
                ],
            ),
            (
                "Train a mapper for your own prompt (2 steps here; the official run takes 50,000)",
                [
                    f"cfdeploy train -t {prompt} -g {checkpoint} --clip-weights {clip} -l {latents}"
                    + (f" --identity-weights {arcface}" if "photos" in groups else "")
                    + f" --steps 2 --val-every 2 --save-every 2 -o {to('runs', 'green_lipstick')}"
                ],
            ),
        ]
    if "dac" in groups:
        run, dac_bundle = to("dac", "cat_cap"), to("dac", "bundle")
        journeys.append(
            (
                f"DAC: the tiny path ({DAC_RESOLUTION} px, 10 + 10 steps, rank 4: under a minute on a CPU)",
                [
                    f"cfdeploy dac abduct -i {at('cat.png')} --source-text {shlex.quote(DAC_SOURCE_TEXT)} "
                    f"-t {shlex.quote(DAC_TEXT)} --base-model {at('tiny-sd')} --resolution {DAC_RESOLUTION} "
                    f"--unet-steps 10 --text-steps 10 --rank 4 --save-every 5 -o {run}",
                    f"cfdeploy dac edit --run {run} --steps 10 --num 2 --out {to('dac', 'edits')}",
                    f"cfdeploy dac export --run {run} --out {dac_bundle}",
                    f"cfdeploy dac edit --bundle {dac_bundle} --steps 10 --num 2 --out {to('dac', 'edits-bundle')}",
                ],
            )
        )
    return journeys


def commands_markdown(
    directory: Path, size: int, groups: tuple[str, ...], journeys: list[tuple[str, list[str]]]
) -> str:
    """``COMMANDS.md``: what each file is, then one shell block per journey."""
    text = [
        f"# cfdeploy samples ({size} px)",
        "",
        "Seeded synthetic weights in the official formats: the pictures mean nothing, the pipelines are real.",
        f"The commands run from any folder; every output goes under `{directory / 'out'}`.",
        "",
        *(f"- `{sample.name}`: {sample.what}" for sample in sample_files(size) if sample.group in groups),
    ]
    for journey, commands in journeys:
        text += ["", f"## {journey}", "", "```bash", *commands, "```"]
    return "\n".join(text) + "\n"
