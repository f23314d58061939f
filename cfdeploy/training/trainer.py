"""CF-CLIP mapper training, as the paper and the official code train it.

Only the text mapper and the latent mapper learn; the generator, CLIP and ArcFace are frozen (the
edited image stays differentiable through ``w_hat``). One step on a batch of W+ codes ``w``::

    x     = G(w)                                   (no gradient)
    w_hat = w + 0.1 * mapper(cat(w, text_mapper(t)))   t: the prompt's CLIP text features, computed once
    x_hat = G(w_hat)
    loss  = nce_lambda * CLIP-NCE(x_hat, x) + l2_lambda * mean((w_hat - w)^2) + id_lambda * (1 - cos ArcFace)

The CLIP-NCE loss is refinement's (:class:`cfdeploy.refine.ClipNCELoss`), with 8 new random perspective
warps per step. Everything random is derived from ``(seed, step)`` (the data order from ``(seed, epoch)``),
so a run resumed from a save continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cfdeploy.errors import CfdeployError
from cfdeploy.files import require_file, sha256_file
from cfdeploy.models.arcface import ArcFace, identity_loss
from cfdeploy.models.mappers import (
    EDIT_SCALE,
    FullTextMapper,
    LevelsMapper,
    MapperConfig,
)
from cfdeploy.models.stylegan2 import Generator
from cfdeploy.outputs import to_uint8
from cfdeploy.refine import ClipNCELoss
from cfdeploy.training.ranger import Ranger

OPTIMIZERS = ("ranger", "adam")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_TERMS = ("loss", "nce", "l2", "id")
BEST_MODEL = "best_model.pt"
TRAINING_STATE = "training_state.pt"
METRICS = "metrics.jsonl"
VALIDATION_DIR = "validation"
GRID_ROWS = 4
STATE_KEYS = ("step", "best_validation", "text_mapper", "mapper", "optimizer", "settings")
# opts the official training writes that cfdeploy has no use for, with the official defaults (workers: the
# data are in memory here), so the official code reads the file as one of its own.
OFFICIAL_FIXED_OPTS = {
    "mapper_type": "LevelsMapper",
    "test_batch_size": 1,
    "workers": 0,
    "test_workers": 0,
    "perc_lambda": 0,
    "vgg_weights": None,
    "checkpoint_path": None,
    "image_interval": 500,
    "board_interval": 50,
}


@dataclass
class TrainSettings:
    """What ``cfdeploy train`` takes; the defaults are the official ones."""

    description: str
    steps: int = 50_000
    batch_size: int = 2
    lr: float = 0.5
    optimizer: str = "ranger"
    nce_lambda: float = 0.3
    l2_lambda: float = 0.8
    id_lambda: float = 0.2
    source_text: str = "face"
    no_coarse_mapper: bool = False
    no_medium_mapper: bool = False
    no_fine_mapper: bool = False
    w_space: bool = False
    val_every: int = 5000
    save_every: int = 5000
    seed: int = 0
    precision: str = "fp32"
    augmentations: int = 8

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every", "save_every", "augmentations"):
            if getattr(self, name) < 1:
                raise CfdeployError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(self, name)}")
        for name in ("lr", "nce_lambda", "l2_lambda", "id_lambda"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise CfdeployError(
                    f"--{name.replace('_', '-')} must be a finite number "
                    f"{'above' if name == 'lr' else 'of at least'} 0, got {value}"
                )
        if self.optimizer not in OPTIMIZERS:
            raise CfdeployError(f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise CfdeployError(f"--precision {self.precision}: training offers {', '.join(PRECISIONS)}")
        if self.no_coarse_mapper and self.no_medium_mapper and self.no_fine_mapper:
            raise CfdeployError(
                "--no-coarse-mapper, --no-medium-mapper and --no-fine-mapper together leave nothing to train"
            )

    def mapper_config(self, n_latent: int) -> MapperConfig:
        return MapperConfig(n_latent, 512, self.no_coarse_mapper, self.no_medium_mapper, self.no_fine_mapper)


@dataclass
class TrainInputs:
    """The files a run reads (recorded as given in the checkpoints' ``opts``)."""

    generator: Path
    clip_weights: Path | None
    latents: Path
    test_latents: Path | None = None
    identity_weights: Path | None = None
    init_from: Path | None = None  # a CF-CLIP checkpoint whose mappers the run starts from
    text_embedding: Path | None = None  # the prompt's CLIP text features [512], instead of CLIP's text tower


@dataclass
class TrainingData:
    """The run's latent codes, and the files they and the networks came from."""

    train_latents: np.ndarray
    test_latents: np.ndarray
    inputs: TrainInputs
    input_sha256: dict[str, str | None] = field(default_factory=dict)  # see input_hashes


def step_generator(seed: int, *position: int) -> torch.Generator:
    """The random draws of one step, from (seed, step) alone: a resumed run draws what the uninterrupted one drew
    (``position`` may have more parts, e.g. (phase, step))."""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, *position]).generate_state(1, np.uint64)[0] >> 1)
    )


