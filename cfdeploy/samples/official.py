"""Synthetic files in the official formats, built from the key/shape manifests in ``manifests/`` beside this file:
what ``cfdeploy samples`` writes and what the tests load.

Values are random but scaled like trained weights (equalised-lr layers store weight/lr_mul, modulation
biases start at 1, FIR kernels are the real ones), so activations stay in a realistic range.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

MANIFESTS = Path(__file__).resolve().parent / "manifests"
MANIFEST_SIZES = (256, 1024)
BLOCK_KEY = re.compile(r"(decoder\.convs\.|decoder\.to_rgbs\.|decoder\.noises\.noise_|text_mapper\.mapper_)(\d+)")


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text())


def official_fir_kernel() -> torch.Tensor:
    """outer([1,3,3,1]) normalised to sum 1, times upsampling factor squared (4): outer/16."""
    taps = np.array([1.0, 3.0, 3.0, 1.0])
    return torch.from_numpy(np.outer(taps, taps) / 16.0).float()


def _stylegan_value(key: str, shape: list[int], rng: torch.Generator) -> torch.Tensor:
    randn = lambda: torch.randn(shape, generator=rng)  # noqa: E731
    if key.endswith(("blur.kernel", "upsample.kernel")):
        return official_fir_kernel()
    if key.endswith("modulation.bias"):
        return 1.0 + 0.1 * randn()
    if re.search(r"(^|\.)(style\.\d+|mapping\.\d+|fc)\.weight$", key):
        return randn() / 0.01
    if key.endswith(("noise.weight", "activate.bias")) or re.search(r"rgbs?\d*\.bias$", key):
        return 0.1 * randn()
    return randn()


def stylegan_like_state(keys: list, seed: int) -> dict[str, torch.Tensor]:
    rng = torch.Generator().manual_seed(seed)
    return {key: _stylegan_value(key, shape, rng) for key, shape, _ in keys}


def cfclip_keys(size: int) -> list:
    """The manifest's ``[key, shape, dtype]`` list at 256 or 1024 px.

    64 and 128 px (sizes at which every mapper group still has levels) keep the first blocks of the
    256 px layout: the same channels per resolution, fewer blocks, one text mapper per level.
    """
    if size in MANIFEST_SIZES:
        return manifest(f"cfclip_manifest_{size}.json")["keys"]
    if size not in (64, 128):
        raise ValueError(f"synthetic CF-CLIP checkpoints are 64, 128, 256 or 1024 px, not {size}")
    blocks = int(math.log2(size)) - 2  # upsampling blocks after the 4 px input
    counts = {
        "decoder.convs.": 2 * blocks,
        "decoder.to_rgbs.": blocks,
        "decoder.noises.noise_": 2 * blocks + 1,
        "text_mapper.mapper_": 2 * blocks + 2,
    }

    def kept(key: str) -> bool:
        found = BLOCK_KEY.match(key)
        return found is None or int(found.group(2)) < counts[found.group(1)]

    return [entry for entry in manifest("cfclip_manifest_256.json")["keys"] if kept(entry[0])]


def cfclip_checkpoint(size: int, seed: int = 0, **opts_overrides) -> dict:
    """``{'state_dict', 'opts'}`` like a CF-CLIP release file; disabled mapper groups drop their keys."""
    layout = size if size in MANIFEST_SIZES else 256
    opts = {**manifest(f"cfclip_manifest_{layout}.json")["checkpoint_opts"], "stylegan_size": size, **opts_overrides}
    dropped = [
        prefix
        for flag, prefix in (
            ("no_coarse_mapper", "mapper.course_mapping."),
            ("no_medium_mapper", "mapper.medium_mapping."),
            ("no_fine_mapper", "mapper.fine_mapping."),
        )
        if opts.get(flag)
    ]
    keys = [entry for entry in cfclip_keys(size) if not entry[0].startswith(tuple(dropped))]
    return {"state_dict": stylegan_like_state(keys, seed), "opts": opts}


def rosinality_checkpoint(seed: int = 0, training: bool = True) -> dict:
    spec = manifest("rosinality_manifest_1024.json")
    content: dict = {"g_ema": stylegan_like_state(spec["keys"], seed), "latent_avg": torch.randn(512)}
    if training:
        content["args"] = argparse.Namespace(size=1024, channel_multiplier=2, lr=0.002)
    return content


def clip_text_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """CLIP ViT-B/32 text tower under OpenAI's key names, initialised like CLIP."""
    rng = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, _ in manifest("clip_text_manifest.json")["keys"]:
        if key == "logit_scale":
            value = torch.tensor(math.log(1 / 0.07))
        elif re.search(r"ln_\w*\.weight$|ln_final\.weight$", key):
            value = 1.0 + 0.05 * torch.randn(shape, generator=rng)
        elif key.endswith("bias"):
            value = 0.02 * torch.randn(shape, generator=rng)
        elif key == "token_embedding.weight":
            value = 0.02 * torch.randn(shape, generator=rng)
        elif key == "positional_embedding":
            value = 0.01 * torch.randn(shape, generator=rng)
        else:
            value = torch.randn(shape, generator=rng) / math.sqrt(shape[-1])
        state[key] = value.to(dtype)
    return state


