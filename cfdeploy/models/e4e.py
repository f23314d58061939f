"""The e4e encoder (encoder4editing, Tov et al. 2021): an aligned 256 px face to a W+ code.

An IR-SE-50 backbone (ArcFace's ResNet with squeeze-excitation) gives three feature maps; a feature
pyramid mixes them top-down; one small "map2style" block per W+ level (18 at 1024 px) turns them into
a 512-d vector. The first vector is the code ``w`` every level starts from, the others are per-level
offsets from it (not cumulative), so the code stays close to W, which is what makes it editable. The
mean W (``latent_avg``) is added last.

Module and parameter names follow the official ``Encoder4Editing(50, 'ir_se')``, so its state dict
loads strictly; the arithmetic is the official inference computation, written for export: no
data-dependent control flow, a free batch axis, BatchNorm always on its running statistics.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F

from cfdeploy.errors import CfdeployError
from cfdeploy.models.layers import EqualLinear

IMAGE_SIZE = 256
STYLE_DIM = 512
SE_REDUCTION = 16
MAP2STYLE_SLOPE = 0.01  # nn.LeakyReLU()'s default, not StyleGAN's 0.2
# IR-SE-50: (in channels, out channels, units) per stage; each stage's first unit halves the resolution.
IR_SE_50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))
# W+ levels [0, 3) read the coarsest pyramid level (16 px), [3, 7) the middle one (32 px), the rest the finest (64 px).
COARSE_LEVELS = 3
MIDDLE_LEVELS = 7
PYRAMID_SPATIAL = (16, 32, 64)


class InferenceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics (eval mode), whatever ``train()`` says."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Subsample(nn.Module):
    """Every ``stride``-th pixel: what the official ``MaxPool2d(1, stride)`` shortcut computes."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride]


class SqueezeExcite(nn.Module):
    """Channel gates from the global average: 1x1 conv down by 16, ReLU, 1x1 conv up, sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // SE_REDUCTION, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // SE_REDUCTION, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * gate


class BottleneckIRSE(nn.Module):
    """One IR-SE unit: BN, conv 3x3, PReLU, conv 3x3 (strided), BN, squeeze-excite, plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if in_channels == out_channels:
            self.shortcut_layer: nn.Module = Subsample(stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), InferenceBatchNorm2d(out_channels)
            )
        self.res_layer = nn.Sequential(
            InferenceBatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            InferenceBatchNorm2d(out_channels),
            SqueezeExcite(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class GradualStyleBlock(nn.Module):
    """map2style: strided 3x3 convs with leaky ReLU from ``spatial`` px down to 1 px, then an EqualLinear."""

    def __init__(self, spatial: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(STYLE_DIM, STYLE_DIM, 3, 2, 1), nn.LeakyReLU(MAP2STYLE_SLOPE)]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(STYLE_DIM, STYLE_DIM)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(features).flatten(1))


def upsample_add(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """The pyramid's top-down step: bilinear (corners aligned) to the lateral's size, then add."""
    return F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=True) + lateral


def pyramid_level(level: int) -> int:
    """Which pyramid level (0 coarse, 1 middle, 2 fine) a W+ level's map2style block reads."""
    return 0 if level < COARSE_LEVELS else 1 if level < MIDDLE_LEVELS else 2


class Encoder4Editing(nn.Module):
    """``Encoder4Editing(50, 'ir_se')`` in inference: ``[B, 3, 256, 256]`` in [-1, 1] to codes ``[B, n_styles, 512]``
    (without the mean W)."""

    def __init__(self, n_styles: int) -> None:
        super().__init__()
        if n_styles <= MIDDLE_LEVELS:
            raise ValueError(f"e4e needs more than {MIDDLE_LEVELS} W+ levels, got {n_styles}")
        self.n_styles = n_styles
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), InferenceBatchNorm2d(64), nn.PReLU(64))
        units = [
            BottleneckIRSE(in_channels if unit == 0 else out_channels, out_channels, 2 if unit == 0 else 1)
            for in_channels, out_channels, count in IR_SE_50_STAGES
            for unit in range(count)
        ]
        self.body = nn.Sequential(*units)
        # the three feature taps: where stages 2, 3 and 4 end (after units 6, 20 and 23)
        self.stage_ends = tuple(itertools.accumulate(count for _, _, count in IR_SE_50_STAGES))[1:]
        self.styles = nn.ModuleList(
            GradualStyleBlock(PYRAMID_SPATIAL[pyramid_level(level)]) for level in range(n_styles)
        )
        self.latlayer1 = nn.Conv2d(256, STYLE_DIM, 1)
        self.latlayer2 = nn.Conv2d(128, STYLE_DIM, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c1_end, c2_end, _ = self.stage_ends
        x = self.input_layer(images)
        c1 = self.body[:c1_end](x)  # 128 channels, 64 px
        c2 = self.body[c1_end:c2_end](c1)  # 256 channels, 32 px
        c3 = self.body[c2_end:](c2)  # 512 channels, 16 px
        p2 = upsample_add(c3, self.latlayer1(c2))
        p1 = upsample_add(p2, self.latlayer2(c1))
        pyramid = (c3, p2, p1)
        w = self.styles[0](c3).unsqueeze(1)  # the code every level starts from
        offsets = [self.styles[level](pyramid[pyramid_level(level)]) for level in range(1, self.n_styles)]
        return torch.cat([w, w + torch.stack(offsets, dim=1)], dim=1)


class E4EEncoder(nn.Module):
    """Aligned faces ``[B, 3, 256, 256]`` in [-1, 1] to W+ ``[B, n_latent, 512]``: e4e's codes plus the mean W."""

    latent_avg: torch.Tensor

    def __init__(self, encoder: Encoder4Editing, latent_avg: torch.Tensor) -> None:
        super().__init__()
        if tuple(latent_avg.shape) != (encoder.n_styles, STYLE_DIM):
            raise ValueError(f"latent_avg must be [{encoder.n_styles}, {STYLE_DIM}], got {list(latent_avg.shape)}")
        self.encoder = encoder
        self.register_buffer("latent_avg", latent_avg.float().clone())

    @property
    def n_latent(self) -> int:
        return self.encoder.n_styles

    @property
    def style_dim(self) -> int:
        return STYLE_DIM

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise CfdeployError(
                f"the e4e encoder takes images [batch, 3, {IMAGE_SIZE}, {IMAGE_SIZE}], got {list(images.shape)} "
                f"(resize aligned faces to {IMAGE_SIZE}x{IMAGE_SIZE} first)"
            )
        return self.encoder(images) + self.latent_avg