def batch_indices(seed: int, step: int, count: int, batch_size: int) -> np.ndarray:
    """Shuffled batches without replacement, the last partial batch of each epoch dropped (the official
    DataLoader's ``shuffle=True, drop_last=True``); ``step`` counts from 1."""
    per_epoch = count // batch_size
    epoch, position = divmod(step - 1, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(count)
    return order[position * batch_size : (position + 1) * batch_size]


class CFClipTraining(nn.Module):
    """The trainable mappers, the frozen networks around them, and the objective."""

    text_features: torch.Tensor

    def __init__(
        self,
        generator: Generator,
        nce: ClipNCELoss | None,
        text_features: torch.Tensor,
        settings: TrainSettings,
        arcface: ArcFace | None = None,
    ) -> None:
        super().__init__()
        if settings.id_lambda and arcface is None:
            raise CfdeployError(
                "the identity loss needs ArcFace weights: pass --identity-weights model_ir_se50.pth or --id-lambda 0"
            )
        if settings.nce_lambda and nce is None:
            raise CfdeployError("the CLIP-NCE loss needs CLIP: pass --clip-weights ViT-B-32.pt or --nce-lambda 0")
        self.settings = settings
        self.generator = generator.eval().requires_grad_(False)
        self.nce = nce.eval().requires_grad_(False) if nce is not None and settings.nce_lambda else None
        self.arcface = arcface.eval().requires_grad_(False) if arcface is not None else None
        config = settings.mapper_config(generator.config.n_latent)
        torch.manual_seed(settings.seed)
        self.text_mapper = FullTextMapper(config)
        self.mapper = LevelsMapper(config)
        self.register_buffer("text_features", text_features.detach().float().reshape(1, -1))

    def trainable(self) -> list[nn.Parameter]:
        return [*self.mapper.parameters(), *self.text_mapper.parameters()]

    @contextlib.contextmanager
    def reduced_precision(self) -> Iterator[None]:
        """Autocast for the frozen image networks only: the mappers' PixelNorm breaks in half precision."""
        dtype = PRECISIONS[self.settings.precision]
        device = self.text_features.device.type
        with torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            yield

    def edit(self, w: torch.Tensor) -> torch.Tensor:
        text_latents = self.text_mapper(self.text_features.expand(len(w), -1))
        return w + EDIT_SCALE * self.mapper(torch.cat([w, text_latents], dim=-1))

    def losses(self, w: torch.Tensor, warps: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad(), self.reduced_precision():
            source = self.generator(w).to(w.dtype)
        w_hat = self.edit(w)
        with self.reduced_precision():
            edited = self.generator(w_hat).to(w.dtype)
            nce = self.nce(edited, source, warps).to(w.dtype) if self.nce is not None else edited.new_zeros(())
            identity = (
                identity_loss(self.arcface, edited, source).to(w.dtype)
                if self.arcface is not None
                else nce.new_zeros(())
            )
        l2 = F.mse_loss(w_hat, w)
        s = self.settings
        total = s.nce_lambda * nce + s.l2_lambda * l2 + s.id_lambda * identity
        return {"loss": total, "nce": nce, "l2": l2, "id": identity, "edited": edited.detach(), "source": source}

    def official_state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """``mapper.*``, ``decoder.*``, ``text_mapper.*`` in the official module order, on the CPU."""
        state: OrderedDict[str, torch.Tensor] = OrderedDict()
        for prefix, module in (("mapper", self.mapper), ("decoder", self.generator), ("text_mapper", self.text_mapper)):
            for key, value in module.state_dict().items():
                state[f"{prefix}.{key}"] = value.detach().cpu().clone()
        return state


@dataclass
class Progress:
    """What a caller sees after each step and validation."""

    step: int
    losses: dict[str, float]
    step_s: float
    validation: dict[str, float] | None = None
    saved: list[str] = field(default_factory=list)


def official_opts(settings: TrainSettings, data: TrainingData, out: Path, size: int, device: str) -> dict[str, Any]:
    """The ``opts`` dict of an official checkpoint: every field its training writes, with this run's values."""
    return {
        **OFFICIAL_FIXED_OPTS,
        "checkpoint_path": None if data.inputs.init_from is None else str(data.inputs.init_from),
        "exp_dir": str(out),
        "no_coarse_mapper": settings.no_coarse_mapper,
        "no_medium_mapper": settings.no_medium_mapper,
        "no_fine_mapper": settings.no_fine_mapper,
        "latents_train_path": str(data.inputs.latents),
        "latents_test_path": None if data.inputs.test_latents is None else str(data.inputs.test_latents),
        "train_dataset_size": len(data.train_latents),
        "test_dataset_size": len(data.test_latents),
        "w_space": settings.w_space,
        "batch_size": settings.batch_size,
        "learning_rate": settings.lr,
        "optim_name": settings.optimizer,
        "id_lambda": settings.id_lambda,
        "nce_lambda": settings.nce_lambda,
        "latent_l2_lambda": settings.l2_lambda,
        "stylegan_weights": str(data.inputs.generator),
        "stylegan_size": size,
        "ir_se50_weights": None if data.inputs.identity_weights is None else str(data.inputs.identity_weights),
        "max_steps": settings.steps,
        "val_interval": settings.val_every,
        "save_interval": settings.save_every,
        "source_text": settings.source_text,
        "description": settings.description,
        "device": device,
    }


def make_optimizer(parameters: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=settings.lr)
    return Ranger(parameters, lr=settings.lr)


class Trainer:
    """Steps, validation and the run's state; files are written by :func:`cfdeploy.training.run.train`."""

    def __init__(self, model: CFClipTraining, data: TrainingData, device: torch.device) -> None:
        self.model = model.to(device)
        self.data = data
        self.device = device
        self.settings = model.settings
        self.optimizer = make_optimizer(model.trainable(), self.settings)
        self.step = 0
        self.best_validation: float | None = None
        if len(data.train_latents) < self.settings.batch_size:
            raise CfdeployError(
                f"{data.inputs.latents}: {len(data.train_latents)} training latents, "
                f"fewer than one batch of {self.settings.batch_size}"
            )

    def latents(self, rows: np.ndarray | slice, test: bool = False) -> torch.Tensor:
        source = self.data.test_latents if test else self.data.train_latents
        return torch.from_numpy(np.ascontiguousarray(source[rows])).to(self.device, self.model.text_features.dtype)

    def train_step(self) -> Progress:
        """One optimiser step on the next batch; refuses a non-finite loss before any weight changes."""
        started = time.perf_counter()
        step = self.step + 1
        rows = batch_indices(self.settings.seed, step, len(self.data.train_latents), self.settings.batch_size)
        self.model.mapper.train()
        self.model.text_mapper.train()
        terms = self.model.losses(self.latents(rows), step_generator(self.settings.seed, step))
        values = {name: float(terms[name].detach()) for name in LOSS_TERMS}
        if not all(math.isfinite(value) for value in values.values()):
            shown = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
            raise CfdeployError(f"step {step}: the loss is not finite ({shown}); the weights were not updated")
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        self.step = step
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Progress(step, values, time.perf_counter() - started)

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], np.ndarray]:
        """Mean losses over the test latents with the same warps every time, and a grid of source | edit rows."""
        sums = dict.fromkeys(LOSS_TERMS, 0.0)
        shown: list[torch.Tensor] = []
        count = len(self.data.test_latents)
        for row in range(count):
            terms = self.model.losses(
                self.latents(slice(row, row + 1), test=True), step_generator(self.settings.seed, 0)
            )
            for name in LOSS_TERMS:
                sums[name] += float(terms[name]) / count
            if len(shown) < GRID_ROWS:
                shown.append(torch.cat([terms["source"], terms["edited"]], dim=3).cpu())
        return sums, validation_grid(torch.cat(shown))

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_validation": self.best_validation,
            "text_mapper": self.model.text_mapper.state_dict(),
            "mapper": self.model.mapper.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "settings": asdict(self.settings),
            "inputs": self.data.input_sha256,
        }

    def load_state(self, state: dict[str, Any], source: Path) -> None:
        """Restore a saved state after checking all of it against this run's settings and model: a state
        that does not fit is refused in one line before any weight changes."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise CfdeployError(f"{source}: damaged training state: no {', '.join(repr(key) for key in missing)}")
        saved = state.get("settings")
        if not isinstance(saved, dict):
            raise CfdeployError(f"{source}: damaged training state: 'settings' is a {type(saved).__name__}, not a dict")
        current = asdict(self.settings)
        differing = [key for key in current if key != "steps" and saved.get(key) != current[key]]
        if differing:
            shown = ", ".join(f"{key} {saved.get(key)!r} → {current[key]!r}" for key in differing[:4])
            raise CfdeployError(f"{source}: --resume needs the settings of the interrupted run; these differ: {shown}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CfdeployError(f"{source}: damaged training state: 'step' is {_shown(step)}, not a step number")
        if step > self.settings.steps:
            raise CfdeployError(f"{source}: the run is at step {step}, beyond --steps {self.settings.steps}")
        best = state["best_validation"]
        if best is not None and (
            isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best)
        ):
            raise CfdeployError(
                f"{source}: damaged training state: 'best_validation' must be a finite number, found {_shown(best)}"
            )
        for name in ("text_mapper", "mapper"):
            check_tensors(
                state[name], getattr(self.model, name).state_dict(), f"{source}: damaged training state: {name!r}"
            )
        check_optimizer_state(state["optimizer"], self.optimizer, self.settings.optimizer, step, source)
        self.model.text_mapper.load_state_dict(state["text_mapper"])
        self.model.mapper.load_state_dict(state["mapper"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = step
        self.best_validation = None if best is None else float(best)


INPUT_OPTIONS = {  # the files whose bytes decide a run's steps, and the options that name them
    "generator": "--generator",
    "clip_weights": "--clip-weights",
    "latents": "--latents",
    "test_latents": "--test-latents",
    "identity_weights": "--identity-weights",
    "text_embedding": "--text-embedding",
}
OPTIMIZER_STATE = {
    "ranger": {"step", "exp_avg", "exp_avg_sq", "slow_buffer"},
    "adam": {"step", "exp_avg", "exp_avg_sq"},
}


def input_hashes(inputs: TrainInputs) -> dict[str, str | None]:
    """The sha256 of each file that decides the run's steps (``--init-from`` does not: a resume restores the
    mappers), recorded in the training state so a resume with other files is refused."""
    return {
        name: None if getattr(inputs, name) is None else sha256_file(require_file(getattr(inputs, name)))
        for name in INPUT_OPTIONS
    }


def check_same_inputs(state: dict[str, Any], inputs: TrainInputs, source: Path) -> None:
    """One line naming the first file that differs from the one the interrupted run in ``state`` was trained on
    (states written before the inputs were recorded resume unchecked)."""
    recorded = state.get("inputs", {})
    if not isinstance(recorded, dict):
        raise CfdeployError(f"{source}: damaged training state: 'inputs' is a {type(recorded).__name__}, not a dict")
    hashes = input_hashes(inputs)
    for name, option in INPUT_OPTIONS.items():
        given, was, now = getattr(inputs, name), recorded.get(name), hashes[name]
        if was == now or name not in recorded:
            continue
        if given is None:
            raise CfdeployError(
                f"{source}: the run was trained with {option} (sha256 {str(was)[:12]}…); give that file to resume"
            )
        if was is None:
            raise CfdeployError(f"{given}: the run was trained without {option}; resume without it")
        raise CfdeployError(
            f"{given}: not the {option} file the run was trained on (sha256 {str(now)[:12]}…, the run's "
            f"{str(was)[:12]}…); resume with the run's own files"
        )


def check_tensors(saved: Any, expected: dict[str, torch.Tensor], where: str) -> None:
    """``saved`` holds exactly ``expected``'s names, each a finite tensor of its shape and dtype."""
    if not isinstance(saved, dict):
        raise CfdeployError(f"{where} is a {type(saved).__name__}, not a dict of tensors")
    missing, extra = [key for key in expected if key not in saved], [key for key in saved if key not in expected]
    if missing or extra:
        shown = ", ".join([*(f"no {key!r}" for key in missing[:3]), *(f"unexpected {key!r}" for key in extra[:3])])
        raise CfdeployError(f"{where}: {shown}")
    for key, reference in expected.items():
        _check_tensor(saved[key], reference, f"{where}: {key!r}")


