"""Each building block against an independent computation written here from the paper/spec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cfdeploy.models import reference
from cfdeploy.models.layers import EqualLinear, PixelNorm
from cfdeploy.models.mappers import FullTextMapper, LatentEditor, LevelsMapper, MapperConfig
from cfdeploy.models.stylegan2 import FIRFilter, Generator, GeneratorConfig, ModulatedConv2d, ToRGB
from conftest import rel_l2

torch.manual_seed(0)


def grouped_modulated_conv(x, weight, style, demodulate, upsample, kernel):
    """Per-sample modulated weights run as one grouped conv (groups = batch), the paper's form."""
    batch, in_ch, height, width = x.shape
    _, out_ch, _, k, _ = weight.shape
    w = weight * style.view(batch, 1, in_ch, 1, 1) / math.sqrt(in_ch * k * k)
    if demodulate:
        w = w / torch.sqrt((w**2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
    x = x.reshape(1, batch * in_ch, height, width)
    if upsample:
        w = w.transpose(1, 2).reshape(batch * in_ch, out_ch, k, k)
        y = F.conv_transpose2d(x, w, stride=2, groups=batch).view(batch, out_ch, 2 * height + 1, 2 * width + 1)
        return fir_numpy(y, kernel.numpy(), up=1, pad=(1, 1))
    y = F.conv2d(x, w.reshape(batch * out_ch, in_ch, k, k), padding=k // 2, groups=batch)
    return y.view(batch, out_ch, height, width)


def fir_numpy(x: torch.Tensor, kernel: np.ndarray, up: int, pad: tuple[int, int]) -> torch.Tensor:
    """Zero insertion by ``up``, zero padding, then a true 2-D convolution, in plain numpy loops."""
    arr = x.detach().numpy().astype(np.float64)
    batch, channels, height, width = arr.shape
    upsampled = np.zeros((batch, channels, height * up, width * up))
    upsampled[:, :, ::up, ::up] = arr
    padded = np.pad(upsampled, ((0, 0), (0, 0), pad, pad))
    flipped = kernel[::-1, ::-1]
    kh, kw = kernel.shape
    out_h, out_w = padded.shape[2] - kh + 1, padded.shape[3] - kw + 1
    out = np.zeros((batch, channels, out_h, out_w))
    for i in range(kh):
        for j in range(kw):
            out += flipped[i, j] * padded[:, :, i : i + out_h, j : j + out_w]
    return torch.from_numpy(out).float()


def equal_linear_numpy(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, lr_mul: float) -> np.ndarray:
    """Equalised-lr linear layer on the last axis, then leaky ReLU 0.2 times sqrt(2), in float64."""
    linear = x @ (weight * lr_mul / math.sqrt(weight.shape[1])).T + bias * lr_mul
    return np.where(linear > 0, linear, 0.2 * linear) * math.sqrt(2)


def mapper_numpy(x: np.ndarray, state: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """The official Mapper: PixelNorm over dim 1 (the level axis of ``[B, levels, dim]``), four layers."""
    x = x / np.sqrt((x**2).mean(axis=1, keepdims=True) + 1e-8)
    for layer in range(1, 5):
        x = equal_linear_numpy(
            x, state[f"{prefix}mapping.{layer}.weight"], state[f"{prefix}mapping.{layer}.bias"], 0.01
        )
    return x


def float64_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The module's state dict with every bias drawn at random (they start at 0), as float64 arrays."""
    for name, parameter in module.named_parameters():
        if name.endswith("bias"):
            parameter.data.normal_()
    return {key: value.double().numpy() for key, value in module.state_dict().items()}


def test_fir_kernel_is_outer_1331_over_16():
    taps = np.array([1, 3, 3, 1], dtype=np.float64)
    np.testing.assert_allclose(FIRFilter(gain=4.0).kernel.numpy(), np.outer(taps, taps) / 16, rtol=1e-7)


def test_fir_upsample_equals_zero_insertion_then_fir():
    fir = FIRFilter(gain=4.0)
    x = torch.randn(2, 3, 5, 7)
    expected = fir_numpy(x, fir.kernel.numpy(), up=2, pad=(2, 1))
    got = fir.upsample(x)
    assert got.shape == (2, 3, 10, 14)
    assert rel_l2(got, expected) < 1e-6


def test_fir_upsample_uses_the_stored_kernel_as_a_true_convolution():
    fir = FIRFilter(gain=4.0)
    fir.kernel.copy_(torch.arange(16.0).view(4, 4) / 50)  # asymmetric: flips would show
    x = torch.randn(1, 2, 4, 4)
    assert rel_l2(fir.upsample(x), fir_numpy(x, fir.kernel.numpy(), up=2, pad=(2, 1))) < 1e-6
    assert rel_l2(fir.blur(x), fir_numpy(x, fir.kernel.numpy(), up=1, pad=(1, 1))) < 1e-6


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_equals_grouped_conv_of_modulated_weights(upsample, demodulate):
    conv = ModulatedConv2d(6, 5, 3, style_dim=8, demodulate=demodulate, upsample=upsample)
    conv.modulation.bias.data.normal_()
    x, w = torch.randn(3, 6, 4, 4), torch.randn(3, 8)
    style = F.linear(w, conv.modulation.weight / math.sqrt(8), conv.modulation.bias)
    kernel = conv.blur.kernel if upsample else None
    expected = grouped_modulated_conv(x, conv.weight, style, demodulate, upsample, kernel)
    with torch.no_grad():
        got = conv(x, w)
    assert got.shape == expected.shape
    assert rel_l2(got, expected) < 1e-5


def test_modulated_conv_is_batch_independent():
    conv = ModulatedConv2d(4, 4, 3, style_dim=8, upsample=True)
    x, w = torch.randn(3, 4, 4, 4), torch.randn(3, 8)
    with torch.no_grad():
        together = conv(x, w)
        alone = torch.cat([conv(x[i : i + 1], w[i : i + 1]) for i in range(3)])
    assert rel_l2(together, alone) < 1e-6


def test_to_rgb_adds_bias_and_upsampled_skip_without_demodulation():
    to_rgb = ToRGB(4, style_dim=8)
    to_rgb.bias.data.normal_()
    x, w, skip = torch.randn(2, 4, 8, 8), torch.randn(2, 8), torch.randn(2, 3, 4, 4)
    style = F.linear(w, to_rgb.conv.modulation.weight / math.sqrt(8), to_rgb.conv.modulation.bias)
    rgb = grouped_modulated_conv(x, to_rgb.conv.weight, style, False, False, None)
    expected = rgb + to_rgb.bias + fir_numpy(skip, to_rgb.upsample.kernel.numpy(), up=2, pad=(2, 1))
    with torch.no_grad():
        assert rel_l2(to_rgb(x, w, skip), expected) < 1e-5


def test_pixel_norm_normalises_over_dim_1_even_for_level_axis():
    x = torch.randn(2, 4, 6)
    expected = x.numpy() / np.sqrt((x.numpy() ** 2).mean(axis=1, keepdims=True) + 1e-8)
    np.testing.assert_allclose(PixelNorm()(x).numpy(), expected, rtol=1e-5)
    single_level = torch.tensor([[[0.5, -2.0, 1e-3]]])
    np.testing.assert_allclose(PixelNorm()(single_level).numpy(), [[[1.0, -1.0, 1 / math.sqrt(1.01)]]], rtol=1e-4)


def test_equal_linear_scales_weights_and_adds_bias_on_last_axis():
    layer = EqualLinear(6, 5, lr_mul=0.01, activate=True)
    layer.bias.data.normal_()
    x = torch.randn(2, 3, 6)
    expected = equal_linear_numpy(x.numpy(), layer.weight.detach().numpy(), layer.bias.detach().numpy(), 0.01)
    with torch.no_grad():
        np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_text_mapper_applies_one_mapper_per_level_to_the_same_features():
    text_mapper = FullTextMapper(MapperConfig(n_latent=6, dim=16))
    state = float64_state(text_mapper)
    features = torch.randn(2, 16)
    # Each level's Mapper sees [B, 1, dim]: PixelNorm over that length-1 level axis.
    expected = np.concatenate(
        [mapper_numpy(features.double().numpy()[:, None, :], state, f"mapper_{level}.") for level in range(6)], axis=1
    )
    with torch.no_grad():
        out = text_mapper(features)
    assert out.shape == (2, 6, 16)
    assert rel_l2(out, expected) < 1e-5


def test_levels_mapper_groups_and_disabled_groups_output_zero():
    mapper = LevelsMapper(MapperConfig(n_latent=10, dim=16, no_medium_mapper=True))
    assert not hasattr(mapper, "medium_mapping") and hasattr(mapper, "course_mapping")
    state = float64_state(mapper)
    fused = torch.randn(3, 10, 32)
    x = equal_linear_numpy(fused.double().numpy(), state["fc.weight"], state["fc.bias"], 0.01)
    with torch.no_grad():
        delta = mapper(fused)
    assert torch.equal(delta[:, 4:8], torch.zeros(3, 4, 16))
    assert rel_l2(delta[:, :4], mapper_numpy(x[:, :4], state, "course_mapping.")) < 1e-5
    assert rel_l2(delta[:, 8:], mapper_numpy(x[:, 8:], state, "fine_mapping.")) < 1e-5


def test_latent_editor_is_w_plus_strength_times_tenth_of_delta():
    mapper = LevelsMapper(MapperConfig(n_latent=10, dim=16))
    state = float64_state(mapper)
    editor = LatentEditor(mapper)
    w, t = torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    x = equal_linear_numpy(torch.cat([w, t], -1).double().numpy(), state["fc.weight"], state["fc.bias"], 0.01)
    delta = np.concatenate(
        [
            mapper_numpy(x[:, levels], state, f"{group}.")
            for levels, group in (
                (slice(0, 4), "course_mapping"),
                (slice(4, 8), "medium_mapping"),
                (slice(8, None), "fine_mapping"),
            )
        ],
        axis=1,
    )
    for strength in (0.0, 1.0, 2.5):
        with torch.no_grad():
            got = editor(w, t, torch.tensor([strength]))
        np.testing.assert_allclose(got.numpy(), w.double().numpy() + strength * 0.1 * delta, rtol=1e-5, atol=1e-5)


def test_generator_config_channels_follow_config_f():
    config = GeneratorConfig(1024)
    assert [config.channels(2**r) for r in range(2, 11)] == [512, 512, 512, 512, 512, 256, 128, 64, 32]
    assert config.n_latent == 18 and GeneratorConfig(256).n_latent == 14


def test_generator_is_the_official_synthesis_with_its_stored_noise():
    generator = Generator(GeneratorConfig(32, style_dim=16, max_channels=8)).eval()
    for name, parameter in generator.named_parameters():
        if name.endswith(("noise.weight", "bias")):  # drawn, not their constant initial values: each must show
            parameter.data.normal_()
    latents = torch.randn(2, generator.config.n_latent, 16)
    with torch.no_grad():
        got = generator(latents)
        expected = reference.generator(generator.state_dict(), latents)
    assert got.shape == (2, 3, 32, 32)
    assert rel_l2(got, expected) < 1e-5
