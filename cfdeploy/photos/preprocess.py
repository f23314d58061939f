"""The encoder's input, exactly as e4e's ``transform_inference`` makes it, without torch.

The official transform is ``Resize((256, 256))`` on the PIL image (torchvision hands a PIL image to
Pillow's own bilinear resize, which antialiases when it downscales), ``ToTensor`` (uint8 / 255 in
float32, HWC → CHW) and ``Normalize([0.5]*3, [0.5]*3)``. The same operations in the same float32
order give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

ENCODER_SIZE = 256


def encoder_input(image: Image.Image) -> np.ndarray:
    """``image`` (RGB, any size) as the encoder's float32 ``[3, 256, 256]`` input in [-1, 1]."""
    if image.mode != "RGB":
        raise ValueError(f"encoder_input needs an RGB image, got mode {image.mode}")
    resized = image.resize((ENCODER_SIZE, ENCODER_SIZE), Image.Resampling.BILINEAR)
    scaled = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    return np.ascontiguousarray((scaled - np.float32(0.5)) / np.float32(0.5))


def batch_inputs(images: Sequence[Image.Image]) -> np.ndarray:
    """Several images as one float32 ``[B, 3, 256, 256]`` batch."""
    if not images:
        raise ValueError("batch_inputs needs at least one image")
    return np.stack([encoder_input(image) for image in images])
