"""The export contract of every network in a bundle: one place for names, shapes and dtypes.

Exporters build graphs to these names; runtimes (ONNX Runtime, TensorRT) feed and read them. The
``batch`` axis is dynamic everywhere; ``strength`` is a one-element input so one graph serves any edit
strength. Each contract also says how its TensorRT engine is built by default (precision, refittable).
Torch-free on purpose: deployed runtimes import this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BATCH = "batch"
TOKENS = 77
TEXT_DIM = 512
ENCODER_IMAGE_SIZE = 256  # e4e reads aligned faces at 256 px whatever the generator's size
IDENTITY_IMAGE_SIZE = 256  # the official identity loss pools every image to 256 px before it crops the face
IDENTITY_DIM = 512


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class NetworkContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    purpose: str
    precision: str = "fp32"  # TensorRT default: fp32, fp16, or mixed (fp16 convolutions, sensitive parts fp32)
    refittable: bool = False  # per-prompt weights: TensorRT engines are built refittable
    parity_rel_l2: float = 1e-5  # how far the exported graph in ONNX Runtime may be from PyTorch (relative L2, fp32)

    @property
    def batched_inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(spec for spec in self.inputs if spec.shape[0] == BATCH)

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.filename,
            "purpose": self.purpose,
            "inputs": [spec.as_dict() for spec in self.inputs],
            "outputs": [spec.as_dict() for spec in self.outputs],
            "precision": self.precision,
            "refittable": self.refittable,
        }


def encoder_contract(n_latent: int, style_dim: int = 512) -> NetworkContract:
    """The e4e encoder, in bundles exported with one.

    fp32 by default: fp16 may be chosen only where it keeps the reconstruction (the generator's image of
    the fp16 codes) within 40 dB PSNR of the fp32 one.
    """
    return NetworkContract(
        "encoder",
        (TensorSpec("images", (BATCH, 3, ENCODER_IMAGE_SIZE, ENCODER_IMAGE_SIZE)),),
        (TensorSpec("w", (BATCH, n_latent, style_dim)),),
        "e4e encoder: aligned faces in [-1, 1] to W+ codes (mean W included)",
    )


def identity_contract() -> NetworkContract:
    """ArcFace IR-SE-50, in bundles exported with it: the identity score of an edit (``edit.json``).

    It takes faces already pooled to 256 px (the generator's size differs from bundle to bundle, the aligned
    photo is 256 px), so one graph serves every size; inside it, the official crop and pooling to 112 px.
    """
    return NetworkContract(
        "identity",
        (TensorSpec("images", (BATCH, 3, IDENTITY_IMAGE_SIZE, IDENTITY_IMAGE_SIZE)),),
        (TensorSpec("features", (BATCH, IDENTITY_DIM)),),
        "ArcFace IR-SE-50: faces at 256 px in [-1, 1], cropped and pooled to 112 px, to unit identity embeddings",
    )


def network_contracts(
    size: int, n_latent: int, style_dim: int = 512, with_encoder: bool = False, with_identity: bool = False
) -> dict[str, NetworkContract]:
    """The graphs of a CF-CLIP bundle, in pipeline order: the encoder first if ``with_encoder``, then the five
    every bundle may have, then ArcFace if ``with_identity``."""
    w_plus = (BATCH, n_latent, style_dim)
    contracts = [
        NetworkContract(
            "clip_text",
            (TensorSpec("tokens", (BATCH, TOKENS), "int64"),),
            (TensorSpec("text_features", (BATCH, TEXT_DIM)),),
            "CLIP ViT-B/32 text tower: token ids to unnormalised text features",
            precision="fp16",
        ),
        NetworkContract(
            "text_mapper",
            (TensorSpec("text_features", (BATCH, TEXT_DIM)),),
            (TensorSpec("text_latents", w_plus),),
            "CF-CLIP FullTextMapper: one Mapper per W+ level",
            refittable=True,
        ),
        NetworkContract(
            "latent_editor",
            (TensorSpec("w", w_plus), TensorSpec("text_latents", w_plus), TensorSpec("strength", (1,))),
            (TensorSpec("w_hat", w_plus),),
            "LevelsMapper and residual: w_hat = w + strength * 0.1 * mapper(cat(w, text_latents))",
            refittable=True,
        ),
        NetworkContract(
            "generator",
            (TensorSpec("latents", w_plus),),
            (TensorSpec("image", (BATCH, 3, size, size)),),
            "StyleGAN2 synthesis with the stored noise: W+ to an image in about [-1, 1]",
            precision="mixed",
        ),
        NetworkContract(
            "mapping",
            (TensorSpec("z", (BATCH, style_dim)),),
            (TensorSpec("w", (BATCH, style_dim)),),
            "StyleGAN2 mapping network: Gaussian z to W (for --seed)",
        ),
    ]
    if with_encoder:
        contracts.insert(0, encoder_contract(n_latent, style_dim))
    if with_identity:
        contracts.append(identity_contract())
    return {contract.name: contract for contract in contracts}


def dac_contracts(
    latent_channels: int, latent_side: int, image_side: int, text_hidden: int, unet_scale_input: bool
) -> dict[str, NetworkContract]:
    """The graphs of a DAC bundle (``cfdeploy dac export``): text encoder with Δ, UNet with U, VAE decoder.

    U's weight changes at every UNet call (γ(t)), so the exact UNet takes it as the scalar ``lora_scale``
    with U's low-rank branches unmerged; a merged UNet has U folded in at one weight (a stock graph). Δ's
    weight is the scalar ``text_lora_scale`` (−β), for β sweeps; the default β's embeddings ship precomputed.
    The LoRA weights are refittable, so a new image's U is a TensorRT refit, not a rebuild.
    """
    latents = (BATCH, latent_channels, latent_side, latent_side)
    hidden = (BATCH, TOKENS, text_hidden)
    unet_inputs = [
        TensorSpec("sample", latents),
        TensorSpec("timestep", (1,)),
        TensorSpec("encoder_hidden_states", hidden),
    ]
    if unet_scale_input:
        unet_inputs.append(TensorSpec("lora_scale", (1,)))
    contracts = [
        NetworkContract(
            "text_encoder",
            (TensorSpec("tokens", (BATCH, TOKENS), "int64"), TensorSpec("text_lora_scale", (1,))),
            (TensorSpec("hidden_states", hidden),),
            "CLIP text encoder with Δ as a low-rank branch scaled by text_lora_scale (−β edits; T folded in, variant t)",
        ),
        NetworkContract(
            "unet",
            tuple(unet_inputs),
            (TensorSpec("noise", latents),),
            "UNet with U: unmerged low-rank branches scaled by lora_scale (γ(t) per call)"
            if unet_scale_input
            else "UNet with U merged at one weight (an approximation of γ(t))",
            precision="fp16",
            refittable=True,
        ),
        NetworkContract(
            "vae_decoder",
            (TensorSpec("latents", latents),),
            (TensorSpec("image", (BATCH, 3, image_side, image_side)),),
            "VAE decoder: sampled latents (divided by the scaling factor inside) to an image in about [-1, 1]",
            # 30 convolutions and GroupNorms at 512 px (SD 2.1-base shapes measured 4e-5), quantised to 8 bits after:
            # 1e-4 is still ~1/40 of a level. The text encoder and UNet feed 31 sampling steps and keep 1e-5.
            parity_rel_l2=1e-4,
        ),
    ]
    return {contract.name: contract for contract in contracts}
