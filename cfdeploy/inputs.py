"""Reading and validating latent codes and text embeddings (numpy at the boundary; torch only for .pt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cfdeploy.errors import CfdeployError


def _read_array(path: Path, what: str) -> np.ndarray:
    if not path.exists():
        raise CfdeployError(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise CfdeployError(f"{path}: not a readable .npy {what}: {error}") from None
    try:
        from cfdeploy.checkpoints import safe_torch_load
    except ImportError:
        raise CfdeployError(f"{path}: reading torch-saved {what} needs the 'export' extra; save it as .npy") from None
    content = safe_torch_load(path)
    import torch

    if not isinstance(content, torch.Tensor):
        raise CfdeployError(f"{path}: expected a tensor of {what}, found a {type(content).__name__}")
    return content.detach().float().cpu().numpy()


def _require_finite(array: np.ndarray, path: Path, what: str) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        raise CfdeployError(f"{path}: expected floating-point {what}, found dtype {array.dtype}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise CfdeployError(f"{path}: {what} contain {int(bad.sum())} NaN/inf values")


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
    _require_finite(latents, path, "latents")
    return broadcast_latents(latents, n_latent, style_dim, str(path))


def load_text_embedding(path: Path, n_latents: int, dim: int = 512) -> np.ndarray:
    """Unnormalised CLIP text features ``[dim]`` or ``[1|N, dim]``, as float32 ``[1|N, dim]``."""
    features = _read_array(path, "text features")
    _require_finite(features, path, "text features")
    if features.ndim == 1:
        features = features[None, :]
    if features.ndim != 2 or features.shape[1] != dim:
        raise CfdeployError(f"{path}: expected text features [{dim}] or [N,{dim}], found {list(features.shape)}")
    if features.shape[0] not in (1, n_latents):
        raise CfdeployError(
            f"{path}: {features.shape[0]} text embeddings match neither 1 (one prompt for all) "
            f"nor the {n_latents} latents"
        )
    return np.ascontiguousarray(features, dtype=np.float32)


def seeded_z(seed: int, count: int, style_dim: int = 512) -> np.ndarray:
    """Gaussian z for ``--seed/--num``, from numpy so every backend draws the same codes."""
    return np.random.default_rng(seed).standard_normal((count, style_dim)).astype(np.float32)
