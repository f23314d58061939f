"""The two abductions, as the official scripts train them, resumable step for step.

Abduction-1 fits U (UNet LoRA, rank 512) to the image I with its prompt P; Abduction-2 fits Δ (text
LoRA, rank 4) to the same I with the target P′, U frozen at γ(t) for the sampled t, the gradient
flowing through the UNet into Δ. Both minimise the ε-MSE of a DDPM step at a uniform t, with the VAE
latent re-sampled from its posterior every step; AdamW at a constant learning rate (the scripts' grad
clipping runs on an exhausted iterator, so it clips nothing, and none is done here). The ``t`` variant
first fits a text LoRA T on (I, P) the same way and keeps it at +1 while Δ is fitted.

Every random draw of a step comes from (seed, phase, step) alone, adapters are initialised from the
seed alone, and a checkpoint holds the adapters, the optimiser and the losses: a run killed and resumed
gives the same adapters as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cfdeploy.dac import lora
from cfdeploy.dac.base_model import (
    BaseModel,
    BaseModelInfo,
    check_same_base_model,
    inspect_base_model,
    load_base_model,
)
from cfdeploy.dac.plms import anneal
from cfdeploy.dac.predict import edit_embeddings, text_adapter_weights
from cfdeploy.dac.run import (
    CHECKPOINT,
    EDIT_EMBEDDINGS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SOURCE_TEXT_LORA,
    TEXT_LORA,
    UNET_LORA,
    AbductSettings,
    read_run,
)
from cfdeploy.environment import versions
from cfdeploy.errors import CfdeployError
from cfdeploy.outputs import DirectoryLock, check_output_dir, write_atomic
from cfdeploy.photos.images import load_photo
from cfdeploy.torchfiles import safe_torch_load
from cfdeploy.training.trainer import step_generator

MIN_IMAGE_SIDE = 64
UNGUARDED = contextlib.nullcontext()  # abduct's writes, when no other thread needs to hold them back


@dataclass(frozen=True)
class Phase:
    """One abduction: the adapter it fits, on which model, from which prompt, and the file it ends in."""

    name: str
    adapter: lora.AdapterSpec
    prompt: str
    steps: int
    file: str

    @property
    def trains_unet(self) -> bool:
        return self.adapter.name == lora.UNET_ADAPTER


def phases(settings: AbductSettings) -> list[Phase]:
    unet = lora.AdapterSpec(lora.UNET_ADAPTER, settings.rank, lora.UNET_TARGETS)
    found = [Phase("Abduction-1 (U)", unet, settings.prompt, settings.unet_steps, UNET_LORA)]
    if settings.variant == "t":
        source = lora.AdapterSpec(lora.SOURCE_ADAPTER, settings.text_rank, lora.TEXT_TARGETS)
        found.append(Phase("Abduction-T (T)", source, settings.prompt, settings.text_steps, SOURCE_TEXT_LORA))
    edit = lora.AdapterSpec(lora.EDIT_ADAPTER, settings.text_rank, lora.TEXT_TARGETS)
    found.append(Phase("Abduction-2 (Δ)", edit, settings.target, settings.text_steps, TEXT_LORA))
    return found


@dataclass
class Progress:
    phase: str
    step: int
    steps: int
    loss: float
    step_s: float


@dataclass(frozen=True)
class StepEstimate:
    """What one step will take at the run's resolution, extrapolated from steps timed at smaller ones, and so the
    whole run (the phases still to fit)."""

    step_s: float
    steps: int
    resolution: int
    timed: tuple[tuple[int, float], ...]  # (resolution, seconds of one step)
    device: str

    @property
    def run_s(self) -> float:
        return self.step_s * self.steps

    def describe(self) -> str:
        timed = " and ".join(f"{resolution} px" for resolution, _ in self.timed)
        measured = "timed" if self.timed[-1][0] == self.resolution else f"extrapolated from steps timed at {timed}"
        return (
            f"a step takes about {_duration(self.step_s)} on {self.device} at {self.resolution} px ({measured}): "
            f"{self.steps} steps ≈ {_duration(self.run_s)}"
        )


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """``[1, 3, res, res]`` in [-1, 1]: a bilinear resize to a square, no crop, no flip (the scripts' transform)."""
    resized = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def load_image(path: Path) -> tuple[Image.Image, str]:
    """The source image and the sha256 of its file; tiny images are refused."""
    image = load_photo(path)
    if min(image.size) < MIN_IMAGE_SIDE:
        raise CfdeployError(
            f"{path}: {image.size[0]}x{image.size[1]} pixels; DAC needs at least {MIN_IMAGE_SIDE} on each side"
        )
    return image, hashlib.sha256(path.read_bytes()).hexdigest()


class Abduction:
    """The base model with its adapters, the image's latent posterior, and one training step."""

    def __init__(self, base: BaseModel, image: torch.Tensor, settings: AbductSettings, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        self.base = base
        self.settings = settings
        self.device = device
        self.noise_scheduler = DDPMScheduler.from_config(dict(base.info.configs["scheduler"]))
        with torch.no_grad():
            posterior = base.vae.encode(image.to(device)).latent_dist
        self.latent_mean, self.latent_std = posterior.mean, posterior.std

    def loss(self, phase: Phase, phase_index: int, step: int) -> torch.Tensor:
        """The ε-MSE of step ``step`` (from 1) of ``phase``; its noise, t and latent from (seed, phase, step)."""
        draws = step_generator(self.settings.seed, phase_index, step)
        shape = self.latent_mean.shape
        latent_noise = torch.randn(shape, generator=draws).to(self.device)
        noise = torch.randn(shape, generator=draws).to(self.device)
        timestep = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (1,), generator=draws)
        latents = (self.latent_mean + self.latent_std * latent_noise) * self.base.info.scaling_factor
        noisy = self.noise_scheduler.add_noise(latents, noise, timestep.to(self.device))
        tokens = self.base.tokens(phase.prompt).to(self.device)
        with torch.set_grad_enabled(not phase.trains_unet):
            hidden = self.base.text_encoder(tokens)[0]
        if not phase.trains_unet:
            lora.set_weight(self.base.unet, lora.UNET_ADAPTER, anneal(int(timestep), self.settings.eta))
        prediction = self.base.unet(noisy, timestep.to(self.device), encoder_hidden_states=hidden).sample
        return torch.nn.functional.mse_loss(prediction.float(), noise.float())


def _optimizer(parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def _prepare_phase(abduction: Abduction, phase: Phase, earlier: list[Phase]) -> list[torch.nn.Parameter]:
    """Activate what ``phase`` trains on top of the adapters fitted before it; returns its parameters."""
    base = abduction.base
    text_adapters = [done.adapter.name for done in earlier if not done.trains_unet]
    lora.activate(base.unet, [lora.UNET_ADAPTER])
    if phase.trains_unet:
        lora.activate(base.text_encoder, [])
        lora.set_weight(base.unet, lora.UNET_ADAPTER, 1.0)
        return lora.adapter_parameters(base.unet, lora.UNET_ADAPTER)
    lora.activate(base.text_encoder, [*text_adapters, phase.adapter.name])
    for name in text_adapters:
        lora.set_weight(base.text_encoder, name, 1.0)
    lora.set_weight(base.text_encoder, phase.adapter.name, 1.0)
    return lora.adapter_parameters(base.text_encoder, phase.adapter.name)


@dataclass(frozen=True)
class AbductInputs:
    image: Path
    base_model: Path
    unet_lora_run: Path | None = None


def _reused_unet(inputs: AbductInputs, settings: AbductSettings, image_sha256: str, info: BaseModelInfo) -> Path | None:
    """The U file of ``--unet-lora RUN``, checked to belong to the same image, base model, prompt and rank."""
    if inputs.unet_lora_run is None:
        return None
    earlier = read_run(inputs.unet_lora_run)
    if earlier.manifest["image_sha256"] != image_sha256:
        raise CfdeployError(f"{inputs.unet_lora_run}: its U was fitted to another image than {inputs.image}")
    check_same_base_model(info, earlier.manifest["base_model"], inputs.unet_lora_run)
    for key in ("prompt", "rank", "resolution"):
        if getattr(earlier.settings, key) != getattr(settings, key):
            raise CfdeployError(
                f"{inputs.unet_lora_run}: its U was fitted with {key} {getattr(earlier.settings, key)!r}, this run asks for "
                f"{getattr(settings, key)!r}"
            )
    return earlier.file(UNET_LORA)


@dataclass
class Checkpoint:
    """Where a run stands: the phase being fitted, its step, its adapter and optimiser, all losses so far."""

    phase: int
    step: int
    losses: dict[str, list[float]]
    identity: dict[str, Any]
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        content = {
            entry.name: getattr(self, entry.name) for entry in fields(self)
        }  # asdict would deep-copy the tensors
        write_atomic(path, lambda stream: torch.save(content, stream))

    @classmethod
    def read(cls, path: Path) -> Checkpoint:
        if not path.is_file():
            raise CfdeployError(
                f"{path.parent}: nothing to resume (no {CHECKPOINT}; a run saves one every --save-every steps)"
            )
        content = safe_torch_load(path)
        try:
            return cls(**content)
        except TypeError:
            raise CfdeployError(f"{path}: not a cfdeploy DAC checkpoint") from None


def _identity(
    settings: AbductSettings, image_sha256: str, info: BaseModelInfo, reused_unet: Path | None, device: str
) -> dict[str, Any]:
    """What must not change between a run and its resumption (another device draws other rounding, so it counts too)."""
    return {
        "settings": {key: value for key, value in asdict(settings).items() if key != "save_every"},
        "image_sha256": image_sha256,
        "base_model": info.files_sha256,
        "unet_lora": hashlib.sha256(reused_unet.read_bytes()).hexdigest() if reused_unet else None,
        "device": torch.device(device).type,
    }


def _check_resumable(checkpoint: Checkpoint, identity: dict[str, Any], source: Path) -> None:
    differing = [key for key in identity if checkpoint.identity.get(key) != identity[key]]
    if "settings" in differing:
        saved, current = checkpoint.identity.get("settings") or {}, identity["settings"]
        shown = ", ".join(
            f"{key} {saved.get(key)!r} → {current[key]!r}" for key in current if saved.get(key) != current[key]
        )
        raise CfdeployError(f"{source}: --resume needs the settings of the interrupted run; these differ: {shown}")
    if differing:
        named = {
            "image_sha256": "the image",
            "base_model": "the base model's weights",
            "unet_lora": "the --unet-lora run's U",
            "device": f"the device type ({checkpoint.identity.get('device')} → {identity['device']})",
        }
        raise CfdeployError(
            f"{source}: --resume needs the inputs of the interrupted run; {named[differing[0]]} changed"
        )


def _model_of(base: BaseModel, phase: Phase) -> torch.nn.Module:
    model: torch.nn.Module = base.unet if phase.trains_unet else base.text_encoder
    return model


PROBE_SIDE = 128  # up to this resolution a step is timed as it is; above it, at a quarter and half the side


def _timed_step(
    base: BaseModel,
    image: Image.Image,
    resolution: int,
    phase_index: int,
    all_phases: list[Phase],
    settings: AbductSettings,
    device: str,
) -> float:
    """Seconds of one step of phase ``phase_index`` at ``resolution`` (forward, backward; no update, the gradients
    dropped, the random streams left as they were)."""
    abduction = Abduction(base, image_tensor(image, resolution), settings, torch.device(device))
    parameters = _prepare_phase(abduction, all_phases[phase_index], all_phases[:phase_index])
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        started = time.perf_counter()
        abduction.loss(all_phases[phase_index], phase_index, 1).backward()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    for parameter in parameters:
        parameter.grad = None
    return seconds


def estimate_step(
    base: BaseModel,
    image: Image.Image,
    settings: AbductSettings,
    unit: int,
    all_phases: list[Phase],
    first: int,
    device: str,
) -> StepEstimate:
    """Time a step before the run starts. Small resolutions are timed as they are (after a warm-up step). Above
    :data:`PROBE_SIDE`, steps at a quarter and half the side are timed and ``t = a·n + b·n²`` (n latent pixels: the
    convolutions' cost and self-attention's) is fitted through them: a few percent of one full step, where a full
    step at 512 px on a CPU can take minutes and gigabytes. A FLOP count would not do: the tiny model's steps are
    bound by memory traffic, not arithmetic."""
    steps = sum(phase.steps for phase in all_phases[first:])
    resolution = settings.resolution
    if resolution <= PROBE_SIDE:
        sides = [resolution]
    else:
        sides = [max(unit, resolution // 4 // unit * unit), max(unit, resolution // 2 // unit * unit)]
    _timed_step(base, image, sides[0], first, all_phases, settings, device)  # warm-up: allocators, kernels' first use
    timed = tuple((side, _timed_step(base, image, side, first, all_phases, settings, device)) for side in sides)
    if len(timed) == 1:
        return StepEstimate(timed[0][1], steps, resolution, timed, device)
    (side1, t1), (side2, t2) = timed
    n1, n2, n = side1**2, side2**2, resolution**2
    quadratic = (t2 * n1 - t1 * n2) / (n1 * n2 * (n2 - n1))
    linear = (t1 - quadratic * n1 * n1) / n1
    if quadratic < 0 or linear < 0:  # timing noise: the larger step, scaled with the pixels
        step_s = t2 * n / n2
    else:
        step_s = linear * n + quadratic * n * n
    return StepEstimate(step_s, steps, resolution, timed, device)


def abduct(
    settings: AbductSettings,
    inputs: AbductInputs,
    out: Path,
    *,
    device: str = "cpu",
    resume: bool = False,
    force: bool = False,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_progress: Callable[[Progress], None] = lambda progress: None,
    on_estimate: Callable[[StepEstimate], None] | None = None,
    writing: AbstractContextManager[Any] = UNGUARDED,
) -> dict[str, Any]:
    """Fit the adapters into ``out`` (or, with ``resume``, continue the run there); returns the manifest.

    With ``on_estimate``, a step is timed first (:func:`estimate_step`) and the estimate passed on. Every file is
    written inside ``writing``: a caller that holds it from another thread (on Ctrl-C) lets the write in progress end
    and no other start."""
    if resume and force:
        raise CfdeployError("--resume continues the run in --out; --force would replace it: give one of them")
    image, image_sha256 = load_image(inputs.image)
    on_stage("hashing the base model")
    info = inspect_base_model(inputs.base_model)
    unit = info.vae_scale_factor * 2 ** (len(info.configs["unet"]["block_out_channels"]) - 1)
    if settings.resolution % unit:
        raise CfdeployError(f"--resolution must be a multiple of {unit} for this base model, got {settings.resolution}")
    reused_unet = _reused_unet(inputs, settings, image_sha256, info)
    identity = _identity(settings, image_sha256, info, reused_unet, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, timeout=0):  # two runs into one directory would interleave their checkpoints
        checkpoint_path = out / CHECKPOINT
        if resume:
            if (out / MANIFEST).is_file():
                raise CfdeployError(f"{out}: the run is complete; nothing to resume")
            checkpoint = Checkpoint.read(checkpoint_path)
            _check_resumable(checkpoint, identity, checkpoint_path)
        else:
            reused_inputs = [inputs.unet_lora_run] if inputs.unet_lora_run else []
            unfinished = checkpoint_path.is_file() and not (out / MANIFEST).is_file()
            check_output_dir(
                out,
                force,
                inputs=[inputs.image, inputs.base_model, *reused_inputs],
                unfinished="an unfinished run" if unfinished else None,
            )
            checkpoint = Checkpoint(1 if reused_unet else 0, 0, {}, identity)
        on_stage("loading the base model")
        base = load_base_model(info, device)
        base.check_prompt(settings.prompt, "--source-text")
        base.check_prompt(settings.target, "--text")
        all_phases = phases(settings)
        for phase in all_phases:
            lora.add_adapter(_model_of(base, phase), phase.adapter, seed=settings.seed)
        for index, phase in enumerate(all_phases[: checkpoint.phase]):
            source = reused_unet if index == 0 and reused_unet and not resume else out / phase.file
            lora.fill_adapter(
                _model_of(base, phase), phase.adapter.name, lora.read_adapter(source, phase.adapter.name)[1], source
            )
        if on_estimate is not None and checkpoint.phase < len(all_phases):
            on_stage("timing a step")
            on_estimate(estimate_step(base, image, settings, unit, all_phases, checkpoint.phase, device))
        if not resume:
            with writing:
                _empty_directory(out)
                if reused_unet:
                    lora.save_adapter(out / UNET_LORA, base.unet, all_phases[0].adapter)
                    checkpoint.save(checkpoint_path)
        abduction = Abduction(base, image_tensor(image, settings.resolution), settings, torch.device(device))
        for index in range(checkpoint.phase, len(all_phases)):
            phase = all_phases[index]
            on_stage(f"{phase.name}: first step")
            _fit(abduction, all_phases, index, checkpoint, checkpoint_path, on_progress, writing)
            with writing:
                lora.save_adapter(out / phase.file, _model_of(base, phase), phase.adapter)
                checkpoint = Checkpoint(index + 1, 0, checkpoint.losses, identity)
                checkpoint.save(checkpoint_path)
        on_stage("encoding the edit embeddings")
        cond, uncond = edit_embeddings(base, settings.target, text_adapter_weights(settings.variant, 1.0))
        from safetensors.torch import save

        embeddings = {"cond": cond.cpu().contiguous(), "uncond": uncond.cpu().contiguous()}
        with writing:
            write_atomic(out / EDIT_EMBEDDINGS, save(embeddings, metadata={"beta": "1.0"}))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": info.identity(),
            "image": str(inputs.image),
            "image_sha256": image_sha256,
            "settings": asdict(settings),
            "unet_lora_from": str(inputs.unet_lora_run) if inputs.unet_lora_run else None,
            "adapted_layers": {
                phase.adapter.name: len(lora.lora_layers(_model_of(base, phase), phase.adapter.name))
                for phase in all_phases
            },
            "losses": checkpoint.losses,
            "device": device,
            "versions": versions(),
        }
        with writing:
            write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
            checkpoint_path.unlink(missing_ok=True)
    return manifest


def _fit(
    abduction: Abduction,
    all_phases: list[Phase],
    index: int,
    checkpoint: Checkpoint,
    checkpoint_path: Path,
    on_progress: Callable[[Progress], None],
    writing: AbstractContextManager[Any],
) -> None:
    """Fit phase ``index`` from where ``checkpoint`` stands, saving every ``save_every`` steps."""
    phase, settings = all_phases[index], abduction.settings
    parameters = _prepare_phase(abduction, phase, all_phases[:index])
    optimizer = _optimizer(parameters, settings.lr)
    step = checkpoint.step if checkpoint.phase == index else 0
    last_saved = step or None
    if step:
        with torch.no_grad():
            for parameter, saved in zip(parameters, checkpoint.adapter.values(), strict=True):
                parameter.copy_(saved)
        optimizer.load_state_dict(checkpoint.optimizer)
    losses = checkpoint.losses.setdefault(phase.name, [])
    del losses[step:]
    while step < phase.steps:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = abduction.loss(phase, index, step + 1)
        value = loss.item()
        if not math.isfinite(value):
            raise CfdeployError(
                f"{phase.name}: the loss became {value} at step {step + 1}; {_kept(checkpoint_path, last_saved)}; "
                "--resume would replay the same steps: start again (--force) with a lower --lr"
            )
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(value)
        progress = Progress(phase.name, step, phase.steps, value, time.perf_counter() - started)
        if step % settings.save_every == 0 and step < phase.steps and _all_finite(parameters):
            adapter = {f"{number}": parameter.detach().cpu().clone() for number, parameter in enumerate(parameters)}
            with writing:
                Checkpoint(index, step, checkpoint.losses, checkpoint.identity, adapter, optimizer.state_dict()).save(
                    checkpoint_path
                )
            last_saved = step
        on_progress(progress)


def _empty_directory(path: Path) -> None:
    """``path`` made an empty directory; emptied in place, so ``--out .`` keeps the shell's working directory."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _all_finite(parameters: list[torch.nn.Parameter]) -> bool:
    """Whether the adapter is still usable: a checkpoint of NaN weights would only replay the failure."""
    with torch.no_grad():
        return all(bool(torch.isfinite(parameter).all()) for parameter in parameters)


def _kept(checkpoint_path: Path, last_saved: int | None) -> str:
    """What a failed phase leaves behind, in words."""
    if last_saved:
        return f"{checkpoint_path} keeps step {last_saved} of this phase"
    if checkpoint_path.is_file():
        return f"{checkpoint_path} keeps the adapters fitted before this phase"
    return "no checkpoint was saved yet"
