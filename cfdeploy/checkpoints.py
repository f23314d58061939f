"""Loading the files users already have: CF-CLIP, e4e and rosinality StyleGAN2 checkpoints, CLIP weights.

Every file is read through :mod:`cfdeploy.torchfiles` (nothing that can run code) or as safetensors (only
tensors), and every weight must be finite. Loading is strict: missing or unexpected keys and wrong shapes
are reported by name, never filled in or skipped.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfdeploy.errors import CfdeployError
from cfdeploy.files import memory_guard, require_file
from cfdeploy.models.arcface import ArcFace
from cfdeploy.models.clip_text import ClipText, build_clip_for_weights, is_text_tower_key
from cfdeploy.models.e4e import MIDDLE_LEVELS, STYLE_DIM, E4EEncoder, Encoder4Editing
from cfdeploy.models.mappers import FullTextMapper, LevelsMapper, MapperConfig
from cfdeploy.models.stylegan2 import Generator, GeneratorConfig
from cfdeploy.torchfiles import (
    describe,
    is_torchscript_archive,
    listed,
    read_torchscript_state,
    require_finite_weights,
    safe_torch_load,
    tensor_dict,
    weights_sha256,
)

# Scalars OpenAI's archive stores beside the weights; they describe the architecture, which is fixed.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


def check_keys(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: Path, prefix: str = ""
) -> None:
    """Fail with one line naming each key that is missing, unexpected or of the wrong shape."""
    missing = [prefix + key for key in expected if key not in state]
    unexpected = [prefix + key for key in state if key not in expected]
    wrong_shape = [
        f"{prefix}{key} {list(state[key].shape)} (expected {list(tensor.shape)})"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    problems = []
    if missing:
        no_noise = any(".noises." in f".{key}" for key in missing)
        hint = " (no noise buffers: convert the checkpoint with them; cfdeploy never invents noise)" if no_noise else ""
        problems.append(f"missing keys {listed(missing)}{hint}")
    if unexpected:
        problems.append(f"unexpected keys {listed(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes {listed(wrong_shape)}")
    if problems:
        raise CfdeployError(f"{source}: " + "; ".join(problems))


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path, prefix: str = "") -> None:
    """Load ``state`` into ``module`` after :func:`check_keys`, each tensor in the dtype the module gives it (float32
    weights, integer counters). The module takes the loaded tensors themselves where they have that dtype, rather than
    copies (a module built on the meta device needs no memory of its own first), so a 600 MB encoder is held once
    while it loads, not twice."""
    expected = module.state_dict()
    check_keys(expected, state, source, prefix)
    module.load_state_dict({key: value.to(expected[key].dtype) for key, value in state.items()}, assign=True)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def generator_config_from_state(state: dict[str, torch.Tensor], source: Path) -> GeneratorConfig:
    """Read the architecture off the tensors themselves, so any size and channel width loads."""
    try:
        style_dim = state["style.1.weight"].shape[0]
        n_mlp = sum(1 for key in state if re.fullmatch(r"style\.\d+\.weight", key))
        n_blocks = sum(1 for key in state if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", key))
        size = 2 ** (n_blocks + 2)
        max_channels = state["input.input"].shape[1]
        last_channels = state[f"to_rgbs.{n_blocks - 1}.conv.weight"].shape[2]
    except (KeyError, IndexError) as error:
        raise CfdeployError(f"{source}: not a StyleGAN2 generator state dict (no {error})") from None
    channel_multiplier = max(1, last_channels * size // 16384)
    return GeneratorConfig(size, style_dim, n_mlp, channel_multiplier, max_channels)


def build_generator(state: dict[str, torch.Tensor], source: Path, prefix: str = "") -> Generator:
    """The generator ``state`` describes, built on the meta device (its random init would be overwritten at once)
    and given the state's tensors."""
    config = generator_config_from_state(state, source)
    with torch.device("meta"):
        generator = Generator(config)
    load_strict(generator, state, source, prefix)
    return generator.eval()


@dataclass
class StyleGAN2Checkpoint:
    """A rosinality checkpoint: the EMA generator and, if stored, the mean W for truncation."""

    path: Path
    generator: Generator
    latent_avg: torch.Tensor | None


def load_stylegan2(path: Path) -> StyleGAN2Checkpoint:
    """The EMA generator (``g_ema``) and ``latent_avg`` of a rosinality checkpoint; its training state is not read."""
    return _stylegan2_from_content(safe_torch_load(path), path)


