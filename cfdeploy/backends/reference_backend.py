"""``torch-reference``: the official formulation (grouped conv, upfirdn2d), the baseline users migrate from."""

from __future__ import annotations

import numpy as np
import torch

from cfdeploy.backends.torch_backend import TorchBackend
from cfdeploy.models import reference
from cfdeploy.models.mappers import EDIT_SCALE


class TorchReferenceBackend(TorchBackend):
    """The torch backend's loading and CLIP, but mappers and generator computed as the official code does."""

    name = "torch-reference"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generator_state = self.generator.state_dict()
        self.text_mapper_state = self.text_mapper.state_dict()
        self.mapper_state = self.editor.mapper.state_dict()
        groups = self.editor.mapper.groups
        self.opts = {f"no_{group}_mapper": group not in groups for group in ("coarse", "medium", "fine")}

    def text_latents(self, text_features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = reference.text_mapper(self.text_mapper_state, self._tensor(text_features, np.float32), self.n_latent)
        return out.cpu().numpy()

    def edit_latents(self, w: np.ndarray, text_latents: np.ndarray, strength: float) -> np.ndarray:
        with torch.inference_mode():
            w_t = self._tensor(w, np.float32)
            fused = torch.cat([w_t, self._tensor(np.broadcast_to(text_latents, w.shape), np.float32)], dim=2)
            delta = reference.levels_mapper(self.mapper_state, fused, self.opts)
            return (w_t + strength * EDIT_SCALE * delta).cpu().numpy()

    def synthesize(self, latents: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return reference.generator(self.generator_state, self._tensor(latents, np.float32)).cpu().numpy()
