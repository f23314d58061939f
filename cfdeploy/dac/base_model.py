"""The base model: a local Stable Diffusion folder in diffusers' layout, checked before anything loads.

DAC needs an ε-predicting text-to-image UNet conditioned on a CLIP text encoder's last hidden states
(Stable Diffusion 1.x/2.x-base). Each part is refused with what was found when it is something else
(an SDXL UNet, a v-prediction scheduler, pickle-only weights, a missing folder). Weights load only from
safetensors files, never from pickles, and nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfdeploy.errors import CfdeployError
from cfdeploy.files import read_json_object, sha256_file

# Each weighted part: its folder, the class its config must name, and its safetensors file.
WEIGHTED_PARTS = {
    "unet": ("UNet2DConditionModel", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("CLIPTextModel", "model.safetensors"),
    "vae": ("AutoencoderKL", "diffusion_pytorch_model.safetensors"),
}
TOKENIZER_FILES = ("vocab.json", "merges.txt")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
MODEL_INDEX = "model_index.json"
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class BaseModelInfo:
    """A checked base-model folder: its configs and, as its identity, the sha256 of every file that decides its weights
    or the pipeline's behaviour (weights, model and scheduler configs, tokenizer files), by path in the folder."""

    path: Path
    configs: dict[str, dict[str, Any]]
    files_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def latent_channels(self) -> int:
        return int(self.configs["unet"]["in_channels"])

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.configs["vae"]["block_out_channels"]) - 1))

    @property
    def scaling_factor(self) -> float:
        return float(self.configs["vae"].get("scaling_factor", 0.18215))

    def identity(self) -> dict[str, Any]:
        """What a DAC run records of its base model, and what ``dac edit`` compares."""
        return {"path": str(self.path), "files_sha256": dict(self.files_sha256)}


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CfdeployError(
            f"{path}: missing (a diffusers Stable Diffusion folder has unet/, text_encoder/, vae/, tokenizer/, scheduler/)"
        )
    return read_json_object(path, "a diffusers config", MAX_CONFIG_BYTES)


def _weights_file(folder: Path, name: str) -> Path:
    weights = folder / name
    if weights.is_file():
        return weights
    found = sorted(entry.name for entry in folder.iterdir() if entry.suffix in {".bin", ".safetensors", ".ckpt", ".pt"})
    if any(entry.endswith(".bin") for entry in found):
        raise CfdeployError(
            f"{folder}: has only pickle weights ({', '.join(found)}); cfdeploy loads safetensors only: "
            "re-save the model with save_pretrained(..., safe_serialization=True)"
        )
    if found:
        raise CfdeployError(f"{folder}: expected {name} (full-precision weights), found {', '.join(found)}")
    raise CfdeployError(f"{folder}: no {name}")


def _check_unet(config: dict[str, Any], source: Path, text_hidden: int) -> None:
    if config.get("addition_embed_type") or config.get("class_embed_type"):
        found = config.get("addition_embed_type") or config.get("class_embed_type")
        raise CfdeployError(
            f"{source}: a UNet with extra conditioning ({found!r}, e.g. SDXL or an upscaler); DAC needs a Stable Diffusion "
            "1.x/2.x-base UNet conditioned on text alone"
        )
    if config.get("cross_attention_dim") != text_hidden:
        raise CfdeployError(
            f"{source}: cross_attention_dim {config.get('cross_attention_dim')} does not match the text encoder's "
            f"hidden size {text_hidden}: unet/ and text_encoder/ come from different models"
        )
    if config.get("in_channels") != config.get("out_channels"):
        raise CfdeployError(
            f"{source}: {config.get('in_channels')} input and {config.get('out_channels')} output channels "
            "(an inpainting or depth UNet?); DAC needs a text-to-image UNet"
        )


