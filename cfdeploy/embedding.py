"""``cfdeploy embed``: prompts to the unnormalised CLIP text features CF-CLIP's text mapper reads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cfdeploy.checkpoints import load_clip
from cfdeploy.devices import torch_device
from cfdeploy.tokenizer import ClipTokenizer


def encode_prompts(prompts: Sequence[str], clip_weights: Path, device: str = "cpu") -> np.ndarray:
    """Features ``[P, 512]`` float32 of each prompt, computed in float32 by CLIP ViT-B/32's text tower."""
    target = torch_device(device)
    tokens = torch.from_numpy(ClipTokenizer()(list(prompts))).to(target)
    clip = load_clip(clip_weights).to(target)
    with torch.inference_mode():
        return clip(tokens).float().cpu().numpy()
