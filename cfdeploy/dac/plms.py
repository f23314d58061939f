"""DAC's sampling schedules in numpy: U's weight γ(t), the initial noise, and Stable Diffusion's default scheduler.

The scheduler is PNDM with ``skip_prk_steps`` (pseudo linear multistep), the torch-free runtime's: the same
timesteps and updates as diffusers' ``PNDMScheduler`` for an ε-predicting model. Each step turns the UNet's noise
estimate into x_{t−δ} with the DDIM-like transfer of PNDM's paper, after mixing the last noise estimates
Adams–Bashforth style (1, 2, 3, then 4 terms). The first step is taken twice, at t and again from t−δ (a Heun-like
start), so n steps make n + 1 UNet calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cfdeploy.dac.torch_randn import TorchCpuGenerator
from cfdeploy.errors import CfdeployError

SPACINGS = ("leading", "linspace", "trailing")
LAST_TIMESTEP = 999


def anneal(timestep: float, eta: float) -> float:
    """DAC's γ(t) = (1 − η)/999² · (t − 999)² + η: U's weight at a UNet call, η at t = 999 rising to 1 at t = 0."""
    return (1.0 - eta) / LAST_TIMESTEP**2 * (float(timestep) - LAST_TIMESTEP) ** 2 + eta


def beta_schedule(config: Mapping[str, Any]) -> np.ndarray:
    """The training noise schedule β_t, float32, as diffusers builds it (float32 linspace)."""
    count = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float32)
    if kind == "linear":
        return np.linspace(start, end, count, dtype=np.float32)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, count, dtype=np.float32) ** 2
    raise CfdeployError(f"scheduler beta_schedule {kind!r} is not supported (linear or scaled_linear)")


def noise_latents(seed: int, channels: int, side: int) -> np.ndarray:
    """The initial latents of a sample, ``[1, channels, side, side]``: what ``torch.randn`` draws from
    ``torch.Generator("cpu").manual_seed(seed)`` here, so that a bundle samples the PyTorch path's CPU edit."""
    return TorchCpuGenerator(seed).randn((1, channels, side, side))


class PlmsScheduler:
    """One sampling run's state: call :meth:`set_timesteps`, then :meth:`step` once per UNet call."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        if not config.get("skip_prk_steps", False):
            raise CfdeployError(
                "the scheduler config has skip_prk_steps false; only PNDM's PLMS form (Stable Diffusion's) is supported"
            )
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise CfdeployError(
                f"scheduler prediction_type {config.get('prediction_type')!r}: only epsilon is supported"
            )
        self.spacing = config.get("timestep_spacing", "leading")
        if self.spacing not in SPACINGS:
            raise CfdeployError(f"scheduler timestep_spacing {self.spacing!r} is not supported ({', '.join(SPACINGS)})")
        self.train_steps = int(config.get("num_train_timesteps", 1000))
        self.steps_offset = int(config.get("steps_offset", 0))
        self.alphas_cumprod = np.cumprod(1.0 - beta_schedule(config), dtype=np.float32)
        self.final_alpha_cumprod = np.float32(1.0) if config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.steps = 0
        self._history: list[np.ndarray] = []
        self._calls = 0
        self._first_sample: np.ndarray | None = None

    def set_timesteps(self, steps: int) -> np.ndarray:
        """The UNet calls' timesteps for ``steps`` steps (the second repeated), and a fresh state."""
        self.steps = steps
        grid: np.ndarray
        if self.spacing == "leading":
            grid = np.arange(0, steps) * (self.train_steps // steps) + self.steps_offset
        elif self.spacing == "linspace":
            grid = np.linspace(0, self.train_steps - 1, steps).round()
        else:
            grid = np.round(np.arange(self.train_steps, 0, -self.train_steps / steps))[::-1] - 1
        grid = grid.astype(np.int64)
        self.timesteps = np.concatenate([grid[:-1], grid[-2:-1], grid[-1:]])[::-1].copy()
        self._history, self._calls, self._first_sample = [], 0, None
        return self.timesteps

    def step(self, noise: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """x at the next timestep from the UNet's noise estimate at ``timestep``."""
        stride = self.train_steps // self.steps
        previous = timestep - stride
        if self._calls == 1:  # the repeated first step: from t − δ back to where it started
            previous, timestep = timestep, timestep + stride
        else:
            self._history = [*self._history[-3:], noise]
        history = self._history
        if len(history) == 1 and self._calls == 0:
            self._first_sample = sample
        elif len(history) == 1 and self._calls == 1 and self._first_sample is not None:
            noise = (noise + history[-1]) / 2
            sample, self._first_sample = self._first_sample, None
        elif len(history) == 2:
            noise = (3 * history[-1] - history[-2]) / 2
        elif len(history) == 3:
            noise = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
        else:
            noise = (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
        self._calls += 1
        return self._transfer(sample, timestep, previous, noise)

    def _transfer(self, sample: np.ndarray, timestep: int, previous: int, noise: np.ndarray) -> np.ndarray:
        """PNDM's transfer φ(x_t, ε, t, t−δ) (eq. 11 of its paper)."""
        alpha = self.alphas_cumprod[timestep]
        alpha_previous = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        beta, beta_previous = 1 - alpha, 1 - alpha_previous
        sample_coefficient = (alpha_previous / alpha) ** 0.5
        denominator = alpha * beta_previous**0.5 + (alpha * beta * alpha_previous) ** 0.5
        result: np.ndarray = sample_coefficient * sample - (alpha_previous - alpha) * noise / denominator
        return result.astype(np.float32)
