"""CLIP ViT-B/32 text encoder through open_clip.

CF-CLIP uses OpenAI's CLIP, so the architecture is open_clip's ``ViT-B-32-quickgelu``. Features are
computed in float32 and are **not** L2-normalised, as the mappers expect. Weights files are read by
:func:`cfdeploy.checkpoints.load_clip`; this module reads no files.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from open_clip import CLIP

CLIP_ARCHITECTURE = "ViT-B-32-quickgelu"
TEXT_TOWER_PREFIXES = ("positional_embedding", "text_projection", "token_embedding.", "transformer.", "ln_final.")
# open_clip imports these, where installed, for other model families (Hugging Face text towers, timm image towers,
# CoCa's generation): 2–3 s of every process that builds CLIP, and ViT-B/32 uses none of them.
OPEN_CLIP_OPTIONAL_IMPORTS = ("transformers", "timm")


def import_open_clip() -> ModuleType:
    """open_clip, imported as if its optional dependencies were not installed (it guards each of their imports);
    they are importable again once it returns (a thread importing one of them meanwhile would be refused: nothing in
    cfdeploy loads a Hugging Face model beside CLIP's first build)."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    hidden = [name for name in OPEN_CLIP_OPTIONAL_IMPORTS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # how the import system spells "not installed"
    try:
        import open_clip
    finally:
        for name in hidden:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
    return open_clip


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


def encode_text_to_last_end(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """``clip.encode_text(tokens)`` without the padding after the last end-of-text token. CLIP's causal mask lets a
    position see only those before it and the features are read at each prompt's end-of-text token, so what follows
    it changes nothing: the same features in a fraction of the time for short prompts (CLIP-NCE's 79 templates
    are about 13 of the 77 tokens)."""
    if clip.text_pool_type != "argmax" or not isinstance(clip.text_projection, nn.Parameter):
        raise ValueError(f"{CLIP_ARCHITECTURE} reads features at the end-of-text token through a projection matrix")
    ends = tokens.argmax(dim=-1)
    length = int(ends.max()) + 1
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens[:, :length]).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
    return x[torch.arange(len(x), device=x.device), ends] @ clip.text_projection


def build_clip() -> CLIP:
    """open_clip's CLIP ViT-B/32 (QuickGELU) with its own random initialisation."""
    open_clip = import_open_clip()
    with _quiet_open_clip():
        return open_clip.create_model(CLIP_ARCHITECTURE, pretrained=None)


def build_clip_for_weights() -> CLIP:
    """open_clip's CLIP ViT-B/32 (QuickGELU) with every weight zero, for a state dict to be loaded into: built on
    the meta device, so the 151 M parameters a load overwrites are never randomly initialised (a second or more)."""
    open_clip = import_open_clip()
    with _quiet_open_clip(), torch.device("meta"):
        model = open_clip.create_model(CLIP_ARCHITECTURE, pretrained=None, device="meta")
    model = model.to_empty(device="cpu")
    for tensor in model.state_dict().values():
        tensor.zero_()
    # The one buffer no state dict holds: the text tower's causal mask, -inf above the diagonal as open_clip builds it.
    positions = model.positional_embedding.shape[0]
    model.attn_mask = torch.full((positions, positions), float("-inf")).triu_(1)
    return model
