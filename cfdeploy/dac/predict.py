"""DAC's action and prediction, as the official ``inference_t.py`` samples.

P′ and the empty negative prompt are both encoded with Δ at weight −β (and T at +1 in the ``t``
variant); sampling starts from noise (no inversion of the image), with classifier-free guidance and
U's weight set to γ(t) before every UNet call; the base model's PNDM scheduler (PLMS) by default, so
30 steps are 31 UNet calls. The loop is written out so that each call's weight is explicit; with fixed
weights it is diffusers' ``StableDiffusionPipeline`` step for step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfdeploy.dac import lora
from cfdeploy.dac.base_model import (
    BaseModel,
    BaseModelInfo,
    check_same_base_model,
    inspect_base_model,
    load_base_model,
)
from cfdeploy.dac.plms import anneal
from cfdeploy.dac.run import (
    DESCRIBED_SETTINGS,
    SOURCE_TEXT_LORA,
    TEXT_LORA,
    UNET_LORA,
    DacRun,
    read_edit_embeddings,
    read_run,
)
from cfdeploy.dac.sampling import PredictSettings


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


def latent_shape(base: BaseModel, resolution: int) -> tuple[int, int, int]:
    """``[channels, side, side]`` of one sample's latents at ``resolution``."""
    side = resolution // base.info.vae_scale_factor
    return base.info.latent_channels, side, side


def initial_latents(base: BaseModel, seed: int, resolution: int, device: str = "cpu") -> torch.Tensor:
    """The official draw: ``torch.randn([1, C, res/8, res/8])`` on ``device`` from ``torch.Generator(device)`` seeded
    ``seed`` (the paper's latents for seed 29 on CUDA; a bundle draws the CPU generator's)."""
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn((1, *latent_shape(base, resolution)), generator=generator, device=device)


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


def load_run_adapters(base: BaseModel, run: DacRun) -> None:
    """U into the UNet, Δ (and T) into the text encoder, each checked to fill every adapted layer."""
    lora.load_adapter(run.file(UNET_LORA), base.unet, lora.UNET_ADAPTER, lora.UNET_TARGETS)
    lora.activate(base.unet, [lora.UNET_ADAPTER])
    lora.load_adapter(run.file(TEXT_LORA), base.text_encoder, lora.EDIT_ADAPTER, lora.TEXT_TARGETS)
    if run.settings.variant == "t":
        lora.load_adapter(run.file(SOURCE_TEXT_LORA), base.text_encoder, lora.SOURCE_ADAPTER, lora.TEXT_TARGETS)


class TorchSampler:
    """Samples a run's edit with the PyTorch models (``dac edit RUN``)."""

    def __init__(self, run: DacRun, info: BaseModelInfo, settings: PredictSettings, device: str) -> None:
        self.base = load_base_model(info, device)
        load_run_adapters(self.base, run)
        self.settings = settings
        self.device = device
        self.eta = run.settings.eta
        self.resolution = run.settings.resolution
        self.latent_shape = latent_shape(self.base, self.resolution)
        if settings.beta == 1.0:
            shape = (1, self.base.tokenizer.model_max_length, int(info.configs["text_encoder"]["hidden_size"]))
            self.cond, self.uncond = (torch.from_numpy(array).to(device) for array in read_edit_embeddings(run, shape))
        else:
            self.cond, self.uncond = edit_embeddings(
                self.base, run.settings.target, text_adapter_weights(run.settings.variant, settings.beta)
            )

    def seeded_latents(self, seed: int) -> tuple[np.ndarray, str]:
        latents: np.ndarray = initial_latents(self.base, seed, self.resolution, self.device).cpu().numpy()
        return latents, f"torch.Generator({self.device}) seed {seed}"

    def sample(self, latents: np.ndarray, on_call: Callable[[int], None]) -> np.ndarray:
        image = sample(
            self.base,
            self.cond,
            self.uncond,
            torch.from_numpy(latents),
            self.settings,
            lambda t: anneal(t, self.eta),
            on_call,
        )
        unit: np.ndarray = image.float().cpu().numpy()
        return unit


def open_run(
    run_path: Path, settings: PredictSettings, base_model: Path | None, device: str, on_stage: Callable[[str], None]
) -> tuple[TorchSampler, dict[str, Any]]:
    """A sampler for the run at ``run_path`` on its own base model (checked by hash), and what ``edit.json`` records of it."""
    from cfdeploy.devices import torch_device

    torch_device(device)
    run = read_run(run_path)
    recorded = run.manifest["base_model"]
    on_stage("hashing the base model")
    info = inspect_base_model(base_model or Path(str(recorded.get("path"))))
    check_same_base_model(info, recorded, run_path)
    on_stage("loading the base model")
    sampler = TorchSampler(run, info, settings, device)
    return sampler, {
        "run": str(run_path),
        "backend": "torch",
        "device": device,
        "base_model": info.identity(),
        **{key: getattr(run.settings, key) for key in DESCRIBED_SETTINGS},
    }
