"""``cfdeploy train``: a training run's files, checkpoints, metrics, validation grids and resumption.

``OUT`` holds ``iteration_N.pt`` (every ``save_every`` steps and the last) and ``best_model.pt`` (lowest
validation loss) in the official checkpoint format, ``training_state.pt`` (optimiser and step, for
``--resume``), ``metrics.jsonl`` (every loss term per step, the validation losses), ``loss.png`` and
``validation/step_N.png``. Every file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from cfdeploy.checkpoints import CFClipCheckpoint, load_arcface, load_cfclip, load_clip, load_generator
from cfdeploy.devices import torch_device
from cfdeploy.errors import CfdeployError
from cfdeploy.files import require_file
from cfdeploy.inputs import load_latents, load_text_embedding
from cfdeploy.models.stylegan2 import Generator
from cfdeploy.outputs import check_output_dir, write_atomic
from cfdeploy.refine import ClipNCELoss
from cfdeploy.tokenizer import ClipTokenizer
from cfdeploy.torchfiles import safe_torch_load
from cfdeploy.training.trainer import (
    BEST_MODEL,
    GRID_ROWS,
    LOSS_TERMS,
    METRICS,
    TRAINING_STATE,
    VALIDATION_DIR,
    CFClipTraining,
    Progress,
    Trainer,
    TrainingData,
    TrainInputs,
    TrainSettings,
    check_same_inputs,
    input_hashes,
    official_opts,
)

LOSS_PLOT = "loss.png"
PLOT_SIZE = (720, 360)
PLOT_COLOURS = {"loss": (20, 20, 20), "nce": (200, 60, 40), "l2": (40, 110, 200), "id": (40, 160, 80)}


def iteration_file(step: int) -> str:
    return f"iteration_{step}.pt"


def save_torch(path: Path, content: Any) -> None:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    write_atomic(path, buffer.getvalue())


def read_metrics(path: Path, on_warning: Callable[[str], None] = lambda message: None) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``. A last line cut short (a run killed while writing it, no newline after it)
    is dropped with a warning; any other line that is not a record with a step is refused naming its number."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif number == len(lines):  # the text after the last newline: a line the run did not finish writing
            on_warning(f"{path}: dropped line {number}, cut short when the run stopped ({_cut(line)})")
        else:
            raise CfdeployError(f"{path}: line {number} is not a metrics record with a step: {_cut(line)}")
    return records


def _cut(line: str) -> str:
    return line if len(line) <= 40 else line[:37] + "..."


def plot_losses(records: Sequence[dict[str, Any]]) -> Image.Image:
    """Each loss term against the step (training as thin lines, validation as dots), each scaled to its own range."""
    width, height = PLOT_SIZE
    margin = 40
    image = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin // 2, width - margin // 2, height - margin], outline=(160, 160, 160))
    steps = [record["step"] for record in records] or [0]
    first, last = min(steps), max(max(steps), min(steps) + 1)
    for position, name in enumerate(LOSS_TERMS):
        points = [(r["step"], r[name]) for r in records if "val" not in r and name in r]
        checks = [(r["step"], r["val"][name]) for r in records if "val" in r]
        values = [value for _, value in points + checks]
        if not values:
            continue
        low, high = min(values), max(max(values), min(values) + 1e-12)

        def xy(step: float, value: float, low: float = low, high: float = high) -> tuple[float, float]:
            x = margin + (step - first) / (last - first) * (width - 1.5 * margin)
            return x, height - margin - (value - low) / (high - low) * (height - 1.5 * margin)

        colour = PLOT_COLOURS[name]
        if len(points) > 1:
            draw.line([xy(*point) for point in points], fill=colour, width=1)
        for point in checks:
            x, y = xy(*point)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((margin + 8 + 150 * position, 4), f"{name} {low:.3g}..{high:.3g}", fill=colour)
    draw.text((margin, height - margin + 6), f"step {first}", fill=(0, 0, 0))
    draw.text((width - margin - 60, height - margin + 6), f"step {last}", fill=(0, 0, 0))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare(settings: TrainSettings, inputs: TrainInputs, device: str, on_stage: Callable[[str], None]) -> Trainer:
    """Load and check every input (before any file is written), then build the trainer.

    CLIP is loaded only for what needs it: its text tower for the prompt's features unless ``inputs.text_embedding``
    gives them, and the CLIP-NCE term (its image tower and the templates' text features) unless ``nce_lambda`` is 0.
    """
    target = torch_device(device)
    if settings.precision == "fp16" and target.type != "cuda":
        raise CfdeployError("--precision fp16 needs --device cuda (use bf16 on a CPU)")
    needs_clip = settings.nce_lambda > 0 or inputs.text_embedding is None
    if needs_clip and inputs.clip_weights is None:
        needed = "the CLIP-NCE loss" if settings.nce_lambda > 0 else "the prompt's text features"
        raise CfdeployError(
            f"{needed} needs CLIP: pass --clip-weights ViT-B-32.pt (or --text-embedding FILE with --nce-lambda 0)"
        )
    for path in (
        inputs.generator,
        inputs.clip_weights,
        inputs.latents,
        inputs.test_latents,
        inputs.identity_weights,
        inputs.init_from,
        inputs.text_embedding,
    ):
        if path is not None:
            require_file(path)
    tokens = torch.from_numpy(ClipTokenizer()([settings.description]))
    on_stage("loading the generator")
    generator = load_generator(inputs.generator)
    n_latent = generator.config.n_latent
    train_latents = load_latents(inputs.latents, n_latent)
    test_latents = load_latents(inputs.test_latents, n_latent) if inputs.test_latents else train_latents[:GRID_ROWS]
    if settings.w_space:
        for path, latents in ((inputs.latents, train_latents), (inputs.test_latents, test_latents)):
            if path is not None and not np.array_equal(latents, np.repeat(latents[:, :1], n_latent, axis=1)):
                raise CfdeployError(
                    f"{path}: --w-space trains on W codes [N,512], but these latents differ across levels (W+)"
                )
    start = initial_mappers(inputs.init_from, settings, generator) if inputs.init_from is not None else None
    if inputs.text_embedding is not None:
        text_features = torch.from_numpy(load_text_embedding(inputs.text_embedding, 1, generator.config.style_dim))
    clip = nce = None
    if needs_clip:
        on_stage("loading CLIP")
        clip = load_clip(inputs.clip_weights)  # type: ignore[arg-type]  # needs_clip implies a file
    if clip is not None and inputs.text_embedding is None:
        with torch.no_grad():
            text_features = clip(tokens).float()
    if clip is not None and settings.nce_lambda > 0:
        nce = ClipNCELoss(clip, settings.source_text, settings.description, augmentations=settings.augmentations)
    arcface = None
    if inputs.identity_weights is not None and settings.id_lambda:
        on_stage("loading ArcFace")
        arcface = load_arcface(inputs.identity_weights)
    data = TrainingData(train_latents, test_latents, inputs, input_hashes(inputs))
    model = CFClipTraining(generator, nce, text_features, settings, arcface)
    if start is not None:  # the mappers' weights only: the optimiser starts fresh, as the official code's does
        model.text_mapper.load_state_dict(start.text_mapper.state_dict())
        model.mapper.load_state_dict(start.mapper.state_dict())
    return Trainer(model, data, target)


def initial_mappers(path: Path, settings: TrainSettings, generator: Generator) -> CFClipCheckpoint:
    """``--init-from``: a CF-CLIP checkpoint (read strictly and safely) whose mappers fit this generator and run."""
    checkpoint = load_cfclip(path)
    config, expected = checkpoint.mapper_config, settings.mapper_config(generator.config.n_latent)
    if (config.n_latent, config.dim) != (expected.n_latent, generator.config.style_dim):
        raise CfdeployError(
            f"{path}: --init-from mappers are for {config.n_latent} levels of width {config.dim}; the generator "
            f"has {generator.config.n_latent} levels of width {generator.config.style_dim}"
        )
    for flag in ("no_coarse_mapper", "no_medium_mapper", "no_fine_mapper"):
        if getattr(config, flag) != getattr(expected, flag):
            option = "--" + flag.replace("_", "-")
            state = "was" if getattr(config, flag) else "was not"
            raise CfdeployError(
                f"{path}: --init-from checkpoint {state} trained with {option}; give the same mapper options"
            )
    return checkpoint


def train(
    settings: TrainSettings,
    inputs: TrainInputs,
    out: Path,
    *,
    device: str = "cpu",
    resume: bool = False,
    force: bool = False,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_progress: Callable[[Progress], None] = lambda progress: None,
    on_warning: Callable[[str], None] = lambda message: None,
) -> Trainer:
    """Train (or with ``resume`` continue) a run in ``out``; returns the trainer after the last step.

    A resume checks the saved state against this run's settings, model and input files before the first step."""
    state_path = out / TRAINING_STATE
    if resume:
        if not state_path.is_file():
            raise CfdeployError(
                f"{out}: nothing to resume (no {TRAINING_STATE}; a run saves one every --save-every steps)"
            )
        state = safe_torch_load(state_path)
        if not isinstance(state, dict) or "optimizer" not in state:
            raise CfdeployError(f"{state_path}: not a cfdeploy training state")
        check_same_inputs(state, inputs, state_path)  # before the networks load: hashing is quicker
    else:
        check_output_dir(
            out,
            force,
            inputs=[p for p in vars(inputs).values() if p is not None],
            unfinished="a run that can go on" if state_path.is_file() else None,
        )
    trainer = prepare(settings, inputs, device, on_stage)
    metrics_path = out / METRICS
    if resume:
        trainer.load_state(state, state_path)
        kept = [record for record in read_metrics(metrics_path, on_warning) if record["step"] <= trainer.step]
        write_atomic(metrics_path, "".join(json.dumps(record) + "\n" for record in kept).encode())
    else:
        (out / VALIDATION_DIR).mkdir(parents=True, exist_ok=True)
        write_atomic(metrics_path, b"")
    size = trainer.model.generator.config.size
    opts = official_opts(settings, trainer.data, out, size, str(trainer.device))
    last_saved = out / iteration_file(trainer.step) if resume else None
    with metrics_path.open("a") as metrics:
        while trainer.step < settings.steps:
            try:
                progress = trainer.train_step()
            except CfdeployError as error:
                last_good = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
                raise CfdeployError(f"{error}; {last_good}") from None
            record: dict[str, Any] = {
                "step": progress.step,
                **progress.losses,
                "lr": settings.lr,
                "step_s": progress.step_s,
            }
            metrics.write(json.dumps(record) + "\n")
            step = progress.step
            if step % settings.val_every == 0 or step == settings.steps:
                validation, grid = trainer.validate()
                progress.validation = validation
                metrics.write(json.dumps({"step": step, "val": validation}) + "\n")
                write_atomic(out / VALIDATION_DIR / f"step_{step:06d}.png", png_bytes(Image.fromarray(grid)))
                if trainer.best_validation is None or validation["loss"] < trainer.best_validation:
                    trainer.best_validation = validation["loss"]
                    save_torch(out / BEST_MODEL, {"state_dict": trainer.model.official_state_dict(), "opts": opts})
                    progress.saved.append(BEST_MODEL)
            metrics.flush()
            if step % settings.save_every == 0 or step == settings.steps:
                last_saved = out / iteration_file(step)
                save_torch(last_saved, {"state_dict": trainer.model.official_state_dict(), "opts": opts})
                save_torch(state_path, trainer.state())
                write_atomic(out / LOSS_PLOT, png_bytes(plot_losses(read_metrics(metrics_path))))
                progress.saved.append(last_saved.name)
            on_progress(progress)
    return trainer
