"""CLIP ViT-B/32 text encoder through open_clip.

CF-CLIP uses OpenAI's CLIP, so the architecture is open_clip's ``ViT-B-32-quickgelu``. Features are
computed in float32 and are **not** L2-normalised, as the mappers expect. Weights files are read by
:func:`cfdeploy.checkpoints.load_clip`; this module reads no files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from open_clip import CLIP

CLIP_ARCHITECTURE = "ViT-B-32-quickgelu"
TEXT_TOWER_PREFIXES = ("positional_embedding", "text_projection", "token_embedding.", "transformer.", "ln_final.")


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs a warning for every model built without its pretrained download; ours load next."""
    logger = logging.getLogger()
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def is_text_tower_key(key: str) -> bool:
    return key.startswith(TEXT_TOWER_PREFIXES)


class ClipText(nn.Module):
    """``tokens [P, 77] → features [P, 512]``: the CLIP text tower with the projection, unnormalised."""

    def __init__(self, clip_model: CLIP, has_visual_weights: bool) -> None:
        super().__init__()
        self.clip = clip_model
        self.has_visual_weights = has_visual_weights

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)

    @classmethod
    def random(cls, seed: int) -> ClipText:
        """The real architecture with seeded random weights (demo and tests; no download)."""
        torch.manual_seed(seed)
        return cls(build_clip(), has_visual_weights=False).eval()


def build_clip() -> CLIP:
    """open_clip's CLIP ViT-B/32 (QuickGELU) with its own random initialisation."""
    import open_clip

    with _quiet_open_clip():
        return open_clip.create_model(CLIP_ARCHITECTURE, pretrained=None)
