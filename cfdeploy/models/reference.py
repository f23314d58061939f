"""The official formulation of the CF-CLIP forward pass and of the e4e encoder, straight off a state dict.

This is what the research code computes and how: per-sample weight modulation with a grouped
convolution (``groups = batch``), upfirdn2d by zero insertion and padding through 6-D views, and the
mappers' fused leaky ReLU with its 3-D special case; e4e's body walked unit by unit with its taps, its
first code repeated and the offsets added in place row by row. It is deliberately independent of
:mod:`cfdeploy.models` (it shares no code with it), so it serves as the baseline users migrate from
(benchmarks) and as the parity reference the deployable models are checked against.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch.nn import functional as F

State = Mapping[str, torch.Tensor]


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The official op: bias along the last axis for 3-D inputs, along dim 1 otherwise."""
    if x.ndim == 3:
        x = x + bias.view(1, 1, -1)
    else:
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, 0.2) * math.sqrt(2)


def equal_linear(x: torch.Tensor, state: State, prefix: str, lr_mul: float, activate: bool) -> torch.Tensor:
    weight, bias = state[prefix + "weight"], state[prefix + "bias"]
    scale = lr_mul / math.sqrt(weight.shape[1])
    if activate:
        return fused_leaky_relu(F.linear(x, weight * scale), bias * lr_mul)
    return F.linear(x, weight * scale, bias * lr_mul)


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int, pad: tuple[int, int]) -> torch.Tensor:
    """Zero-insertion upsampling, padding, and true convolution with ``kernel`` (no downsampling)."""
    batch, channels, height, width = x.shape
    x = x.reshape(batch * channels, height, 1, width, 1, 1)
    x = F.pad(x, [0, 0, 0, up - 1, 0, 0, 0, up - 1])
    x = x.reshape(batch * channels, 1, height * up, width * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    x = F.conv2d(x, torch.flip(kernel, [0, 1]).view(1, 1, *kernel.shape))
    return x.reshape(batch, channels, x.shape[2], x.shape[3])


def modulated_conv(
    x: torch.Tensor, w: torch.Tensor, state: State, prefix: str, demodulate: bool, upsample: bool
) -> torch.Tensor:
    batch, in_channels, height, width = x.shape
    weight = state[prefix + "weight"]
    _, out_channels, _, kernel_size, _ = weight.shape
    style = equal_linear(w, state, prefix + "modulation.", 1.0, activate=False).view(batch, 1, in_channels, 1, 1)
    weight = weight * (1 / math.sqrt(in_channels * kernel_size**2)) * style
    if demodulate:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(batch, out_channels, 1, 1, 1)
    x = x.reshape(1, batch * in_channels, height, width)
    if upsample:
        weight = weight.transpose(1, 2).reshape(batch * in_channels, out_channels, kernel_size, kernel_size)
        out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
        out = out.view(batch, out_channels, out.shape[2], out.shape[3])
        return upfirdn2d(out, state[prefix + "blur.kernel"], up=1, pad=(1, 1))
    weight = weight.view(batch * out_channels, in_channels, kernel_size, kernel_size)
    out = F.conv2d(x, weight, padding=kernel_size // 2, groups=batch)
    return out.view(batch, out_channels, height, width)


def styled_conv(x, w, noise, state: State, prefix: str, upsample: bool) -> torch.Tensor:
    out = modulated_conv(x, w, state, prefix + "conv.", demodulate=True, upsample=upsample)
    out = out + state[prefix + "noise.weight"] * noise
    return fused_leaky_relu(out, state[prefix + "activate.bias"])


def to_rgb(x, w, skip, state: State, prefix: str) -> torch.Tensor:
    out = modulated_conv(x, w, state, prefix + "conv.", demodulate=False, upsample=False) + state[prefix + "bias"]
    if skip is not None:
        out = out + upfirdn2d(skip, state[prefix + "upsample.kernel"], up=2, pad=(2, 1))
    return out


def generator(state: State, latents: torch.Tensor) -> torch.Tensor:
    """Rosinality ``Generator([latents], input_is_latent=True, randomize_noise=False)``."""
    n_blocks = sum(1 for key in state if re.fullmatch(r"to_rgbs\.\d+\.bias", key))
    noises = [state[f"noises.noise_{index}"] for index in range(2 * n_blocks + 1)]
    out = state["input.input"].repeat(latents.shape[0], 1, 1, 1)
    out = styled_conv(out, latents[:, 0], noises[0], state, "conv1.", upsample=False)
    skip = to_rgb(out, latents[:, 1], None, state, "to_rgb1.")
    level = 1
    for block in range(n_blocks):
        out = styled_conv(out, latents[:, level], noises[level], state, f"convs.{2 * block}.", upsample=True)
        out = styled_conv(
            out, latents[:, level + 1], noises[level + 1], state, f"convs.{2 * block + 1}.", upsample=False
        )
        skip = to_rgb(out, latents[:, level + 2], skip, state, f"to_rgbs.{block}.")
        level += 2
    return skip


def mapping(state: State, z: torch.Tensor) -> torch.Tensor:
    """The generator's z → w MLP (``style.1`` … ``style.8``)."""
    x = pixel_norm(z)
    n_mlp = sum(1 for key in state if re.fullmatch(r"style\.\d+\.weight", key))
    for layer in range(1, n_mlp + 1):
        x = equal_linear(x, state, f"style.{layer}.", 0.01, activate=True)
    return x


def mapper(x: torch.Tensor, state: State, prefix: str) -> torch.Tensor:
    x = pixel_norm(x)
    for layer in range(1, 5):
        x = equal_linear(x, state, f"{prefix}mapping.{layer}.", 0.01, activate=True)
    return x


def text_mapper(state: State, text_features: torch.Tensor, n_latent: int) -> torch.Tensor:
    """FullTextMapper on the prompt features repeated to 18 levels; mapper ``c`` reads level ``c``."""
    repeated = text_features.unsqueeze(1).repeat(1, 18, 1)
    return torch.cat([mapper(repeated[:, [c], :], state, f"mapper_{c}.") for c in range(n_latent)], dim=1)


def levels_mapper(state: State, x: torch.Tensor, opts: Mapping[str, object]) -> torch.Tensor:
    x = equal_linear(x, state, "fc.", 0.01, activate=True)
    parts = []
    for levels, attribute, flag in (
        (slice(0, 4), "course_mapping.", "no_coarse_mapper"),
        (slice(4, 8), "medium_mapping.", "no_medium_mapper"),
        (slice(8, None), "fine_mapping.", "no_fine_mapper"),
    ):
        part = x[:, levels, :]
        parts.append(torch.zeros_like(part) if opts.get(flag) else mapper(part, state, attribute))
    return torch.cat(parts, dim=1)


def _sub(state: State, prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def cfclip_edit(
    state: State, opts: Mapping[str, object], w: torch.Tensor, text_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official run: ``w_hat = w + 0.1 * mapper(cat(w, text_mapper(t)))`` and its image."""
    n_latent = w.shape[1]
    text_features = text_features.expand(w.shape[0], -1)
    text_latents = text_mapper(_sub(state, "text_mapper."), text_features, n_latent)
    delta = levels_mapper(_sub(state, "mapper."), torch.cat([w, text_latents], dim=2), opts)
    w_hat = w + 0.1 * delta
    return w_hat, generator(_sub(state, "decoder."), w_hat)


# encoder4editing's helpers.get_blocks(50): (in channels, depth, units); the first unit of each block has stride 2.
E4E_BLOCKS = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))


# (in channels, depth, stride) of each of IR-SE-50's 24 units, in order.
IR_SE_50_UNITS = [
    (in_channel if unit == 0 else depth, depth, 2 if unit == 0 else 1)
    for in_channel, depth, count in E4E_BLOCKS
    for unit in range(count)
]


def _ir_se_input_layer(images: torch.Tensor, state: State) -> torch.Tensor:
    """``input_layer``: conv 3x3 (no bias), BatchNorm, PReLU."""
    x = F.conv2d(images, state["input_layer.0.weight"], stride=1, padding=1)
    return F.prelu(_batch_norm(x, state, "input_layer.1."), state["input_layer.2.weight"])


def _batch_norm(x: torch.Tensor, state: State, prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        state[prefix + "running_mean"],
        state[prefix + "running_var"],
        state[prefix + "weight"],
        state[prefix + "bias"],
        training=False,
        momentum=0.1,
        eps=1e-5,
    )


def _ir_se_unit(x: torch.Tensor, state: State, prefix: str, in_channel: int, depth: int, stride: int) -> torch.Tensor:
    """``bottleneck_IR_SE``: shortcut (MaxPool2d(1, stride) or conv 1x1 + BN) plus the residual with SEModule."""
    if in_channel == depth:
        shortcut = F.max_pool2d(x, kernel_size=1, stride=stride)
    else:
        shortcut = _batch_norm(
            F.conv2d(x, state[prefix + "shortcut_layer.0.weight"], stride=stride), state, prefix + "shortcut_layer.1."
        )
    res = _batch_norm(x, state, prefix + "res_layer.0.")
    res = F.conv2d(res, state[prefix + "res_layer.1.weight"], stride=1, padding=1)
    res = F.prelu(res, state[prefix + "res_layer.2.weight"])
    res = F.conv2d(res, state[prefix + "res_layer.3.weight"], stride=stride, padding=1)
    res = _batch_norm(res, state, prefix + "res_layer.4.")
    gate = F.adaptive_avg_pool2d(res, 1)
    gate = F.relu(F.conv2d(gate, state[prefix + "res_layer.5.fc1.weight"]))
    gate = torch.sigmoid(F.conv2d(gate, state[prefix + "res_layer.5.fc2.weight"]))
    return res * gate + shortcut


def _gradual_style_block(x: torch.Tensor, state: State, prefix: str) -> torch.Tensor:
    """``GradualStyleBlock``: (conv 3x3 stride 2, LeakyReLU()) per ``convs.N``, ``view(-1, 512)``, EqualLinear."""
    index = 0
    while f"{prefix}convs.{index}.weight" in state:
        x = F.conv2d(
            x, state[f"{prefix}convs.{index}.weight"], state[f"{prefix}convs.{index}.bias"], stride=2, padding=1
        )
        x = F.leaky_relu(x)
        index += 2
    return equal_linear(x.view(-1, 512), state, prefix + "linear.", 1.0, activate=False)


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _, _, height, width = y.size()
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True) + y


def e4e(encoder: State, images: torch.Tensor, latent_avg: torch.Tensor) -> torch.Tensor:
    """``Encoder4Editing(50, 'ir_se')`` at ``ProgressiveStage.Inference`` on ``images`` plus
    ``latent_avg.repeat(B, 1, 1)``, from the encoder's state dict (a checkpoint's ``encoder.*`` keys without
    the prefix, as the official ``load_weights`` hands them over)."""
    style_count = sum(1 for key in encoder if re.fullmatch(r"styles\.\d+\.linear\.weight", key))
    coarse_ind, middle_ind = 3, 7
    x = _ir_se_input_layer(images, encoder)
    for i, (in_channel, depth, stride) in enumerate(IR_SE_50_UNITS):
        x = _ir_se_unit(x, encoder, f"body.{i}.", in_channel, depth, stride)
        if i == 6:
            c1 = x
        elif i == 20:
            c2 = x
        elif i == 23:
            c3 = x
    w0 = _gradual_style_block(c3, encoder, "styles.0.")
    w = w0.repeat(style_count, 1, 1).permute(1, 0, 2)
    features = c3
    for i in range(1, style_count):
        if i == coarse_ind:
            p2 = _upsample_add(c3, F.conv2d(c2, encoder["latlayer1.weight"], encoder["latlayer1.bias"]))
            features = p2
        elif i == middle_ind:
            p1 = _upsample_add(p2, F.conv2d(c1, encoder["latlayer2.weight"], encoder["latlayer2.bias"]))
            features = p1
        w[:, i] += _gradual_style_block(features, encoder, f"styles.{i}.")
    return w + latent_avg.repeat(w.shape[0], 1, 1)


def arcface(state: State, faces: torch.Tensor) -> torch.Tensor:
    """ArcFace ``Backbone(112, 50, drop_ratio=0.6, mode='ir_se')`` in eval mode on ``faces`` [B, 3, 112, 112]:
    input layer, the IR-SE-50 body, then BN, (eval) dropout, flatten, linear, BN1d and ``l2_norm``."""
    x = _ir_se_input_layer(faces, state)
    for i, (in_channel, depth, stride) in enumerate(IR_SE_50_UNITS):
        x = _ir_se_unit(x, state, f"body.{i}.", in_channel, depth, stride)
    x = _batch_norm(x, state, "output_layer.0.")
    x = F.linear(x.reshape(x.shape[0], -1), state["output_layer.3.weight"], state["output_layer.3.bias"])
    x = _batch_norm(x, state, "output_layer.4.")
    return torch.div(x, torch.norm(x, 2, 1, True))
