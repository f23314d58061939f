"""DAC's action and prediction, as the official ``inference_t.py`` samples.

P′ and the empty negative prompt are both encoded with Δ at weight −β (and T at +1 in the ``t``
variant); sampling starts from noise (no inversion of the image), with classifier-free guidance and
U's weight set to γ(t) before every UNet call; the base model's PNDM scheduler (PLMS) by default, so
30 steps are 31 UNet calls. The loop is written out so that each call's weight is explicit; with fixed
weights it is diffusers' ``StableDiffusionPipeline`` step for step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfdeploy.dac import lora
from cfdeploy.dac.base_model import (
    BaseModel,
    check_same_base_model,
    inspect_base_model,
    load_base_model,
)
from cfdeploy.dac.plms import anneal, noise_latents
from cfdeploy.dac.run import (
    SOURCE_TEXT_LORA,
    TEXT_LORA,
    UNET_LORA,
    DacRun,
    read_run,
    versions,
)
from cfdeploy.errors import CfdeployError, require_finite, require_range
from cfdeploy.outputs import StagedDirectory

SCHEDULERS = ("pndm", "ddim")
CONTACT_SHEET = "contact_sheet.png"


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


def text_adapter_weights(variant: str, beta: float) -> dict[str, float]:
    """The text encoder's adapters at prediction: Δ at −β, and T at +1 in the ``t`` variant."""
    weights = {lora.EDIT_ADAPTER: -beta}
    if variant == "t":
        weights[lora.SOURCE_ADAPTER] = 1.0
    return weights


@torch.no_grad()
def encode(base: BaseModel, prompt: str, adapters: Mapping[str, float]) -> torch.Tensor:
    """The text encoder's last hidden states ``[1, 77, D]`` for ``prompt`` with ``adapters`` at their weights."""
    lora.activate(base.text_encoder, list(adapters))
    for name, value in adapters.items():
        lora.set_weight(base.text_encoder, name, value)
    device = next(base.text_encoder.parameters()).device
    hidden: torch.Tensor = base.text_encoder(base.tokens(prompt).to(device))[0]
    return hidden


def edit_embeddings(base: BaseModel, target: str, adapters: Mapping[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond): P′ and "" both through the edited text encoder, as the official prediction encodes them."""
    return encode(base, target, adapters), encode(base, "", adapters)


def make_scheduler(config: Mapping[str, Any], kind: str) -> Any:
    """The base model's scheduler (PNDM for Stable Diffusion) or DDIM built from the same config."""
    from diffusers import DDIMScheduler, PNDMScheduler

    scheduler_class = {"pndm": PNDMScheduler, "ddim": DDIMScheduler}[kind]
    return scheduler_class.from_config(dict(config))


def initial_latents(base: BaseModel, seed: int, resolution: int) -> torch.Tensor:
    """Standard normal ``[1, 4, res/8, res/8]`` from numpy's generator seeded ``seed``: the same on every device and
    backend (the official script's CUDA generator cannot be reproduced elsewhere anyway)."""
    return torch.from_numpy(noise_latents(seed, base.info.latent_channels, resolution // base.info.vae_scale_factor))


@torch.no_grad()
def sample(
    base: BaseModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    latents: torch.Tensor,
    settings: PredictSettings,
    unet_weight: Callable[[int], float],
    on_call: Callable[[int], None] = lambda timestep: None,
) -> torch.Tensor:
    """One edited image ``[1, 3, H, W]`` in [0, 1] from ``latents``; U's weight is ``unet_weight(t)`` at each call."""
    device = cond.device
    scheduler = make_scheduler(base.info.configs["scheduler"], settings.scheduler)
    scheduler.set_timesteps(settings.steps, device=device)
    latents = latents.to(device) * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])
    step_options = {"eta": 0.0} if settings.scheduler == "ddim" else {}
    for timestep in scheduler.timesteps:
        lora.set_weight(base.unet, lora.UNET_ADAPTER, unet_weight(int(timestep)))
        on_call(int(timestep))
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
        noise = base.unet(model_input, timestep, encoder_hidden_states=context).sample
        noise_uncond, noise_cond = noise.chunk(2)
        noise = noise_uncond + settings.guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, timestep, latents, **step_options).prev_sample
    image = base.vae.decode(latents / base.info.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """``[1, 3, H, W]`` in [0, 1] → ``[H, W, 3]`` uint8, rounded as diffusers' ``numpy_to_pil`` rounds."""
    array = image[0].permute(1, 2, 0).float().cpu().numpy()
    pixels: np.ndarray = (array * 255).round().astype(np.uint8)
    return pixels


def contact_sheet(images: list[np.ndarray], columns: int = 4) -> np.ndarray:
    """Images ``[H, W, 3]`` side by side in rows of ``columns``, black where a row is short."""
    height, width, _ = images[0].shape
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    sheet = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        sheet[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    return sheet


def load_run_adapters(base: BaseModel, run: DacRun) -> None:
    """U into the UNet, Δ (and T) into the text encoder, each checked to fill every adapted layer."""
    lora.load_adapter(run.file(UNET_LORA), base.unet, lora.UNET_ADAPTER, lora.UNET_TARGETS)
    lora.activate(base.unet, [lora.UNET_ADAPTER])
    lora.load_adapter(run.file(TEXT_LORA), base.text_encoder, lora.EDIT_ADAPTER, lora.TEXT_TARGETS)
    if run.variant == "t":
        lora.load_adapter(run.file(SOURCE_TEXT_LORA), base.text_encoder, lora.SOURCE_ADAPTER, lora.TEXT_TARGETS)


def edit(
    run_path: Path,
    out: Path,
    settings: PredictSettings,
    *,
    base_model: Path | None = None,
    device: str = "cpu",
    force: bool = False,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_sample: Callable[[int], None] = lambda seed: None,
) -> dict[str, Any]:
    """Sample the run's edit for each seed into ``out``: one PNG per seed, a contact sheet and ``edit.json``."""
    run = read_run(run_path)
    recorded = run.manifest["base_model"]
    on_stage("hashing the base model")
    info = inspect_base_model(base_model or Path(str(recorded.get("path"))))
    check_same_base_model(info, recorded, run_path)
    run_settings = run.settings
    with StagedDirectory(out, force, inputs=[run_path]) as staged:
        on_stage("loading the base model")
        base = load_base_model(info, device)
        load_run_adapters(base, run)
        cond, uncond = edit_embeddings(base, run_settings["target"], text_adapter_weights(run.variant, settings.beta))
        eta = float(run_settings["eta"])
        images: list[np.ndarray] = []
        seconds: list[float] = []
        timesteps: list[int] = []
        for seed in settings.seeds:
            started = time.perf_counter()
            timesteps.clear()
            latents = initial_latents(base, seed, int(run_settings["resolution"]))
            image = sample(base, cond, uncond, latents, settings, lambda t: anneal(t, eta), timesteps.append)
            pixels = to_pixels(image)
            staged.write_png(f"seed_{seed:04d}.png", pixels)
            images.append(pixels)
            seconds.append(time.perf_counter() - started)
            on_sample(seed)
        staged.write_png(CONTACT_SHEET, contact_sheet(images))
        report = {
            "run": str(run_path),
            "prompt": run_settings["prompt"],
            "target": run_settings["target"],
            "eta": eta,
            "settings": asdict(settings),
            "seeds": settings.seeds,
            "unet_timesteps": timesteps,
            "base_model": info.identity(),
            "device": device,
            "seconds_per_sample": seconds,
            "versions": versions(),
        }
        staged.write_json("edit.json", report)
    return report
