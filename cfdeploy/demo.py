"""The embedded default: the real architecture with seeded synthetic weights, edited end to end.

It needs no downloads, so the pipeline and its speed can be tried anywhere; the pictures mean nothing
because the weights are random.
"""

from __future__ import annotations

import torch

from cfdeploy.backends.torch_backend import TorchBackend
from cfdeploy.models.clip_text import ClipText
from cfdeploy.models.mappers import FullTextMapper, LevelsMapper, MapperConfig
from cfdeploy.models.stylegan2 import Generator, GeneratorConfig

DEMO_PROMPT = "green lipstick"


def synthetic_backend(size: int = 256, seed: int = 0, device: str = "cpu") -> TorchBackend:
    """A CF-CLIP model set (CLIP text tower, both mappers, generator) with seeded random weights."""
    torch.manual_seed(seed)
    generator = Generator(GeneratorConfig(size))
    for name, parameter in generator.named_parameters():
        if name.endswith("noise.weight"):
            parameter.data.fill_(0.1)
    config = MapperConfig(n_latent=generator.config.n_latent)
    text_mapper, mapper = FullTextMapper(config), LevelsMapper(config)
    clip = ClipText.random(seed)
    return TorchBackend(generator, text_mapper, mapper, clip, description=DEMO_PROMPT, device=device)