def _stylegan2_from_content(content: Any, path: Path) -> StyleGAN2Checkpoint:
    if not isinstance(content, dict) or "g_ema" not in content:
        raise CfdeployError(
            f"{path}: expected a rosinality StyleGAN2 checkpoint with 'g_ema', found {describe(content)}"
        )
    state = tensor_dict(content["g_ema"], path, "'g_ema'")
    require_finite_weights(state, path, prefix="g_ema.")
    latent_avg = content.get("latent_avg")
    if latent_avg is not None:
        latent_avg = tensor_dict({"latent_avg": latent_avg}, path, "'latent_avg'")["latent_avg"]
        require_finite_weights({"latent_avg": latent_avg}, path)
    with memory_guard(path):
        generator = build_generator(state, path, prefix="g_ema.")
    return StyleGAN2Checkpoint(path, generator, None if latent_avg is None else latent_avg.float().reshape(-1))


@dataclass
class CFClipCheckpoint:
    """A CF-CLIP checkpoint: the two trained mappers, the generator it was trained with, and ``opts``."""

    path: Path
    opts: dict[str, Any]
    generator: Generator
    text_mapper: FullTextMapper
    mapper: LevelsMapper
    mapper_config: MapperConfig = field(repr=False)

    @property
    def size(self) -> int:
        return self.generator.config.size

    @property
    def n_latent(self) -> int:
        return self.generator.config.n_latent

    @property
    def description(self) -> str | None:
        return self.opts.get("description")

    @property
    def source_text(self) -> str | None:
        return self.opts.get("source_text")

    def generator_sha256(self) -> str:
        """Hash of the generator weights as loaded (strictly, key for key): what bundles record and refit compares."""
        return weights_sha256(self.generator.state_dict())


def _trained_size(opts: Mapping[str, Any], path: Path) -> int | None:
    """``opts.stylegan_size`` as a whole number of pixels, if the checkpoint records it."""
    raw = opts.get("stylegan_size")
    if raw is None:
        return None
    try:
        size = float(raw)
    except (TypeError, ValueError):
        size = math.nan
    if isinstance(raw, bool) or math.isnan(size):
        raise CfdeployError(f"{path}: opts.stylegan_size {raw!r:.40} is not a number")
    if not size.is_integer():
        raise CfdeployError(f"{path}: opts.stylegan_size {raw!r:.40} is not a whole number of pixels")
    return int(size)


def _flag(opts: Mapping[str, Any], name: str, path: Path) -> bool:
    """A boolean ``opts`` field (argparse's store_true writes True/False): anything else, such as the string
    "False", would silently flip which mappers load, so it is refused."""
    value = opts.get(name, False)
    if not isinstance(value, bool):
        raise CfdeployError(f"{path}: opts.{name} must be true or false, found {value!r:.40}")
    return value


def load_cfclip(path: Path) -> CFClipCheckpoint:
    return _cfclip_from_content(safe_torch_load(path), path)


def load_generator(path: Path) -> Generator:
    """The generator of either a rosinality checkpoint (``g_ema``) or a CF-CLIP checkpoint (``decoder.*``), read once."""
    content = safe_torch_load(path)
    if isinstance(content, dict) and "g_ema" in content:
        return _stylegan2_from_content(content, path).generator
    if isinstance(content, dict) and "state_dict" in content:
        return _cfclip_from_content(content, path).generator
    raise CfdeployError(
        f"{path}: expected a StyleGAN2 generator (a rosinality checkpoint with 'g_ema', or a CF-CLIP checkpoint), "
        f"found {describe(content)}"
    )


