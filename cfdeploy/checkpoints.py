"""Loading the files users already have: CF-CLIP checkpoints and rosinality StyleGAN2 checkpoints.

Everything goes through ``torch.load(weights_only=True)``: a pickle that would run code is refused
before any of it runs. Loading is strict: missing or unexpected keys and wrong shapes are reported by
name, never filled in or skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cfdeploy.errors import CfdeployError
from cfdeploy.models.mappers import FullTextMapper, LevelsMapper, MapperConfig
from cfdeploy.models.stylegan2 import Generator, GeneratorConfig

# Classes real checkpoints contain besides tensors: rosinality's training checkpoints store ``args``.
ALLOWED_GLOBALS = [argparse.Namespace]
MAX_LISTED_KEYS = 4


def require_file(path: Path) -> Path:
    if not path.exists():
        raise CfdeployError(f"{path}: no such file")
    if not path.is_file():
        raise CfdeployError(f"{path}: expected a file, found a directory")
    return path


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives (OpenAI's CLIP ``.pt``) are zips carrying compiled code next to the data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 2)[1:2] == ["code"] for name in archive.namelist())


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and the small allow-list real checkpoints need."""
    require_file(path)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:
            raise CfdeployError(
                f"{path}: refused to load: it references {found.group(1)}, which could run code (only weights are loaded)"
            ) from None
        raise CfdeployError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): bad pickle data") from None
    except Exception as error:  # torch raises RuntimeError, KeyError, EOFError… for damaged files
        detail = str(error).split(".")[0].strip() or type(error).__name__
        raise CfdeployError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {detail}") from None


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """One hash over names, dtypes, shapes and values: equal weights hash equal whichever file holds them."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else "")


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
        problems.append(f"missing keys {_listed(missing)}{hint}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes {_listed(wrong_shape)}")
    if problems:
        raise CfdeployError(f"{source}: " + "; ".join(problems))


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path, prefix: str = "") -> None:
    """Load ``state`` into ``module`` as float32 after :func:`check_keys`."""
    check_keys(module.state_dict(), state, source, prefix)
    module.load_state_dict({key: value.float() for key, value in state.items()})


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


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
    generator = Generator(generator_config_from_state(state, source))
    load_strict(generator, state, source, prefix)
    return generator.eval()


@dataclass
class StyleGAN2Checkpoint:
    """A rosinality checkpoint: the EMA generator and, if stored, the mean W for truncation."""

    path: Path
    generator: Generator
    latent_avg: torch.Tensor | None


def load_stylegan2(path: Path) -> StyleGAN2Checkpoint:
    content = safe_torch_load(path)
    if not isinstance(content, dict) or "g_ema" not in content:
        raise CfdeployError(f"{path}: expected a rosinality StyleGAN2 checkpoint with 'g_ema', found {_describe(content)}")
    generator = build_generator(content["g_ema"], path, prefix="g_ema.")
    latent_avg = content.get("latent_avg")
    if latent_avg is not None:
        latent_avg = latent_avg.float().reshape(-1)
    return StyleGAN2Checkpoint(path, generator, latent_avg)


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


def _describe(content: Any) -> str:
    if isinstance(content, dict):
        return "a dict with keys " + _listed([str(key) for key in content])
    return f"a {type(content).__name__}"


def load_cfclip(path: Path) -> CFClipCheckpoint:
    content = safe_torch_load(path)
    if not isinstance(content, dict) or "state_dict" not in content:
        raise CfdeployError(f"{path}: expected a CF-CLIP checkpoint {{'state_dict', 'opts'}}, found {_describe(content)}")
    state = content["state_dict"]
    opts = content.get("opts") or {}
    if not isinstance(opts, dict):
        opts = vars(opts) if isinstance(opts, argparse.Namespace) else {}
    if not any(key.startswith("decoder.") for key in state):
        raise CfdeployError(f"{path}: CF-CLIP checkpoint has no 'decoder.*' generator weights")

    generator = build_generator(strip_prefix(state, "decoder."), path, prefix="decoder.")
    trained_size = opts.get("stylegan_size")
    if trained_size is not None and int(trained_size) != generator.config.size:
        raise CfdeployError(
            f"{path}: opts say stylegan_size {trained_size} but the generator weights are {generator.config.size} px"
        )
    n_latent = generator.config.n_latent
    mapper_config = MapperConfig(
        n_latent=n_latent,
        dim=generator.config.style_dim,
        no_coarse_mapper=bool(opts.get("no_coarse_mapper", False)),
        no_medium_mapper=bool(opts.get("no_medium_mapper", False)),
        no_fine_mapper=bool(opts.get("no_fine_mapper", False)),
    )
    text_mapper = FullTextMapper(mapper_config)
    load_strict(text_mapper, strip_prefix(state, "text_mapper."), path, prefix="text_mapper.")
    mapper = LevelsMapper(mapper_config)
    load_strict(mapper, strip_prefix(state, "mapper."), path, prefix="mapper.")
    unknown = [key for key in state if key.split(".", 1)[0] not in {"decoder", "text_mapper", "mapper"}]
    if unknown:
        raise CfdeployError(f"{path}: unexpected keys {_listed(unknown)}")
    return CFClipCheckpoint(path, dict(opts), generator, text_mapper.eval(), mapper.eval(), mapper_config)
