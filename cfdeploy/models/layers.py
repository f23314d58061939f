"""Layers shared by the StyleGAN2 generator and the CF-CLIP mappers.

Parameter names and stored shapes follow rosinality/stylegan2-pytorch, so official state dicts load
as they are; the arithmetic is written for export (no custom ops, no batch-dependent reshapes).
"""

from __future__ import annotations

import math
from copy import deepcopy

import torch
from torch import nn
from torch.nn import functional as F

LEAKY_SLOPE = 0.2
ACTIVATION_GAIN = math.sqrt(2.0)


def scaled_leaky_relu(x: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's activation: leaky ReLU 0.2, times sqrt(2) to keep the signal's variance."""
    return F.leaky_relu(x, LEAKY_SLOPE) * ACTIVATION_GAIN


class PixelNorm(nn.Module):
    """Normalise by the RMS over dim 1, whatever dim 1 means for the input.

    For 2-D inputs that is the channel axis; on the mappers' 3-D ``[B, levels, 512]`` inputs it is the
    *level* axis. The official code does this and its trained weights depend on it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weights stored unscaled, scaled at run time.

    Effective weight ``weight * lr_mul / sqrt(in)``, effective bias ``bias * lr_mul``; the bias is
    added along the last axis (as the official mappers do for 3-D inputs).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        lr_mul: float = 1.0,
        bias_init: float = 0.0,
        activate: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return scaled_leaky_relu(out) if self.activate else out


class ScaledLinear(nn.Module):
    """An :class:`EqualLinear` with its run-time scales applied once: ``x @ weight_t + bias``, activated.

    ``weight_t`` is the effective weight transposed (``(weight * scale).T``), ``bias`` the effective bias
    (``bias * lr_mul``): the same floats the scaled layer computes. Exported graphs of refittable networks
    use it, so each layer's weights are graph initializers of their own, named by module path, that feed
    the MatMul and Add directly, whatever their values.
    """

    def __init__(self, layer: EqualLinear) -> None:
        super().__init__()
        with torch.no_grad():
            self.weight_t = nn.Parameter((layer.weight * layer.scale).t().contiguous(), requires_grad=False)
            self.bias = nn.Parameter(layer.bias * layer.lr_mul, requires_grad=False)
        self.activate = layer.activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.weight_t) + self.bias
        return scaled_leaky_relu(out) if self.activate else out


def with_scaled_linears(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every :class:`EqualLinear` replaced by its :class:`ScaledLinear`."""
    copy = deepcopy(module)
    for name, child in list(copy.named_modules()):
        if isinstance(child, EqualLinear):
            parent_name, _, attribute = name.rpartition(".")
            setattr(copy.get_submodule(parent_name), attribute, ScaledLinear(child))
    return copy


class BiasedActivation(nn.Module):
    """Per-channel bias on an NCHW tensor, then the scaled leaky ReLU (``activate.bias``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_leaky_relu(x + self.bias.view(1, -1, 1, 1))
