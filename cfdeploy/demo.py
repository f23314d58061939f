"""The embedded default: the real architecture with seeded synthetic weights, edited end to end.

It needs no downloads, so the pipeline and its speed can be tried anywhere; the pictures mean nothing
because the weights are random. The same generator and mappers can be saved in the official file formats,
with a synthetic CLIP, so the export and benchmark paths can be exercised without the official files too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cfdeploy.backends.torch_backend import TorchBackend
from cfdeploy.models.clip_text import ClipText
from cfdeploy.models.mappers import FullTextMapper, LevelsMapper, MapperConfig
from cfdeploy.models.stylegan2 import Generator, GeneratorConfig

DEMO_PROMPT = "green lipstick"


@dataclass
class SyntheticModels:
    generator: Generator
    text_mapper: FullTextMapper
    mapper: LevelsMapper
    clip: ClipText


def synthetic_generator_and_mappers(size: int, seed: int) -> tuple[Generator, FullTextMapper, LevelsMapper]:
    """The generator and both mappers of :func:`synthetic_models`, without building a CLIP."""
    torch.manual_seed(seed)
    generator = Generator(GeneratorConfig(size))
    for name, parameter in generator.named_parameters():
        if name.endswith("noise.weight"):
            parameter.data.fill_(0.1)
    config = MapperConfig(n_latent=generator.config.n_latent)
    return generator.eval(), FullTextMapper(config).eval(), LevelsMapper(config).eval()


def synthetic_models(size: int = 256, seed: int = 0) -> SyntheticModels:
    """A CF-CLIP model set (CLIP text tower, both mappers, generator) with seeded random weights."""
    return SyntheticModels(*synthetic_generator_and_mappers(size, seed), ClipText.random(seed))


def synthetic_backend(size: int = 256, seed: int = 0, device: str = "cpu") -> TorchBackend:
    models = synthetic_models(size, seed)
    return TorchBackend(
        models.generator, models.text_mapper, models.mapper, models.clip, description=DEMO_PROMPT, device=device
    )


def save_synthetic_files(
    directory: Path, size: int = 256, seed: int = 0, with_visual: bool = False
) -> tuple[Path, Path]:
    """Write a CF-CLIP checkpoint and CLIP weights (text tower, or whole) in the official formats.

    CLIP's text tower is :func:`cfdeploy.samples.official.clip_text_state` of the samples' CLIP seed, whatever
    ``seed``: one CLIP text graph, traced once, serves every such file set from the export cache."""
    from cfdeploy.samples import CLIP_SEED
    from cfdeploy.samples.official import clip_text_state

    generator, text_mapper, mapper = synthetic_generator_and_mappers(size, seed)
    state = {
        **{f"mapper.{key}": value for key, value in mapper.state_dict().items()},
        **{f"decoder.{key}": value for key, value in generator.state_dict().items()},
        **{f"text_mapper.{key}": value for key, value in text_mapper.state_dict().items()},
    }
    opts = {
        "stylegan_size": size,
        "mapper_type": "LevelsMapper",
        "no_coarse_mapper": False,
        "no_medium_mapper": False,
        "no_fine_mapper": False,
        "w_space": False,
        "description": DEMO_PROMPT,
        "source_text": "face",
    }
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint, clip_weights = directory / f"synthetic_{size}.pt", directory / "synthetic_clip_text.pt"
    torch.save({"state_dict": state, "opts": opts}, checkpoint)
    clip_state = clip_text_state(CLIP_SEED)
    if with_visual:
        visual = ClipText.random(seed).clip.state_dict().items()
        clip_state.update({key: value for key, value in visual if key.startswith("visual.")})
    torch.save(clip_state, clip_weights)
    return checkpoint, clip_weights