def _cfclip_from_content(content: Any, path: Path) -> CFClipCheckpoint:
    if not isinstance(content, dict) or "state_dict" not in content:
        raise CfdeployError(
            f"{path}: expected a CF-CLIP checkpoint {{'state_dict', 'opts'}}, found {describe(content)}"
        )
    state = tensor_dict(content["state_dict"], path, "'state_dict'")
    opts = content.get("opts") or {}
    if not isinstance(opts, dict):
        opts = vars(opts) if isinstance(opts, argparse.Namespace) else {}
    if not any(key.startswith("decoder.") for key in state):
        raise CfdeployError(f"{path}: CF-CLIP checkpoint has no 'decoder.*' generator weights")
    trained_size = _trained_size(opts, path)
    require_finite_weights(state, path)

    with memory_guard(path):
        generator = build_generator(strip_prefix(state, "decoder."), path, prefix="decoder.")
    if trained_size is not None and trained_size != generator.config.size:
        raise CfdeployError(
            f"{path}: opts say stylegan_size {trained_size} but the generator weights are {generator.config.size} px"
        )
    n_latent = generator.config.n_latent
    mapper_config = MapperConfig(
        n_latent=n_latent,
        dim=generator.config.style_dim,
        no_coarse_mapper=_flag(opts, "no_coarse_mapper", path),
        no_medium_mapper=_flag(opts, "no_medium_mapper", path),
        no_fine_mapper=_flag(opts, "no_fine_mapper", path),
    )
    with torch.device("meta"):
        text_mapper, mapper = FullTextMapper(mapper_config), LevelsMapper(mapper_config)
    load_strict(text_mapper, strip_prefix(state, "text_mapper."), path, prefix="text_mapper.")
    load_strict(mapper, strip_prefix(state, "mapper."), path, prefix="mapper.")
    unknown = [key for key in state if key.split(".", 1)[0] not in {"decoder", "text_mapper", "mapper"}]
    if unknown:
        raise CfdeployError(f"{path}: unexpected keys {listed(unknown)}")
    return CFClipCheckpoint(path, dict(opts), generator, text_mapper.eval(), mapper.eval(), mapper_config)


