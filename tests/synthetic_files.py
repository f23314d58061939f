"""Synthetic files in the official formats, built from the key/shape manifests in ../shared/spec.

Values are random but scaled like trained weights (equalised-lr layers store weight/lr_mul, modulation
biases start at 1, FIR kernels are the real ones), so activations stay in a realistic range.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

SHARED = Path(os.environ.get("CFDEPLOY_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MANIFESTS = SHARED / "spec" / "manifests"


def manifest(name: str) -> dict:
    path = MANIFESTS / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: the spec manifests are expected in ../shared beside the checkout")
    return json.loads(path.read_text())


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


def cfclip_checkpoint(size: int, seed: int = 0, **opts_overrides) -> dict:
    """``{'state_dict', 'opts'}`` like a CF-CLIP release file; disabled mapper groups drop their keys."""
    spec = manifest(f"cfclip_manifest_{size}.json")
    opts = {**spec["checkpoint_opts"], **opts_overrides}
    dropped = [
        prefix
        for flag, prefix in (
            ("no_coarse_mapper", "mapper.course_mapping."),
            ("no_medium_mapper", "mapper.medium_mapping."),
            ("no_fine_mapper", "mapper.fine_mapping."),
        )
        if opts.get(flag)
    ]
    keys = [entry for entry in spec["keys"] if not entry[0].startswith(tuple(dropped))]
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
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(name, torch.tensor(value))
    torch.jit.save(torch.jit.script(root), str(path))
