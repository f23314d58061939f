"""``cfdeploy train``: a CF-CLIP mapper checkpoint for any prompt, trained as the paper trains it."""

from __future__ import annotations

from pathlib import Path

import typer

from cfdeploy.cli.common import (
    PRECISION_CHOICES,
    Precision,
    app,
    progress_bar,
    resumable,
    retired,
    say,
    user_errors,
    warn,
)

TRAINING = "Training"
LOSSES = "Loss weights"


@app.command("train")
@user_errors
def train_command(
    text: str = typer.Option(
        ..., "--text", "-t", metavar="PROMPT", help='What the edit should do, e.g. "green lipstick".'
    ),
    generator: Path = typer.Option(
        ...,
        "--generator",
        "-g",
        metavar="FILE",
        help="StyleGAN2: a rosinality checkpoint (g_ema) or a CF-CLIP checkpoint (its decoder is reused).",
    ),
    clip_weights: Path | None = typer.Option(
        None,
        "--clip-weights",
        metavar="FILE",
        help="CLIP ViT-B/32 weights with the image tower (ViT-B-32.pt); not needed with "
        "--text-embedding and --nce-lambda 0.",
    ),
    latents: Path = typer.Option(
        ..., "--latents", "-l", metavar="FILE", help="Training W+ codes [N,n,512] (.pt or .npy), e.g. e4e inversions."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", metavar="DIR", help="Run directory: checkpoints, metrics.jsonl, loss.png, validation grids."
    ),
    test_latents: Path | None = typer.Option(
        None, "--test-latents", metavar="FILE", help="Validation codes (default: the first 4 training codes)."
    ),
    identity_weights: Path | None = typer.Option(
        None,
        "--identity-weights",
        metavar="FILE",
        help="ArcFace IR-SE50 (model_ir_se50.pth) for the identity loss; faces only.",
    ),
    old_identity_weights: Path | None = typer.Option(None, "--id-weights", hidden=True),
    init_from: Path | None = typer.Option(
        None,
        "--init-from",
        metavar="FILE",
        help="Start the mappers from this CF-CLIP checkpoint (the optimiser starts fresh).",
    ),
    text_embedding: Path | None = typer.Option(
        None,
        "--text-embedding",
        metavar="FILE",
        help="The prompt's CLIP text features (.npy [512], unnormalised) instead of "
        "CLIP's text tower; --text then only names the edit and CLIP-NCE's target.",
    ),
    steps: int = typer.Option(50_000, "--steps", rich_help_panel=TRAINING, help="Optimiser steps."),
    batch_size: int = typer.Option(
        2, "--batch-size", "-b", metavar="B", rich_help_panel=TRAINING, help="Latent codes per step."
    ),
    lr: float = typer.Option(0.5, "--lr", rich_help_panel=TRAINING, help="Learning rate."),
    optimizer: str = typer.Option("ranger", "--optimizer", metavar="ranger|adam", rich_help_panel=TRAINING),
    nce_lambda: float = typer.Option(0.3, "--nce-lambda", rich_help_panel=LOSSES, help="Weight of the CLIP-NCE loss."),
    l2_lambda: float = typer.Option(0.8, "--l2-lambda", rich_help_panel=LOSSES, help="Weight of mean((w_hat - w)^2)."),
    id_lambda: float | None = typer.Option(
        None,
        "--id-lambda",
        rich_help_panel=LOSSES,
        help="Weight of the identity loss \\[default: 0.2 with --identity-weights, else 0].",
    ),
    source_text: str = typer.Option(
        "face",
        "--source-text",
        metavar="TEXT",
        rich_help_panel=LOSSES,
        help="What the source images show (CLIP-NCE's negatives): face, dog, cat...",
    ),
    no_coarse_mapper: bool = typer.Option(
        False, "--no-coarse-mapper", rich_help_panel=TRAINING, help="Leave levels 0-3 unedited."
    ),
    no_medium_mapper: bool = typer.Option(
        False, "--no-medium-mapper", rich_help_panel=TRAINING, help="Leave levels 4-7 unedited."
    ),
    no_fine_mapper: bool = typer.Option(
        False, "--no-fine-mapper", rich_help_panel=TRAINING, help="Leave levels 8+ unedited."
    ),
    w_space: bool = typer.Option(
        False, "--w-space", rich_help_panel=TRAINING, help="The latents are W codes [N,512] (e.g. AFHQ)."
    ),
    val_every: int = typer.Option(
        5000, "--val-every", rich_help_panel=TRAINING, help="Validate and write a grid every N steps."
    ),
    save_every: int = typer.Option(
        5000, "--save-every", rich_help_panel=TRAINING, help="Write iteration_N.pt every N steps."
    ),
    seed: int = typer.Option(
        0, "--seed", metavar="N", rich_help_panel=TRAINING, help="Initial weights, data order and warps."
    ),
    device: str = typer.Option("cpu", "--device", metavar="DEVICE", help="cpu, cuda or cuda:N."),
    precision: Precision = typer.Option(
        Precision("fp32"),
        "--precision",
        metavar=PRECISION_CHOICES,
        help="Autocast for the generator, CLIP and ArcFace; the mappers stay fp32.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last save, exactly."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing --out directory."),
) -> None:
    """Train a text mapper and latent mapper for a new prompt (the paper's objective: 0.3 CLIP-NCE + 0.8 latent L2
    + 0.2 identity, Ranger, lr 0.5, batch 2, 50,000 steps). Writes best_model.pt and iteration_N.pt in the
    official checkpoint format: `cfdeploy edit -c`, `export` and `refit` take them.

    Example: cfdeploy train -t "green lipstick" -g stylegan2-ffhq-config-f.pt --clip-weights ViT-B-32.pt
    -l train_faces.pt --test-latents test_faces.pt --identity-weights model_ir_se50.pth -o runs/green_lipstick
    """
    from cfdeploy.errors import CfdeployError
    from cfdeploy.training.run import train
    from cfdeploy.training.trainer import (
        TRAINING_STATE,
        Progress,
        TrainInputs,
        TrainSettings,
    )

    identity_weights = retired("--id-weights", old_identity_weights, "--identity-weights", identity_weights)
    if resume and force:
        raise CfdeployError("--resume continues the run in --out; --force would replace it: give one of them")
    notes = []
    if id_lambda is None:
        id_lambda = 0.2 if identity_weights is not None else 0.0
        if identity_weights is None:
            notes.append(
                "no --identity-weights: the identity loss is off (--id-lambda 0); pass model_ir_se50.pth to keep "
                "faces' identity"
            )
    settings = TrainSettings(
        text,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        nce_lambda=nce_lambda,
        l2_lambda=l2_lambda,
        id_lambda=id_lambda,
        source_text=source_text,
        no_coarse_mapper=no_coarse_mapper,
        no_medium_mapper=no_medium_mapper,
        no_fine_mapper=no_fine_mapper,
        w_space=w_space,
        val_every=val_every,
        save_every=save_every,
        seed=seed,
        precision=precision.value,
    )
    inputs = TrainInputs(generator, clip_weights, latents, test_latents, identity_weights, init_from, text_embedding)
    with resumable(out / TRAINING_STATE), progress_bar() as bar:
        task = bar.add_task("loading", total=steps)

        def on_progress(progress: Progress) -> None:
            while notes:  # once the inputs are known to be good
                warn(notes.pop())
            terms = " ".join(f"{name} {value:.4f}" for name, value in progress.losses.items())
            bar.update(task, completed=progress.step, description=f"{terms} | {1 / progress.step_s:.2f} steps/s")
            if progress.validation is not None:
                say(f"step {progress.step}: validation loss {progress.validation['loss']:.4f}")
            for name in progress.saved:
                say(f"step {progress.step}: wrote {out / name}")

        trainer = train(
            settings,
            inputs,
            out,
            device=device,
            resume=resume,
            force=force,
            on_stage=lambda stage: bar.update(task, description=stage),
            on_progress=on_progress,
            on_warning=warn,
        )
    say(f"trained {trainer.step} steps; best validation loss {trainer.best_validation:.4f}: {out / 'best_model.pt'}")
