"""``cfdeploy dac``: DAC, counterfactual editing of any image with Stable Diffusion (abduct, then edit)."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from cfdeploy.cli.common import (
    POSITIONAL_ARTIFACT,
    app,
    artifact,
    one_positional,
    phase,
    progress_bar,
    resumable,
    retired,
    say,
    user_errors,
)

dac_app = typer.Typer(
    help="DAC (CVPR 2024): edit any image with Stable Diffusion 2.1-base by fitting a UNet LoRA to it (Abduction-1) and a "
    "text-encoder LoRA to the target prompt (Abduction-2), then sampling with the text LoRA subtracted.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(dac_app, name="dac")

Result = TypeVar("Result")

FITTING = "Fitting"
SAMPLING = "Sampling"
DEVICE = typer.Option("cpu", "--device", metavar="DEVICE", help="cpu, cuda or cuda:N.")
MOVED_BASE_MODEL = typer.Option(
    None,
    "--base-model",
    metavar="DIR",
    help="The base model folder, if it moved since abduct (its weights must be the same).",
)
OLD_BASE_MODEL = typer.Option(None, "-b", hidden=True)  # -b means --batch-size everywhere else


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown: the worker may be inside a torch call, and tearing down
    torch's thread pools under it aborts the process (``terminate called without an active exception``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def interruptible(work: Callable[[], Result], writing: threading.Lock) -> Result:
    """``work()`` in a worker thread while this one waits, so that Ctrl-C stops the command at once: Python takes a
    signal only between the main thread's bytecodes, and a single torch call (a UNet's backward pass at 512 px on a
    CPU) can last minutes. On Ctrl-C the file being written (under ``writing``) is finished and ``writing`` kept, so
    that no other write starts; the worker ends with the process, which exits without tearing the interpreter down."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # handed to the main thread, which reports it as it would its own
            outcome["error"] = error

    worker = threading.Thread(target=run, name="cfdeploy-work", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        writing.acquire()
        atexit.register(_exit_now, 130)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@dac_app.command("abduct")
@user_errors
def abduct_command(
    image: Path = typer.Option(..., "--image", "-i", metavar="FILE", help="The image to edit (JPEG, PNG or WebP)."),
    source_text: str | None = typer.Option(
        None,
        "--source-text",
        metavar="TEXT",
        help='What the image shows, e.g. "A cat." (taken from the --unet-lora run if omitted).',
    ),
    text: str | None = typer.Option(
        None, "--text", "-t", metavar="PROMPT", help='What it should show, e.g. "A cat wearing a wool cap."'
    ),
    base_model: Path | None = typer.Option(
        None,
        "--base-model",
        metavar="DIR",
        help="Local diffusers folder of Stable Diffusion 2.1-base (unet/, text_encoder/, vae/, tokenizer/, scheduler/).",
    ),
    old_source_text: str | None = typer.Option(None, "--prompt", "-p", hidden=True),
    old_text: str | None = typer.Option(None, "--target", hidden=True),
    old_base_model: Path | None = OLD_BASE_MODEL,
    out: Path = typer.Option(
        ..., "--out", "-o", metavar="RUN", help="Run directory: the adapters, edit embeddings and manifest.json."
    ),
    unet_lora: Path | None = typer.Option(
        None, "--unet-lora", metavar="RUN", help="Reuse the U of an earlier run on the same image (skips Abduction-1)."
    ),
    unet_steps: int = typer.Option(1000, "--unet-steps", rich_help_panel=FITTING, help="Abduction-1 steps."),
    text_steps: int = typer.Option(
        1000, "--text-steps", rich_help_panel=FITTING, help="Abduction-2 steps (and T's, variant t)."
    ),
    rank: int = typer.Option(512, "--rank", rich_help_panel=FITTING, help="U's LoRA rank (= alpha)."),
    text_rank: int = typer.Option(4, "--text-rank", rich_help_panel=FITTING, help="Δ's LoRA rank (= alpha)."),
    eta: float = typer.Option(
        0.8,
        "--eta",
        rich_help_panel=FITTING,
        help="Annealing: U's weight is η at t=999, 1 at t=0 (paper: 0.4-0.8; larger keeps more of the image).",
    ),
    lr: float = typer.Option(1e-4, "--lr", rich_help_panel=FITTING, help="AdamW learning rate (constant)."),
    seed: int = typer.Option(
        42, "--seed", metavar="N", rich_help_panel=FITTING, help="Adapter init and every step's noise, t and latent."
    ),
    resolution: int = typer.Option(
        512, "--resolution", rich_help_panel=FITTING, help="The image is resized to a square of this side."
    ),
    variant: str = typer.Option(
        "plain",
        "--variant",
        metavar="plain|t",
        rich_help_panel=FITTING,
        help="t: first fit a text LoRA T on (image, prompt), kept at +1 (better fidelity on complex images).",
    ),
    save_every: int = typer.Option(
        250, "--save-every", rich_help_panel=FITTING, help="Write a checkpoint every N steps."
    ),
    device: str = DEVICE,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint, exactly."),
    force: bool = typer.Option(
        False, "--force", "-f", help="Replace an existing --out directory (emptied as fitting starts)."
    ),
) -> None:
    """Fit DAC's adapters to an image: U on (image, prompt), then Δ on (image, target) with U annealed.

    The official settings by default (fp32, 1000 + 1000 steps; paper: 6 + 9 minutes on an A100).

    Example: cfdeploy dac abduct -i cat.jpg --source-text "A cat." -t "A cat wearing a wool cap." --base-model sd-2-1-base
    -o runs/cat_cap
    """
    from cfdeploy.dac.abduct import AbductInputs, Progress, abduct
    from cfdeploy.dac.run import CHECKPOINT, AbductSettings, read_run
    from cfdeploy.devices import torch_device
    from cfdeploy.errors import CfdeployError

    prompt = retired("--prompt", old_source_text, "--source-text", source_text)
    target = retired("--target", old_text, "--text", text)
    base_model = retired("-b", old_base_model, "--base-model", base_model)
    if target is None or base_model is None:
        raise CfdeployError(f"give {'--text (what the image should show)' if target is None else '--base-model DIR'}")
    torch_device(device)
    if prompt is None:
        if unet_lora is None:
            raise CfdeployError(
                "--source-text is needed (what the image shows) unless --unet-lora names a run to take it from"
            )
        prompt = read_run(unet_lora).settings.prompt
    settings = AbductSettings(
        prompt,
        target,
        unet_steps=unet_steps,
        text_steps=text_steps,
        rank=rank,
        text_rank=text_rank,
        eta=eta,
        lr=lr,
        seed=seed,
        resolution=resolution,
        variant=variant,
        save_every=save_every,
    )
    with resumable(out / CHECKPOINT), progress_bar() as bar:
        task = bar.add_task("starting", total=None)

        def on_progress(progress: Progress) -> None:
            bar.update(
                task,
                completed=progress.step,
                total=progress.steps,
                description=f"{progress.phase} loss {progress.loss:.4f} | {1 / progress.step_s:.2f} steps/s",
            )

        writing = threading.Lock()
        manifest = interruptible(
            lambda: abduct(
                settings,
                AbductInputs(image, base_model, unet_lora),
                out,
                device=device,
                resume=resume,
                force=force,
                on_stage=lambda stage: bar.update(task, description=stage),
                on_progress=on_progress,
                on_estimate=lambda estimate: say(estimate.describe()),
                writing=writing,
            ),
            writing,
        )
    finals = ", ".join(f"{phase} {losses[-1]:.4f}" for phase, losses in manifest["losses"].items() if losses)
    say(
        f"wrote {out} (final losses: {finals or 'none, U reused'}); edit it with: cfdeploy dac edit --run {out} --out EDITS"
    )


@dac_app.command("edit", context_settings=POSITIONAL_ARTIFACT)
@user_errors
def edit_command(
    context: typer.Context,
    run: Path | None = typer.Option(
        None,
        "--run",
        metavar="RUN",
        help="A run (`dac abduct`), sampled with PyTorch; with --bundle, sampled on the bundle's "
        "graphs or engines instead (same base model, rank and resolution; its U replaces the "
        "bundle's, a refit of the TensorRT UNet engine; β 1).",
    ),
    bundle: Path | None = typer.Option(
        None,
        "--bundle",
        metavar="DACBUNDLE",
        help="A bundle (`dac export`), sampled with ONNX Runtime (no torch) or TensorRT.",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", metavar="DIR", help="One PNG per seed (or --noise latent), contact_sheet.png and edit.json."
    ),
    beta: float = typer.Option(
        1.0,
        "--beta",
        rich_help_panel=SAMPLING,
        help="How much of Δ to subtract: its weight is -β (0: the plain counterfactual, -1 reconstructs the image).",
    ),
    guidance: float = typer.Option(4.0, "--guidance", rich_help_panel=SAMPLING, help="Classifier-free guidance scale."),
    steps: int = typer.Option(
        30, "--steps", rich_help_panel=SAMPLING, help="Scheduler steps (PNDM: 30 steps are 31 UNet calls)."
    ),
    seed: int | None = typer.Option(
        None,
        "--seed",
        metavar="N",
        rich_help_panel=SAMPLING,
        help="First seed of the initial noise: torch.randn from torch.Generator(device).manual_seed "
        "(a bundle draws the CPU generator's numbers); default 29.",
    ),
    num: int | None = typer.Option(
        None,
        "--num",
        metavar="K",
        rich_help_panel=SAMPLING,
        help="Seeds in a row from --seed, one generator each (the paper keeps the best of 8); default 8.",
    ),
    old_num: int | None = typer.Option(None, "--samples", hidden=True),
    noise: Path | None = typer.Option(
        None,
        "--noise",
        metavar="FILE",
        rich_help_panel=SAMPLING,
        help="Initial latents instead of seeds: a .npy [N,C,H,W] (or one sample's [C,H,W]) "
        "of the model's latent shape, e.g. drawn from another generator.",
    ),
    scheduler: str = typer.Option(
        "pndm",
        "--scheduler",
        metavar="pndm|ddim",
        rich_help_panel=SAMPLING,
        help="pndm: the base model's own (official); ddim from the same config.",
    ),
    base_model: Path | None = MOVED_BASE_MODEL,
    old_base_model: Path | None = OLD_BASE_MODEL,
    backend: str | None = typer.Option(
        None,
        "--backend",
        metavar="NAME",
        help="torch for a run; onnxruntime (default) or tensorrt (engines from `dac build-engines`) for a bundle.",
    ),
    expect_manifest: str | None = typer.Option(
        None,
        "--expect-manifest",
        metavar="SHA256",
        help="Refuse a bundle whose manifest.json has another sha256 (`cfdeploy inspect DACBUNDLE` prints it).",
    ),
    device: str | None = typer.Option(
        None, "--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cpu; cuda for tensorrt)."
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing --out directory."),
) -> None:
    """Sample DAC's edit: the target prompt with Δ subtracted and U annealed by γ(t), from a run or a bundle.

    Example: cfdeploy dac edit --run runs/cat_cap --out edits/cat_cap --num 8

    Seed 29, the first, draws the official script's latents (torch.randn from torch.Generator(device).manual_seed(29)).

    On a GPU: cfdeploy dac build-engines --bundle bundles/cat_cap, then cfdeploy dac edit --bundle bundles/cat_cap
    --backend tensorrt --out edits/cat_cap_trt (add --run runs/dog_hat to sample another run of the same base model on
    the same engines).
    """
    from cfdeploy.dac.edits import PredictSettings, edit, source_format
    from cfdeploy.dac.run import FORMAT as RUN_FORMAT
    from cfdeploy.errors import CfdeployError

    old_source = one_positional(context)
    if old_source is not None:  # the retired positional RUN|DACBUNDLE
        is_run = source_format(old_source) == RUN_FORMAT
        if is_run:
            run = retired("a positional RUN", old_source, "--run", run)
        else:
            bundle = retired("a positional DACBUNDLE", old_source, "--bundle", bundle)
    base_model = retired("-b", old_base_model, "--base-model", base_model)
    samples = retired("--samples", old_num, "--num", num)
    source = bundle or run
    if source is None:
        raise CfdeployError("give --run RUN (PyTorch) or --bundle DACBUNDLE (ONNX Runtime or TensorRT)")
    for option, path, kind in (("--run", run, RUN_FORMAT), ("--bundle", bundle, None)):
        if path is not None and (source_format(path) == RUN_FORMAT) != (kind == RUN_FORMAT):
            raise CfdeployError(
                f"{option} {path}: is a DAC {'bundle' if kind else 'run'}; give it as {'--bundle' if kind else '--run'}"
            )
    if expect_manifest is not None and bundle is None:
        raise CfdeployError("--expect-manifest pins a bundle's manifest; give --bundle")
    seeding = {name: value for name, value in (("seed", seed), ("samples", samples)) if value is not None}
    if noise is not None and seeding:
        raise CfdeployError("--noise gives the initial latents; leave out --seed and --num")
    settings = PredictSettings(beta=beta, guidance=guidance, steps=steps, scheduler=scheduler, **seeding)
    with progress_bar() as bar:
        task = bar.add_task("starting", total=None if noise else settings.samples)
        report = edit(
            source,
            out,
            settings,
            base_model=base_model,
            device=device,
            backend=backend,
            refit_run=run if bundle is not None else None,
            noise=noise,
            expect_manifest=expect_manifest,
            force=force,
            on_stage=lambda stage: bar.update(task, description=stage),
            on_sample=lambda name: bar.update(task, advance=1, description=f"sampled {name}"),
        )
    seconds = report["seconds_per_sample"]
    say(
        f"wrote {len(seconds)} sample(s) to {out} ({sorted(seconds)[len(seconds) // 2]:.1f} s per sample, median); "
        f"overview: {out / 'contact_sheet.png'}"
    )


@dac_app.command("export", context_settings=POSITIONAL_ARTIFACT)
@user_errors
def export_command(
    context: typer.Context,
    run: Path | None = typer.Option(
        None, "--run", metavar="RUN", help="A run directory written by `cfdeploy dac abduct`."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", metavar="DACBUNDLE", help="Bundle directory: ONNX graphs, embeddings, manifest.json."
    ),
    unet: str = typer.Option(
        "scale-input",
        "--unet",
        metavar="scale-input|merged",
        help="scale-input: U unmerged, its weight γ(t) a graph input (exact); merged: U folded in at the mean "
        "γ of the default schedule (a stock UNet graph, faster, an approximation: the difference is recorded).",
    ),
    base_model: Path | None = MOVED_BASE_MODEL,
    old_base_model: Path | None = OLD_BASE_MODEL,
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing --out directory."),
    no_export_cache: bool = typer.Option(
        False,
        "--no-export-cache",
        help="Trace every graph afresh. By default the text encoder and VAE decoder exported before from the same "
        "weights, code and versions (the VAE decoder every run of a base model shares) are reused from the cache "
        "beside the compiled graphs ($CFDEPLOY_CACHE_DIR, else ~/.cache/cfdeploy), and checked against PyTorch like "
        "new ones.",
    ),
) -> None:
    """Export a DAC run to a torch-free bundle of ONNX graphs, each checked against PyTorch.

    The text encoder with Δ, the UNet with U, the VAE decoder; `cfdeploy dac edit --bundle DACBUNDLE` samples it with
    ONNX Runtime (or TensorRT after `cfdeploy dac build-engines`).

    Example: cfdeploy dac export --run runs/cat_cap --out bundles/cat_cap
    """
    from cfdeploy.dac.export import export_dac_bundle

    run = artifact("--run", run, context)
    base_model = retired("-b", old_base_model, "--base-model", base_model)

    with phase("exporting") as status:
        manifest = export_dac_bundle(
            run,
            out,
            unet_mode=unet,
            base_model=base_model,
            force=force,
            reuse_exports=not no_export_cache,
            on_stage=lambda stage: status.update(stage),
        )
    parity = ", ".join(f"{name} {values['rel_l2']:.1e}" for name, values in manifest["parity"].items())
    merged = manifest["parity"]["unet"].get("merged_vs_exact_rel_l2")
    note = f"; merged UNet vs the exact γ(t) path: rel L2 {merged:.1e}" if merged is not None else ""
    reused = manifest["export"]["reused"]
    if reused:
        note += f"; {', '.join(reused)} reused from earlier exports"
    say(f"wrote {out} (ONNX Runtime vs PyTorch, rel L2: {parity}{note})")


@dac_app.command("build-engines", context_settings=POSITIONAL_ARTIFACT)
@user_errors
def build_engines_command(
    context: typer.Context,
    bundle: Path | None = typer.Option(
        None, "--bundle", metavar="DACBUNDLE", help="A bundle written by `cfdeploy dac export`."
    ),
    device: str = typer.Option("cuda", "--device", metavar="DEVICE", help="The GPU to build for: cuda or cuda:N."),
    rebuild: bool = typer.Option(
        False, "--rebuild", help="Rebuild engines whose key differs (another graph, TensorRT or GPU)."
    ),
) -> None:
    """Build TensorRT engines for a DAC bundle into DACBUNDLE/tensorrt (needs TensorRT and a CUDA GPU).

    The UNet fp16 and refittable (another run's U is a refit: `dac edit --run`), the text encoder and VAE decoder
    fp32; engines whose key matches are kept.

    Example: cfdeploy dac build-engines --bundle bundles/cat_cap
    """
    from cfdeploy.devices import parse_device

    bundle = artifact("--bundle", bundle, context)
    parse_device(device)
    from cfdeploy.dac.engines import build_dac_engines

    with phase("building engines") as status:
        built = build_dac_engines(bundle, rebuild=rebuild, report=lambda message: status.update(message), device=device)
    for engine in built:
        say(
            f"{engine.network}: {engine.path} ({'kept' if engine.seconds is None else f'built in {engine.seconds:.0f} s'})"
        )
