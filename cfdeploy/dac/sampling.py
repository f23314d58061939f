"""What a DAC edit is sampled with, whichever runtime samples it: the settings and the sampler interface."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cfdeploy.errors import CfdeployError, require_finite, require_range

SCHEDULERS = ("pndm", "ddim")


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
        require_range(1, 1024, samples=self.samples)
        require_range(0, 2**63 - 1 - self.samples, seed=self.seed)
        if self.scheduler not in SCHEDULERS:
            raise CfdeployError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.samples))


class Sampler(Protocol):
    def sample(self, seed: int, on_call: Callable[[int], None]) -> np.ndarray:
        """The edit for ``seed`` as ``[1, 3, H, W]`` in [0, 1]; ``on_call(t)`` before each UNet call."""
        ...