class _Holder(nn.Module):
    """A module tree whose state_dict has exactly the given keys, to script into an archive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive like OpenAI's ``ViT-B-32.pt``: tensors under CLIP's key names."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    for name, number in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(name, torch.tensor(number))
    torch.jit.save(torch.jit.script(root), str(path))


def _e4e_encoder_value(key: str, shape: list[int], rng: torch.Generator) -> torch.Tensor:
    """Trained-looking e4e weights: fan-in scaled convs, BatchNorm with plausible running statistics."""
    randn = lambda: torch.randn(shape, generator=rng)  # noqa: E731
    uniform = lambda low, high: low + (high - low) * torch.rand(shape, generator=rng)  # noqa: E731
    if key.endswith("num_batches_tracked"):
        return torch.tensor(200_000, dtype=torch.int64)
    if key.endswith("running_mean"):
        return 0.1 * randn()
    if key.endswith("running_var"):
        return uniform(0.5, 2.0)
    if len(shape) == 1 and re.search(r"(input_layer\.2|res_layer\.2)\.weight$", key):  # PReLU slopes
        return uniform(0.1, 0.4)
    if len(shape) == 1 and key.endswith("weight"):  # BatchNorm scale; the residual's last one small
        return (0.3 if key.endswith("res_layer.4.weight") else 1.0) * uniform(0.7, 1.3)
    if len(shape) == 1:  # BatchNorm, conv and linear biases
        return 0.05 * randn()
    if key.endswith("linear.weight"):  # EqualLinear stores unscaled weights
        return randn()
    fan_in = math.prod(shape[1:])
    gain = 2.0 if ".styles." in key else 1.0  # map2style convs feed a leaky ReLU
    return randn() * math.sqrt(gain / fan_in)


def e4e_checkpoint(seed: int = 0, size: int = 1024) -> dict:
    """``{'state_dict', 'latent_avg', 'opts'}`` like ``e4e_ffhq_encode.pt`` (``size`` 1024); other sizes keep the
    encoder's first ``2 log2(size) - 2`` style blocks and the CF-CLIP layout's generator of that size, as the
    official code builds them for ``opts.stylegan_size``."""
    spec = manifest("e4e_manifest.json")
    n_latent = 2 * int(math.log2(size)) - 2
    style_block = re.compile(r"encoder\.styles\.(\d+)\.")

    def kept(key: str) -> bool:
        found = style_block.match(key)
        return found is None or int(found.group(1)) < n_latent

    encoder_keys = [entry for entry in spec["keys"] if entry[0].startswith("encoder.") and kept(entry[0])]
    if size == 1024:
        decoder_keys = [entry for entry in spec["keys"] if entry[0].startswith("decoder.")]
    else:
        decoder_keys = [entry for entry in cfclip_keys(size) if entry[0].startswith("decoder.")]
    rng = torch.Generator().manual_seed(seed)
    state = {key: _e4e_encoder_value(key, shape, rng) for key, shape, _ in encoder_keys}
    state.update(stylegan_like_state(decoder_keys, seed + 1))
    shared_mean = 0.5 * torch.randn(512, generator=rng)
    latent_avg = shared_mean + 0.05 * torch.randn(n_latent, 512, generator=rng)
    opts = {**spec["checkpoint_opts"], "stylegan_size": size}
    return {"state_dict": state, "latent_avg": latent_avg, "opts": opts}


def checkpoint_with_generator_of(generator_seed: int, mapper_seed: int, size: int = 256, **opts) -> dict:
    """A CF-CLIP file whose mappers come from ``mapper_seed`` and whose generator is ``generator_seed``'s: another
    prompt's checkpoint for the same StyleGAN2, what ``refit`` swaps into a bundle."""
    content = cfclip_checkpoint(size, seed=mapper_seed, **opts)
    donor = cfclip_checkpoint(size, seed=generator_seed)["state_dict"]
    content["state_dict"].update({key: value for key, value in donor.items() if key.startswith("decoder.")})
    return content


def arcface_state(seed: int) -> dict[str, torch.Tensor]:
    """ArcFace IR-SE-50's state dict (``model_ir_se50.pth``), seeded random, with running statistics other than 0
    and 1 so that eval-mode BatchNorm is exercised."""
    from cfdeploy.models.arcface import ArcFace

    torch.manual_seed(seed)
    arcface = ArcFace()
    with torch.no_grad():
        for module in arcface.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                assert module.running_mean is not None and module.running_var is not None  # tracked in ArcFace
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
    return arcface.state_dict()


# A face's five points (left eye, right eye, nose, mouth corners) in a 320 x 300 photo.
FIVE_POINTS = [[120.0, 130.0], [200.0, 128.0], [160.0, 170.0], [130.0, 210.0], [192.0, 208.0]]
PHOTO_NAMES = ("a.jpg", "b.png")


def write_photos(folder: Path, landmarks: Path, seed: int = 3) -> None:
    """Two 320 x 300 photos (a JPEG and a PNG, smooth colour fields) in ``folder`` and their landmarks file: five
    points of one face per photo, in the photos' sorted order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in PHOTO_NAMES:
        coarse = Image.fromarray(rng.integers(0, 255, (30, 32, 3), np.uint8))
        Image.fromarray(np.asarray(coarse.resize((320, 300), Image.Resampling.BICUBIC))).save(folder / name)
    landmarks.write_text(json.dumps([FIVE_POINTS, [[x + 6, y - 4] for x, y in FIVE_POINTS]]))


def dac_image(seed: int = 0) -> Image.Image:
    """An 96 x 80 image of noise for DAC to fit (any image will do: the tiny model's weights are random)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (80, 96, 3), dtype=np.uint8))
