"""The torch backend's ``compile`` option on a CPU: a tiny generator compiled with inductor's default mode (a CPU
has no CUDA graphs for reduce-overhead to replay) gives the eager images, and its compile time is reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfdeploy.backends import BACKENDS, PRESETS
from cfdeploy.backends.torch_backend import COMPILE_MODES, TorchBackend
from cfdeploy.errors import CfdeployError
from cfdeploy.models.mappers import FullTextMapper, LevelsMapper, MapperConfig
from cfdeploy.models.stylegan2 import Generator, GeneratorConfig
from conftest import rel_l2


def tiny_backend(**options) -> TorchBackend:
    torch.manual_seed(0)
    generator = Generator(GeneratorConfig(16, style_dim=16, n_mlp=1, max_channels=8))
    config = MapperConfig(generator.config.n_latent)
    return TorchBackend(generator, FullTextMapper(config), LevelsMapper(config), **options)


def test_compiled_generator_gives_the_eager_images_and_reports_its_compile_time():
    eager, compiled = tiny_backend(), tiny_backend(compile=True)
    assert compiled.compile_mode == COMPILE_MODES["cpu"] == "default" and compiled.compile_s() == 0
    w = np.random.default_rng(1).standard_normal((2, eager.n_latent, eager.style_dim)).astype(np.float32)
    expected = eager.synthesize(w)
    first = compiled.synthesize(w)
    seconds = compiled.compile_s()
    assert seconds > 0
    assert rel_l2(first, expected) <= 1e-5
    assert rel_l2(compiled.synthesize(w[::-1].copy()), expected[::-1]) <= 1e-5
    assert compiled.compile_s() == seconds  # the same batch size compiles once


def test_compile_is_a_torch_option_with_a_cuda_preset_and_refuses_cuda_graphs():
    assert "compile" in BACKENDS["torch"].options
    assert PRESETS["torch-cuda-compile"].options == {"device": "cuda", "precision": "fp16", "compile": True}
    with pytest.raises(CfdeployError, match=r"^--compile replays CUDA graphs itself \(mode reduce-overhead\)"):
        tiny_backend(compile=True, cuda_graphs=True)
