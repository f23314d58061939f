"""Optional refinement: a few steps of latent optimisation with the paper's CLIP-NCE loss.

The mapper edits in one pass; when a counterfactual prompt is not reached, the edited latent is
optimised further for that image, through the differentiable torch generator, to minimise
``NCE + L * mean((w - w_hat)^2)``. Only the latent receives gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cfdeploy.errors import CfdeployError
from cfdeploy.models.clip_text import ClipText, encode_text_to_last_end, import_open_clip
from cfdeploy.models.mappers import LEVEL_GROUPS
from cfdeploy.models.stylegan2 import Generator
from cfdeploy.tokenizer import ClipTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_RESOLUTION = 224
# CF-CLIP (after StyleGAN-NADA) uses OpenAI's 80 ImageNet templates without "a photo of many {}.".
EXCLUDED_TEMPLATE = "a photo of many {}."


def nce_templates() -> list[str]:
    import_open_clip()
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [text for text in (template("{}") for template in OPENAI_IMAGENET_TEMPLATES) if text != EXCLUDED_TEMPLATE]


def perspective_endpoints(width: int, height: int, distortion: float, generator: torch.Generator) -> list[list[int]]:
    """Corner targets of a random perspective warp, drawn like torchvision's RandomPerspective."""
    dx, dy = int(distortion * (width // 2)), int(distortion * (height // 2))

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=generator))

    return [
        [draw(0, dx + 1), draw(0, dy + 1)],
        [draw(width - dx - 1, width), draw(0, dy + 1)],
        [draw(width - dx - 1, width), draw(height - dy - 1, height)],
        [draw(0, dx + 1), draw(height - dy - 1, height)],
    ]


