"""CLIP ViT-B/32 text encoder through open_clip, loaded from the user's weights file.

CF-CLIP uses OpenAI's CLIP, so the architecture is open_clip's ``ViT-B-32-quickgelu``. Accepted
files: OpenAI's TorchScript ``ViT-B-32.pt`` (fp16 tensors) or an open_clip state dict with the same
key names (``.pt``/``.bin``/``.safetensors``). Features are computed in float32 and are **not**
L2-normalised, as the mappers expect.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from cfdeploy.checkpoints import check_keys, is_torchscript_archive, require_file, safe_torch_load
from cfdeploy.errors import CfdeployError

CLIP_ARCHITECTURE = "ViT-B-32-quickgelu"
TEXT_TOWER_PREFIXES = ("positional_embedding", "text_projection", "token_embedding.", "transformer.", "ln_final.")
# Scalars OpenAI's archive stores beside the weights; they describe the architecture, which is fixed.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


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

    def __init__(self, clip_model: nn.Module, has_visual_weights: bool) -> None:
        super().__init__()
        self.clip = clip_model
        self.has_visual_weights = has_visual_weights

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)

    @classmethod
    def random(cls, seed: int) -> "ClipText":
        """The real architecture with seeded random weights (demo and tests; no download)."""
        torch.manual_seed(seed)
        return cls(_build_clip(), has_visual_weights=False).eval()

    @classmethod
    def from_file(cls, path: Path) -> "ClipText":
        state = read_clip_state(path)
        model = _build_clip()
        expected = model.state_dict()
        text_state = {key: value for key, value in state.items() if is_text_tower_key(key)}
        check_keys({key: value for key, value in expected.items() if is_text_tower_key(key)}, text_state, path)
        visual_expected = {key: value for key, value in expected.items() if key.startswith("visual.")}
        visual_state = {key: value for key, value in state.items() if key.startswith("visual.")}
        if visual_state:
            check_keys(visual_expected, visual_state, path)
        unknown = [key for key in state if key not in {*text_state, *visual_expected, "logit_scale", *OPENAI_METADATA_KEYS}]
        if unknown:
            raise CfdeployError(f"{path}: not CLIP ViT-B/32 weights: unexpected keys {', '.join(unknown[:4])}")
        loaded = {**text_state, **visual_state}
        if "logit_scale" in state:
            loaded["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
        model.load_state_dict({key: value.float() for key, value in loaded.items()}, strict=False)
        return cls(model, has_visual_weights=bool(visual_state)).eval()


def _build_clip() -> nn.Module:
    import open_clip

    with _quiet_open_clip():
        return open_clip.create_model(CLIP_ARCHITECTURE, pretrained=None)


def read_clip_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a CLIP weights file, whichever of the accepted formats it is."""
    require_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CfdeployError(f"{path}: not a readable safetensors file: {error}") from None
    if is_torchscript_archive(path):
        try:
            # Reads the archive's tensors; none of its TorchScript code is called.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except RuntimeError as error:
            raise CfdeployError(f"{path}: not a readable TorchScript archive: {str(error).splitlines()[0]}") from None
    content = safe_torch_load(path)
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not all(isinstance(value, torch.Tensor) for value in content.values()):
        raise CfdeployError(f"{path}: expected a CLIP state dict of tensors, found {type(content).__name__}")
    return {key.removeprefix("module."): value for key, value in content.items()}
