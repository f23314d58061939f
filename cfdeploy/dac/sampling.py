"""What a DAC edit is sampled from and with, whichever runtime samples it: the settings, the initial latents
(a seed's or a ``--noise`` file's), and the sampler interface."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cfdeploy.errors import CfdeployError, require_finite, require_range
from cfdeploy.files import read_npy, require_finite_array

SCHEDULERS = ("pndm", "ddim")
MAX_SAMPLES = 1024


@dataclass(frozen=True)
class PredictSettings:
    """The official defaults: β 1, guidance 4, 30 PNDM steps, seed 29; ``samples`` seeds in a row."""

    beta: float = 1.0
    guidance: float = 4.0
    steps: int = 30
    seed: int = 29
    samples: int = 8
    scheduler: str = "pndm"

    def __post_init__(self) -> None:
        require_finite(beta=self.beta, guidance=self.guidance)
        require_range(1, 1000, steps=self.steps)
        require_range(1, MAX_SAMPLES, samples=self.samples)
        require_range(0, 2**63 - 1 - self.samples, seed=self.seed)
        if self.scheduler not in SCHEDULERS:
            raise CfdeployError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.samples))


class Sampler(Protocol):
    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``[channels, side, side]`` of one sample's latents."""
        ...

    def seeded_latents(self, seed: int) -> tuple[np.ndarray, str]:
        """The initial latents ``[1, C, H, W]`` for ``seed`` and where they come from (for ``edit.json``)."""
        ...

    def sample(self, latents: np.ndarray, on_call: Callable[[int], None]) -> np.ndarray:
        """The edit from ``latents`` as ``[1, 3, H, W]`` in [0, 1]; ``on_call(t)`` before each UNet call."""
        ...


@dataclass(frozen=True)
class Draw:
    """One sample's initial latents, the PNG it becomes and where they come from."""

    name: str
    latents: np.ndarray
    source: str


@dataclass(frozen=True)
class NoiseFile:
    """``--noise``: finite float latents read before any model loads; their shape is checked once the model is open."""

    path: Path
    latents: np.ndarray

    @classmethod
    def read(cls, path: Path) -> NoiseFile:
        latents = read_npy(path, "initial latents")
        require_finite_array(latents, path, "initial latents")
        return cls(path, np.ascontiguousarray(latents, dtype=np.float32))

    def draws(self, latent_shape: tuple[int, ...]) -> list[Draw]:
        """One sample per latent: ``[N, C, H, W]``, or one sample's ``[C, H, W]``, of the model's latent shape."""
        latents = self.latents[None] if self.latents.ndim == len(latent_shape) else self.latents
        if latents.shape[1:] != tuple(latent_shape) or not 1 <= len(latents) <= MAX_SAMPLES:
            shape = ",".join(str(size) for size in latent_shape)
            raise CfdeployError(
                f"{self.path}: expected initial latents [N,{shape}] (N from 1 to {MAX_SAMPLES}) or [{shape}] "
                f"for this model, found {list(self.latents.shape)}"
            )
        return [
            Draw(f"noise_{index:04d}.png", latents[index : index + 1], f"file {self.path} [{index}]")
            for index in range(len(latents))
        ]


def seeded_draws(sampler: Sampler, settings: PredictSettings) -> list[Draw]:
    """One sample per seed of ``settings``, each from its own generator."""
    return [Draw(f"seed_{seed:04d}.png", *sampler.seeded_latents(seed)) for seed in settings.seeds]