def _check_tensor(value: Any, reference: torch.Tensor, where: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise CfdeployError(f"{where} is a {type(value).__name__}, not a tensor")
    if value.shape != reference.shape or value.dtype != reference.dtype:
        raise CfdeployError(
            f"{where} is {value.dtype} {list(value.shape)}, expected {reference.dtype} {list(reference.shape)}"
        )
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise CfdeployError(f"{where} holds NaN or infinite values")


def check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer, name: str, step: int, source: Path) -> None:
    """The optimiser's saved moments fit the mappers' parameters and are finite; its counters are integers from 0
    to the run's step; its hyperparameters are the settings' (NaN moments would make every later weight NaN)."""
    where = f"{source}: damaged training state: optimiser"
    fresh = optimizer.state_dict()
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("state"), dict)
        or not isinstance(saved.get("param_groups"), list)
    ):
        raise CfdeployError(f"{where}: expected a dict with 'state' and 'param_groups'")
    groups = saved["param_groups"]
    if len(groups) != len(fresh["param_groups"]) or not all(isinstance(group, dict) for group in groups):
        raise CfdeployError(f"{where}: {len(groups)} parameter groups, expected {len(fresh['param_groups'])}")
    parameters: dict[Any, torch.Tensor] = {}
    for group, expected, live in zip(groups, fresh["param_groups"], optimizer.param_groups, strict=True):
        if group.get("params") != expected["params"]:
            raise CfdeployError(f"{where}: its parameters are not the mappers' ({len(expected['params'])} tensors)")
        for key, value in expected.items():
            if key != "params" and key in group and group[key] != value:
                raise CfdeployError(f"{where}: {key} is {_shown(group[key])}, the run's settings give {_shown(value)}")
        parameters.update(zip(expected["params"], live["params"], strict=True))
    for index, moments in saved["state"].items():
        if index not in parameters:
            raise CfdeployError(f"{where}: moments of parameter {_shown(index)}, which the mappers do not have")
        label = f"{where}: parameter {index}"
        if not isinstance(moments, dict) or set(moments) != OPTIMIZER_STATE[name]:
            found = sorted(moments) if isinstance(moments, dict) else type(moments).__name__
            raise CfdeployError(f"{label}: expected {sorted(OPTIMIZER_STATE[name])}, found {found}")
        for key, value in moments.items():
            if key == "step":
                _check_counter(value, step, f"{label} step")
            else:
                _check_tensor(value, parameters[index].detach(), f"{label} {key}")


def _check_counter(value: Any, step: int, where: str) -> None:
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number <= step or number % 1:
        raise CfdeployError(f"{where} must be an integer from 0 to the run's step {step}, found {_shown(number)}")


def _shown(value: Any) -> str:
    """A value as one short line for an error message."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 40 else text[:37] + "..."


def validation_grid(pairs: torch.Tensor) -> np.ndarray:
    """Rows of ``source | edit`` images in [-1, 1] to one uint8 HWC picture, converted as edits are saved."""
    rows = to_uint8(pairs.numpy())
    return rows.reshape(-1, rows.shape[2], 3)
