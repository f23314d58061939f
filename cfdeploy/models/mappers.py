"""CF-CLIP's text mapper and latent mapper, with the official semantics kept exactly.

Note the PixelNorm over dim 1 (the *level* axis of ``[B, levels, 512]`` inputs): in the text mapper
that axis has length 1, so each value becomes about sign(x); in the latent mapper each channel is
normalised across the levels of its group. The trained weights depend on it; do not "fix" it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cfdeploy.models.layers import EqualLinear, PixelNorm

COARSE_LEVELS = slice(0, 4)
MEDIUM_LEVELS = slice(4, 8)
FINE_LEVELS = slice(8, None)
LEVEL_GROUPS = {"coarse": COARSE_LEVELS, "medium": MEDIUM_LEVELS, "fine": FINE_LEVELS}
# The official attribute names, misspelling included: they are the state-dict keys.
GROUP_ATTRIBUTES = {"coarse": "course_mapping", "medium": "medium_mapping", "fine": "fine_mapping"}
EDIT_SCALE = 0.1


@dataclass(frozen=True)
class MapperConfig:
    """What a CF-CLIP checkpoint's ``opts`` say about its mappers."""

    n_latent: int
    dim: int = 512
    no_coarse_mapper: bool = False
    no_medium_mapper: bool = False
    no_fine_mapper: bool = False

    @property
    def groups(self) -> tuple[str, ...]:
        """The level groups that have a trained mapper (the others output zeros)."""
        disabled = {"coarse": self.no_coarse_mapper, "medium": self.no_medium_mapper, "fine": self.no_fine_mapper}
        return tuple(name for name in LEVEL_GROUPS if not disabled[name])


class Mapper(nn.Module):
    """PixelNorm then four activated EqualLinear layers (``mapping.1`` … ``mapping.4``)."""

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.mapping = nn.Sequential(
            PixelNorm(), *(EqualLinear(dim, dim, lr_mul=0.01, activate=True) for _ in range(4))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(x)


class FullTextMapper(nn.Module):
    """One Mapper per W+ level, each applied to the prompt's CLIP features: ``[B, dim] → [B, n, dim]``."""

    def __init__(self, config: MapperConfig) -> None:
        super().__init__()
        self.n_latent = config.n_latent
        for level in range(config.n_latent):
            setattr(self, f"mapper_{level}", Mapper(config.dim))

    def forward(self, text_features: torch.Tensor) -> torch.Tensor:
        per_level = text_features[:, None, :]
        return torch.cat([getattr(self, f"mapper_{level}")(per_level) for level in range(self.n_latent)], dim=1)


class LevelsMapper(nn.Module):
    """Fuse W+ with the mapped text (``fc``) and map coarse/medium/fine levels separately to a delta."""

    def __init__(self, config: MapperConfig) -> None:
        super().__init__()
        self.fc = EqualLinear(2 * config.dim, config.dim, lr_mul=0.01, activate=True)
        self.groups = config.groups
        for group in self.groups:
            setattr(self, GROUP_ATTRIBUTES[group], Mapper(config.dim))

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        x = self.fc(fused)
        parts = []
        for group, levels in LEVEL_GROUPS.items():
            part = x[:, levels]
            parts.append(
                getattr(self, GROUP_ATTRIBUTES[group])(part) if group in self.groups else torch.zeros_like(part)
            )
        return torch.cat(parts, dim=1)


class LatentEditor(nn.Module):
    """The run-time edit: ``w_hat = w + strength * 0.1 * mapper(cat(w, t_w))``."""

    def __init__(self, mapper: LevelsMapper) -> None:
        super().__init__()
        self.mapper = mapper

    def forward(self, w: torch.Tensor, text_latents: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        delta = self.mapper(torch.cat([w, text_latents], dim=-1))
        return w + strength.reshape(-1, 1, 1) * EDIT_SCALE * delta
