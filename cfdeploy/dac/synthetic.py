"""Random Stable Diffusion folders in diffusers' layout, built from configs: for tests and benchmarks, no downloads.

Two shapes. ``tiny``: a UNet with every module name DAC's UNet LoRA targets (attention, GEGLU feed-forward,
resnets with a shortcut, down- and upsamplers, time embedding projections), a 2-layer CLIP text encoder
and a one-step VAE, 32 px images. ``sd-2-1-base``: Stable Diffusion 2.1-base's shapes (865.9 M UNet
parameters, OpenCLIP ViT-H text encoder, 512 px), for cost figures. Both get the same tokenizer, whose
vocabulary is the 512 byte-level symbols and the two special tokens with no merges, and SD 2.1-base's
PNDM scheduler. Random weights say nothing about image quality; they pin down shapes, formulas and costs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "image_size": 32,
        "unet": dict(
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),
            norm_num_groups=8,
        ),
        "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        "vae": dict(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
        ),
    },
    "sd-2-1-base": {
        "image_size": 512,
        "unet": dict(
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=(5, 10, 20, 20),
        ),
        "text_encoder": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16),
        "vae": dict(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        ),
    },
}


def _byte_symbols() -> list[str]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            symbols.append(256 + extra)
            extra += 1
    return [chr(code) for code in symbols]


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + index for index, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )


def write_random_base_model(folder: Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random model of ``shape`` (see :data:`SHAPES`) to ``folder`` as fp32 safetensors and return it."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = SHAPES[shape]
    text_hidden = config["text_encoder"]["hidden_size"]
    torch.manual_seed(seed)
    parts: dict[str, Any] = {}
    parts["unet"] = UNet2DConditionModel(
        sample_size=config["image_size"] // (2 ** (len(config["vae"]["block_out_channels"]) - 1)),
        in_channels=4,
        out_channels=4,
        cross_attention_dim=text_hidden,
        use_linear_projection=True,
        **config["unet"],
    )
    parts["text_encoder"] = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            projection_dim=text_hidden,
            hidden_act="gelu",
            **config["text_encoder"],
        )
    )
    parts["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=config["image_size"], **config["vae"]
    )
    parts["scheduler"] = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="epsilon",
    )
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a bar per tiny file would break the caller's lines
    try:
        for name, part in parts.items():
            part.save_pretrained(folder / name)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    write_tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder
