"""Latent codes and text features from users' files, checked for the shapes an edit needs.

The generic readers (regular files, ``.npy`` headers, finiteness) are :mod:`cfdeploy.files`; torch-saved
tensors go through :func:`cfdeploy.torchfiles.safe_torch_load`, only when a ``.pt`` is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cfdeploy.errors import CfdeployError
from cfdeploy.files import read_npy, require_finite_array


def _read_array(path: Path, what: str) -> np.ndarray:
    if path.suffix == ".npy":
        return read_npy(path, what)
    try:
        from cfdeploy.torchfiles import safe_torch_load
    except ImportError:
        raise CfdeployError(f"{path}: reading torch-saved {what} needs the 'export' extra; save it as .npy") from None
    content = safe_torch_load(path)
    import torch

    if not isinstance(content, torch.Tensor):
        raise CfdeployError(f"{path}: expected a tensor of {what}, found a {type(content).__name__}")
    return content.detach().float().cpu().numpy()


def broadcast_latents(latents: np.ndarray, n_latent: int, style_dim: int, source: str) -> np.ndarray:
    """W+ ``[N, n, dim]`` as is; W ``[N, dim]`` repeated to every level."""
    if latents.ndim not in (2, 3) or latents.shape[-1] != style_dim:
        raise CfdeployError(
            f"{source}: expected latents [N,{n_latent},{style_dim}] (W+) or [N,{style_dim}] (W), "
            f"found {list(latents.shape)}"
        )
    if latents.ndim == 3 and latents.shape[1] != n_latent:
        raise CfdeployError(
            f"{source}: latents have {latents.shape[1]} levels, the generator needs {n_latent} "
            f"(shape {list(latents.shape)})"
        )
    if latents.shape[0] == 0:
        raise CfdeployError(f"{source}: latents are empty (shape {list(latents.shape)})")
    if latents.ndim == 2:
        latents = np.repeat(latents[:, None, :], n_latent, axis=1)
    return np.ascontiguousarray(latents, dtype=np.float32)


def load_latents(path: Path, n_latent: int, style_dim: int = 512) -> np.ndarray:
    """Latent codes from ``.npy`` or a torch-saved tensor, as float32 W+ ``[N, n_latent, dim]``."""
    latents = _read_array(path, "latents")
    require_finite_array(latents, path, "latents")
    return broadcast_latents(latents, n_latent, style_dim, str(path))


def load_text_embedding(path: Path, n_latents: int, dim: int = 512) -> np.ndarray:
    """Unnormalised CLIP text features ``[dim]`` or ``[1|N, dim]``, as float32 ``[1|N, dim]``."""
    return check_text_embedding(_read_array(path, "text features"), n_latents, dim, str(path))


def check_text_embedding(features: np.ndarray, n_latents: int, dim: int, source: str) -> np.ndarray:
    """Finite text features ``[dim]`` or ``[1|N, dim]`` as float32 ``[1|N, dim]``, or one line naming ``source``."""
    require_finite_array(features, source, "text features")
    if features.ndim == 1:
        features = features[None, :]
    if features.ndim != 2 or features.shape[1] != dim:
        raise CfdeployError(f"{source}: expected text features [{dim}] or [N,{dim}], found {list(features.shape)}")
    if features.shape[0] not in (1, n_latents):
        raise CfdeployError(
            f"{source}: {features.shape[0]} text embeddings match neither 1 (one prompt for all) "
            f"nor the {n_latents} latents"
        )
    return np.ascontiguousarray(features, dtype=np.float32)


def seeded_z(seed: int, count: int, style_dim: int = 512) -> np.ndarray:
    """Gaussian z for ``--seed/--num``, from numpy so every backend draws the same codes."""
    return np.random.default_rng(seed).standard_normal((count, style_dim)).astype(np.float32)