def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy with the positive as class 0 against shared negatives, all L2-normalised."""
    query, positive, negatives = (F.normalize(x, dim=-1) for x in (query, positive, negatives))
    logits = torch.cat([(query * positive).sum(-1, keepdim=True), query @ negatives.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


class ClipNCELoss(nn.Module):
    """CF-CLIP's contrastive loss between an edited image x_hat and its source x.

    query = n(f(aug(x_hat)) - f(x)); positives n(mean_t(T_tgt - T_src)) and n(mean_t(T_tgt) - f(x));
    negatives n(T_src,t - f(x_0)) for every template t; InfoNCE at temperature 0.1, each query
    meeting both positives.
    """

    source_text: torch.Tensor  # buffers: template features of the source and target prompts, CLIP's pixel statistics
    target_mean: torch.Tensor
    text_direction: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        clip: ClipText,
        source_text: str,
        target_text: str,
        augmentations: int = 8,
        distortion: float = 0.5,
        temperature: float = 0.1,
        tokenizer: ClipTokenizer | None = None,
    ) -> None:
        super().__init__()
        if not clip.has_visual_weights:
            raise CfdeployError(
                "refinement needs CLIP's image encoder, but the CLIP weights file has no visual.* weights"
            )
        self.clip = clip.clip
        self.augmentations = augmentations
        self.distortion = distortion
        self.temperature = temperature
        tokenizer = tokenizer or ClipTokenizer()
        source, target = (self.template_features(text, tokenizer) for text in (source_text, target_text))
        self.register_buffer("source_text", source)
        self.register_buffer("target_mean", target.mean(0, keepdim=True))
        self.register_buffer("text_direction", F.normalize((target - source).mean(0, keepdim=True), dim=-1))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    @torch.no_grad()
    def template_features(self, text: str, tokenizer: ClipTokenizer) -> torch.Tensor:
        tokens = torch.from_numpy(tokenizer([template.format(text) for template in nce_templates()]))
        device = next(self.clip.parameters()).device
        return F.normalize(encode_text_to_last_end(self.clip, tokens.to(device)).float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Generator output in [-1, 1] → CLIP's preprocessing on tensors → L2-normalised features."""
        unit = (images + 1) / 2
        resized = F.interpolate(unit, size=CLIP_RESOLUTION, mode="bicubic", align_corners=False, antialias=True)
        return F.normalize(self.clip.encode_image((resized - self.mean) / self.std).to(images.dtype), dim=-1)

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import perspective

        height, width = images.shape[-2:]
        corners = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
        return torch.cat(
            [
                perspective(
                    images,
                    corners,
                    perspective_endpoints(width, height, self.distortion, generator),
                    InterpolationMode.BILINEAR,
                    fill=[0.0],
                )
                for _ in range(self.augmentations)
            ]
        )

    def forward(self, edited: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        source_features = self.image_features(source).repeat(self.augmentations, 1)
        return self.loss_from_features(self.image_features(self.augment(edited, generator)), source_features)

    def loss_from_features(self, edited_features: torch.Tensor, source_features: torch.Tensor) -> torch.Tensor:
        """The NCE formula on normalised image features of the augmented edits and their (repeated) sources."""
        query = edited_features - source_features
        positives = torch.cat([self.text_direction.expand_as(query), self.target_mean - source_features])
        negatives = self.source_text - source_features[:1]
        return info_nce(query.repeat(2, 1), positives, negatives, self.temperature)


def level_mask(n_latent: int, layers: str) -> torch.Tensor:
    """Which W+ levels refinement may move: all, coarse (0-3), medium (4-7) or fine (8+)."""
    if layers == "all":
        return torch.ones(n_latent, 1)
    mask = torch.zeros(n_latent, 1)
    mask[LEVEL_GROUPS[layers]] = 1
    return mask


@dataclass
class RefineSettings:
    steps: int
    lr: float = 0.01
    l2: float = 0.8
    source_text: str = "face"
    layers: str = "all"
    patience: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise CfdeployError(f"--refine-steps must be 0 or more, got {self.steps}")
        if self.layers != "all" and self.layers not in LEVEL_GROUPS:
            raise CfdeployError(f"--refine-layers {self.layers!r}: expected all, coarse, medium or fine")


@dataclass
class Refiner:
    """Refines edited latents batch by batch; keeps every batch's loss curve."""

    generator: Generator
    loss: ClipNCELoss
    settings: RefineSettings
    curves: list[list[float]] = field(default_factory=list)
    on_step: Callable[[float], None] = lambda loss: None

    def __call__(self, w: np.ndarray, w_hat: np.ndarray) -> np.ndarray:
        refined, curve = refine_latents(self.generator, self.loss, w, w_hat, self.settings, self.on_step)
        self.curves.append(curve)
        return refined


def refine_latents(
    generator: Generator,
    loss_fn: ClipNCELoss,
    w: np.ndarray,
    w_hat: np.ndarray,
    settings: RefineSettings,
    on_step: Callable[[float], None] = lambda loss: None,
) -> tuple[np.ndarray, list[float]]:
    """Minimise NCE + L * mean((w' - w_hat)^2) over w' from w_hat; returns the best w' and the loss curve."""
    if settings.steps == 0:
        return w_hat, []
    device = next(generator.parameters()).device
    for module in (generator, loss_fn):
        module.requires_grad_(False)
    start = torch.from_numpy(np.ascontiguousarray(w_hat, np.float32)).to(device)
    mask = level_mask(start.shape[1], settings.layers).to(device)
    offset = torch.zeros_like(start, requires_grad=True)
    optimizer = torch.optim.Adam([offset], lr=settings.lr)
    with torch.no_grad():
        source = generator(torch.from_numpy(np.ascontiguousarray(w, np.float32)).to(device))
    best, best_loss, stale, curve = start.clone(), math.inf, 0, []
    for _ in range(settings.steps):
        latent = start + mask * offset
        # The same seeded warps every step: a fixed objective, so "the loss stopped improving" means something.
        warps = torch.Generator().manual_seed(settings.seed)
        loss = loss_fn(generator(latent), source, warps) + settings.l2 * (mask * offset).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        curve.append(value)
        on_step(value)
        stale = 0 if value < best_loss - 1e-4 * abs(best_loss) else stale + 1
        if value < best_loss:
            best, best_loss = latent.detach().clone(), value
        if stale >= settings.patience:
            break
    return best.cpu().numpy(), curve


def refiner_for(
    backend: object,
    settings: RefineSettings,
    target: str,
    checkpoint: Path | None = None,
    clip_weights: Path | None = None,
) -> Refiner:
    """A refiner over the torch models, whichever backend made the feed-forward edit.

    A torch backend lends its generator and CLIP (loaded with their image encoder); a bundle backend
    has no differentiable models, so refinement loads them from ``checkpoint`` and ``clip_weights``.
    """
    generator = getattr(backend, "generator", None)
    clip = getattr(backend, "clip", None)
    if not isinstance(generator, Generator) or clip is None:
        if checkpoint is None or clip_weights is None:
            raise CfdeployError(
                "refinement with a bundle needs the torch models too: pass --checkpoint and --clip-weights"
            )
        from cfdeploy.checkpoints import load_cfclip, load_clip

        device = "cuda" if torch.cuda.is_available() else "cpu"
        generator, clip = load_cfclip(checkpoint).generator.to(device), load_clip(clip_weights).to(device)
    loss = ClipNCELoss(clip, settings.source_text, target).to(next(generator.parameters()).device)
    return Refiner(generator, loss, settings)
