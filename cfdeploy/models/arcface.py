"""ArcFace IR-SE-50 (``model_ir_se50.pth``): the face-identity network of CF-CLIP's identity loss.

The same IR-SE-50 body as e4e's encoder (:mod:`cfdeploy.models.e4e`), with the 112 px recognition head:
BatchNorm, (inference) dropout, flatten, a linear layer to 512, BatchNorm1d, L2 normalisation. Module
names follow the official ``Backbone(112, 50, 'ir_se')`` so its state dict loads strictly. It is frozen
and always in inference mode; gradients flow through it to the edited image.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cfdeploy.contracts import IDENTITY_DIM, IDENTITY_IMAGE_SIZE
from cfdeploy.models.e4e import IR_SE_50_STAGES, BottleneckIRSE, InferenceBatchNorm2d

FACE_SIZE = 112
EMBEDDING_DIM = IDENTITY_DIM
HEAD_SPATIAL = 7  # 112 px halved four times
# The official identity loss first brings images to 256 px, then keeps this window (the face) and pools it to 112.
ID_POOL_SIZE = IDENTITY_IMAGE_SIZE
ID_CROP = (slice(35, 223), slice(32, 220))


class InferenceBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d on its running statistics, whatever ``train()`` says."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ArcFace(nn.Module):
    """Faces ``[B, 3, 112, 112]`` in [-1, 1] to unit-length identity embeddings ``[B, 512]``."""

    def __init__(self) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), InferenceBatchNorm2d(64), nn.PReLU(64))
        self.body = nn.Sequential(
            *(
                BottleneckIRSE(in_channels if unit == 0 else out_channels, out_channels, 2 if unit == 0 else 1)
                for in_channels, out_channels, count in IR_SE_50_STAGES
                for unit in range(count)
            )
        )
        # Dropout(0.6) sits at index 1 in the official head; in inference it is the identity.
        self.output_layer = nn.Sequential(
            InferenceBatchNorm2d(EMBEDDING_DIM),
            nn.Identity(),
            nn.Flatten(),
            nn.Linear(EMBEDDING_DIM * HEAD_SPATIAL * HEAD_SPATIAL, EMBEDDING_DIM),
            InferenceBatchNorm1d(EMBEDDING_DIM),
        )

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        features = self.output_layer(self.body(self.input_layer(faces)))
        return features / features.norm(dim=1, keepdim=True)


def face_features(arcface: ArcFace, images: torch.Tensor) -> torch.Tensor:
    """Images at 256 px to ArcFace embeddings: the official identity loss's face window, pooled to 112 px."""
    rows, cols = ID_CROP
    return arcface(F.adaptive_avg_pool2d(images[:, :, rows, cols], FACE_SIZE))


def identity_features(arcface: ArcFace, images: torch.Tensor) -> torch.Tensor:
    """Generator output at any size to ArcFace embeddings, cropped and pooled as the official identity loss does."""
    if images.shape[-1] != ID_POOL_SIZE:
        images = F.adaptive_avg_pool2d(images, ID_POOL_SIZE)
    return face_features(arcface, images)


class IdentityNetwork(nn.Module):
    """A bundle's ``identity`` graph: :func:`face_features` of images already pooled to 256 px (the host pools the
    generator's images, whatever their size; :mod:`cfdeploy.identity`)."""

    def __init__(self, arcface: ArcFace) -> None:
        super().__init__()
        self.arcface = arcface

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return face_features(self.arcface, images)


def identity_loss(arcface: ArcFace, edited: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(ArcFace(edited), ArcFace(source))``; the source side carries no gradient."""
    target = identity_features(arcface, source).detach()
    return (1 - (identity_features(arcface, edited) * target).sum(dim=1)).mean()