def inspect_base_model(path: Path) -> BaseModelInfo:
    """Check ``path`` is a usable base model and hash its weight files; loads no weights."""
    if not path.is_dir():
        raise CfdeployError(
            f"{path}: not a directory (--base-model is a local diffusers folder, e.g. stable-diffusion-2-1-base)"
        )
    configs: dict[str, dict[str, Any]] = {}
    weights: dict[str, Path] = {}
    for part, (class_name, file_name) in WEIGHTED_PARTS.items():
        config_path = path / part / "config.json"
        config = _read_config(config_path)
        found = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if found != class_name:
            raise CfdeployError(f"{config_path}: expected a {class_name}, found {found or 'no class name'}")
        configs[part] = config
        weights[part] = _weights_file(path / part, file_name)
    scheduler = _read_config(path / SCHEDULER_CONFIG)
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise CfdeployError(
            f"{path / SCHEDULER_CONFIG}: prediction_type {scheduler.get('prediction_type')!r}; DAC needs an ε-predicting model "
            "(stable-diffusion-2-1-base, not the 768 px v-prediction stable-diffusion-2-1)"
        )
    configs["scheduler"] = scheduler
    for name in TOKENIZER_FILES:
        if not (path / "tokenizer" / name).is_file():
            raise CfdeployError(
                f"{path / 'tokenizer' / name}: missing (a CLIP tokenizer has vocab.json and merges.txt)"
            )
    _check_unet(configs["unet"], path / "unet" / "config.json", int(configs["text_encoder"].get("hidden_size", -1)))
    decisive = [
        *weights.values(),
        *(path / part / "config.json" for part in WEIGHTED_PARTS),
        path / SCHEDULER_CONFIG,
        *sorted(entry for entry in (path / "tokenizer").iterdir() if entry.is_file()),
        *([path / MODEL_INDEX] if (path / MODEL_INDEX).is_file() else []),
    ]
    return BaseModelInfo(
        path.resolve(), configs, {file.relative_to(path).as_posix(): sha256_file(file) for file in decisive}
    )


def check_same_base_model(info: BaseModelInfo, recorded: Any, source: Path) -> None:
    """Refuse a run's adapters on a base model other than the one they were fitted to."""
    recorded_sha = recorded.get("files_sha256") if isinstance(recorded, dict) else None
    if not isinstance(recorded_sha, dict):
        raise CfdeployError(f"{source}: records no base-model files (written by an older cfdeploy?); abduct it again")
    if recorded_sha != info.files_sha256:
        differing = sorted(
            name
            for name in {*recorded_sha, *info.files_sha256}
            if recorded_sha.get(name) != info.files_sha256.get(name)
        )
        raise CfdeployError(
            f"{source}: was fitted to another base model ({recorded.get('path')}); "
            f"{', '.join(differing[:4])}{' …' if len(differing) > 4 else ''} in {info.path} differ"
        )


@dataclass
class BaseModel:
    """The loaded parts, fp32, frozen, on one device."""

    info: BaseModelInfo
    unet: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any

    def tokens(self, prompt: str) -> Any:
        """Token ids ``[1, 77]``, padded and truncated as the official scripts tokenise."""
        return self.tokenizer(
            [prompt],
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def check_prompt(self, prompt: str, option: str) -> None:
        length = len(self.tokenizer([prompt]).input_ids[0])
        if length > self.tokenizer.model_max_length:
            raise CfdeployError(
                f"{option} {prompt!r} is {length} tokens; the text encoder reads at most {self.tokenizer.model_max_length}"
            )


def load_base_model(info: BaseModelInfo, device: str = "cpu") -> BaseModel:
    """Load the checked folder: UNet, text encoder and VAE in fp32 from safetensors, the tokenizer from its files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    options: dict[str, Any] = {
        "use_safetensors": True,
        "local_files_only": True,
        "torch_dtype": torch.float32,
        "output_loading_info": True,
    }
    path = info.path
    parts: list[Any] = []
    try:
        classes: dict[str, Any] = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "vae": AutoencoderKL}
        for part, model_class in classes.items():
            model, loading = model_class.from_pretrained(path / part, **options)
            _require_every_weight(path / part, loading)
            parts.append(model)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        raise CfdeployError(f"{path}: cannot load the model: {str(error).splitlines()[0]}") from None
    for model in parts:
        model.requires_grad_(False)
        model.to(device)
        model.eval()
    unet, text_encoder, vae = parts
    return BaseModel(info, unet, text_encoder, vae, tokenizer)


def _require_every_weight(folder: Path, loading: dict[str, Any]) -> None:
    """Refuse a weights file that does not set every parameter (the libraries would initialise the rest at random)."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(key) for key in loading.get(kind) or ())
        if keys:
            raise CfdeployError(
                f"{folder}: its weights do not fit its config.json: {len(keys)} {kind.replace('_', ' ')} (e.g. {keys[0]})"
            )