def read_clip_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a CLIP weights file: OpenAI's TorchScript ``ViT-B-32.pt`` (fp16) or an open_clip state dict
    with the same key names (``.pt``/``.bin``/``.safetensors``)."""
    require_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            with memory_guard(path):
                return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CfdeployError(f"{path}: not a readable safetensors file: {error}") from None
    if is_torchscript_archive(path):
        return read_torchscript_state(path)
    content = safe_torch_load(path)
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    state = tensor_dict(content, path, "CLIP weights")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_clip(path: Path) -> ClipText:
    """CLIP ViT-B/32 from the user's weights file (see :func:`read_clip_state`): the text tower, strictly, and the
    visual tower if the file has one (refinement needs it), as float32."""
    state = read_clip_state(path)
    require_finite_weights(state, path)
    model = build_clip_for_weights()
    expected = model.state_dict()
    text_state = {key: value for key, value in state.items() if is_text_tower_key(key)}
    check_keys({key: value for key, value in expected.items() if is_text_tower_key(key)}, text_state, path)
    visual_expected = {key: value for key, value in expected.items() if key.startswith("visual.")}
    visual_state = {key: value for key, value in state.items() if key.startswith("visual.")}
    if visual_state:
        check_keys(visual_expected, visual_state, path)
    unknown = [key for key in state if key not in {*text_state, *visual_expected, "logit_scale", *OPENAI_METADATA_KEYS}]
    if unknown:
        raise CfdeployError(f"{path}: not CLIP ViT-B/32 weights: unexpected keys {listed(unknown)}")
    loaded = {**text_state, **visual_state}
    if "logit_scale" in state:
        loaded["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    model.load_state_dict({key: value.float() for key, value in loaded.items()}, strict=False)
    return ClipText(model, has_visual_weights=bool(visual_state)).eval()


E4E_ENCODER_TYPE = "Encoder4Editing"
E4E_PARTS = ("encoder", "decoder")


@dataclass
class E4ECheckpoint:
    """An e4e checkpoint (``e4e_ffhq_encode.pt``): the encoder with its mean W, and the generator it was trained
    against (its codes live in that generator's W+ space)."""

    path: Path
    opts: dict[str, Any]
    encoder: E4EEncoder
    generator: Generator
    latent_avg: torch.Tensor  # what the official inference adds to the codes: zeros unless opts.start_from_latent_avg

    @property
    def n_latent(self) -> int:
        return self.encoder.n_latent

    @property
    def style_dim(self) -> int:
        return self.encoder.style_dim

    def generator_sha256(self) -> str:
        """Hash of the ``decoder.*`` generator as loaded, comparable with :meth:`CFClipCheckpoint.generator_sha256`."""
        return weights_sha256(self.generator.state_dict())


def _e4e_latent_avg(content: dict[str, Any], opts: Mapping[str, Any], n_latent: int, path: Path) -> torch.Tensor:
    """The offset the official inference adds: ``latent_avg`` [n_latent, 512] if ``opts.start_from_latent_avg``."""
    if not opts.get("start_from_latent_avg"):
        return torch.zeros(n_latent, STYLE_DIM)
    if "latent_avg" not in content:
        raise CfdeployError(
            f"{path}: opts.start_from_latent_avg is set but the file has no latent_avg "
            "(the official code would sample a random one)"
        )
    latent_avg = tensor_dict({"latent_avg": content["latent_avg"]}, path, "'latent_avg'")["latent_avg"]
    if tuple(latent_avg.shape) != (n_latent, STYLE_DIM):
        raise CfdeployError(f"{path}: latent_avg is {list(latent_avg.shape)}, expected [{n_latent}, {STYLE_DIM}]")
    require_finite_weights({"latent_avg": latent_avg}, path)
    return latent_avg.float()


def load_e4e(path: Path) -> E4ECheckpoint:
    """The e4e encoder (``encoder.*``), its generator (``decoder.*``) and ``latent_avg``, strictly. The encoder has one
    style block per W+ level of the generator (18 at 1024 px), as the official code builds it from
    ``opts.stylegan_size``; ``opts.encoder_type`` must say Encoder4Editing (pSp's encoder has the same keys but
    computes its codes differently)."""
    content = safe_torch_load(path)
    if not isinstance(content, dict) or "state_dict" not in content:
        raise CfdeployError(
            f"{path}: expected an e4e checkpoint {{'state_dict', 'latent_avg', 'opts'}}, found {describe(content)}"
        )
    state = tensor_dict(content["state_dict"], path, "'state_dict'")
    opts = content.get("opts") or {}
    if isinstance(opts, argparse.Namespace):
        opts = vars(opts)
    if not isinstance(opts, dict) or opts.get("encoder_type") != E4E_ENCODER_TYPE:
        found = opts.get("encoder_type") if isinstance(opts, dict) else None
        raise CfdeployError(f"{path}: expected opts.encoder_type {E4E_ENCODER_TYPE!r}, found {found!r:.60}")
    unknown = [key for key in state if key.split(".", 1)[0] not in E4E_PARTS]
    if unknown:
        raise CfdeployError(f"{path}: unexpected keys {listed(unknown)}")
    if not any(key.startswith("decoder.") for key in state):
        raise CfdeployError(f"{path}: e4e checkpoint has no 'decoder.*' generator weights")
    trained_size = _trained_size(opts, path)
    with memory_guard(path):
        generator = build_generator(strip_prefix(state, "decoder."), path, prefix="decoder.")
        if trained_size is not None and trained_size != generator.config.size:
            raise CfdeployError(
                f"{path}: opts say stylegan_size {trained_size} but the generator weights are {generator.config.size} px"
            )
        n_latent, style_dim = generator.config.n_latent, generator.config.style_dim
        if n_latent <= MIDDLE_LEVELS or style_dim != STYLE_DIM:
            raise CfdeployError(
                f"{path}: e4e encodes into more than {MIDDLE_LEVELS} W+ levels of {STYLE_DIM}, its generator takes "
                f"{n_latent} of {style_dim}"
            )
        latent_avg = _e4e_latent_avg(content, opts, n_latent, path)
        # Built without weights (random init of ~270M parameters takes seconds), so the keys are checked at once
        # and it takes the file's tensors themselves.
        with torch.device("meta"):
            encoder = Encoder4Editing(n_latent)
        encoder_state = strip_prefix(state, "encoder.")
        check_keys(encoder.state_dict(), encoder_state, path, prefix="encoder.")
        require_finite_weights(state, path)
        load_strict(encoder, encoder_state, path, prefix="encoder.")
    return E4ECheckpoint(path, dict(opts), E4EEncoder(encoder, latent_avg).eval(), generator, latent_avg)


def load_arcface(path: Path) -> ArcFace:
    """ArcFace IR-SE-50 (``model_ir_se50.pth``, a bare state dict as the CF-CLIP and e4e repositories use it), strictly."""
    content = safe_torch_load(path)
    if not isinstance(content, dict) or "input_layer.0.weight" not in content:
        raise CfdeployError(
            f"{path}: expected the ArcFace IR-SE-50 state dict (model_ir_se50.pth), found {describe(content)}"
        )
    state = tensor_dict(content, path, "the ArcFace state dict")
    with memory_guard(path):
        with torch.device("meta"):
            arcface = ArcFace()
        check_keys(arcface.state_dict(), state, path)
        require_finite_weights(state, path)
        load_strict(arcface, state, path)
    return arcface.eval().requires_grad_(False)
