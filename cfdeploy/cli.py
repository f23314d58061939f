"""``cfdeploy``: thin Typer commands over the library. Heavy imports (torch) happen inside commands."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from cfdeploy.errors import CfdeployError

app = typer.Typer(
    help="Deploy CF-CLIP text-driven StyleGAN2 editors: edit images from text, embed prompts, inspect files.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)
Command = TypeVar("Command", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_errors(command: Command) -> Command:
    """Turn library errors into one line on stderr and exit 2; anything else into exit 1, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CfdeployError as error:
            raise fail(str(error)) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing was written", code=130) from None
        except Exception as error:
            if os.environ.get("CFDEPLOY_DEBUG"):
                raise
            raise fail(f"unexpected {type(error).__name__}: {error} (set CFDEPLOY_DEBUG=1 for a traceback)", 1) from None

    return wrapper  # type: ignore[return-value]


class Backend(str, Enum):
    torch = "torch"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class TorchPrecision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class EnginePrecision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    mixed = "mixed"


# Engine build options, shared by `export --tensorrt` and `build-engines`.
ENGINE_PRECISION = typer.Option(
    None, "--precision",
    help="Engine precision for CLIP text and the generator: fp32, fp16, or mixed (fp16 convolutions; style, demodulation "
    "and RGB layers fp32). Default: each network's contract (generator mixed, CLIP text fp16). The mappers and the "
    "mapping network are always fp32.",
)
MIN_BATCH = typer.Option(1, "--min-batch", help="Engine profile: smallest batch.")
OPT_BATCH = typer.Option(None, "--opt-batch", help="Engine profile: batch tuned for \\[default: --max-batch].")
MAX_BATCH = typer.Option(8, "--max-batch", help="Engine profile: largest batch.")
STATIC_BATCH = typer.Option(
    None, "--static-batch", help="Build for exactly this batch (smaller batches are padded): less memory, and CUDA graphs."
)
WORKSPACE = typer.Option(None, "--workspace", help="TensorRT workspace limit, e.g. 512MiB on a small Jetson \\[default: TensorRT's].")


def progress_bar():  # type: ignore[no-untyped-def]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


@app.command("edit")
@user_errors
def edit_command(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must be empty or absent unless --force)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="CF-CLIP checkpoint (.pt with state_dict and opts), for --backend torch."
    ),
    bundle: Optional[Path] = typer.Option(
        None, "--bundle", help="Bundle directory from `cfdeploy export`, for --backend onnxruntime or tensorrt."
    ),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Prompt to edit toward."),
    text_embedding: Optional[Path] = typer.Option(
        None, "--text-embedding", help=".npy of unnormalised CLIP text features, [512] or [N,512]; bypasses CLIP."
    ),
    latents: Optional[Path] = typer.Option(
        None, "--latents", "-l", help="W+ [N,n,512] or W [N,512] codes (.npy, or a torch-saved tensor)."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sample codes from this seed instead of --latents."),
    num: int = typer.Option(1, "--num", min=1, help="With --seed: how many codes to sample."),
    truncation: float = typer.Option(0.7, "--truncation", help="With --seed: truncation psi toward the mean W."),
    clip_weights: Optional[Path] = typer.Option(
        None, "--clip-weights", help="CLIP ViT-B/32 weights (OpenAI's ViT-B-32.pt or open_clip), torch backend with --text."
    ),
    strength: float = typer.Option(1.0, "--strength", "-s", help="Edit strength S: w_hat = w + S*0.1*delta (1 = official)."),
    backend: Optional[Backend] = typer.Option(
        None, "--backend",
        help="Runtime: torch (from --checkpoint), onnxruntime or tensorrt (from --bundle). Default: by input.",
    ),
    device: str = typer.Option("cpu", "--device", help="torch backend: cpu, cuda or cuda:N."),
    precision: TorchPrecision = typer.Option(
        TorchPrecision.fp32, "--precision",
        help="torch backend, generator only: fp32, fp16 (autocast; for CUDA) or bf16 (for CPUs with bf16 units).",
    ),
    cuda_graphs: bool = typer.Option(
        False, "--cuda-graphs", help="torch on CUDA: replay the generator as a CUDA graph (TensorRT: static engines always do)."
    ),
    engines: Optional[Path] = typer.Option(
        None, "--engines", help="tensorrt backend: engine directory \\[default: BUNDLE/tensorrt]."
    ),
    providers: Optional[str] = typer.Option(
        None, "--providers", help="onnxruntime backend: comma-separated execution providers (default: best available)."
    ),
    batch_size: int = typer.Option(4, "--batch-size", "-b", min=1, help="Codes per mapper/generator call."),
    side_by_side: bool = typer.Option(False, "--side-by-side", help="Write source|edit pairs instead of edits."),
    save_latents: bool = typer.Option(False, "--save-latents", help="Also write latents.npy (edited W+, float32)."),
    save_raw: bool = typer.Option(False, "--save-raw", help="Also write images.npy (raw generator output, float32)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace a non-empty --out directory."),
    refine_steps: int = typer.Option(
        0, "--refine-steps", help="After the feed-forward edit, optimise each latent for K steps with the CLIP-NCE loss."
    ),
    refine_lr: float = typer.Option(0.01, "--refine-lr", help="Refinement: Adam learning rate."),
    refine_l2: float = typer.Option(0.8, "--refine-l2", help="Refinement: weight L of mean((w - w_hat)^2)."),
    source_text: Optional[str] = typer.Option(
        None, "--source-text", help="Refinement: what the source images show \\[default: the checkpoint's, or 'face']."
    ),
    refine_layers: str = typer.Option("all", "--refine-layers", help="Refinement: all, coarse, medium or fine levels."),
) -> None:
    """Edit images toward a text prompt with a CF-CLIP checkpoint (torch) or a bundle (onnxruntime, tensorrt).

    Writes DIR/000000.png, 000001.png, … and DIR/edit.json (inputs, timings, versions); nothing is
    written if anything fails.
    """
    from cfdeploy.outputs import check_output_dir

    backend = backend or (Backend.onnxruntime if bundle is not None and checkpoint is None else Backend.torch)
    if (text is None) == (text_embedding is None):
        raise CfdeployError("give exactly one of --text or --text-embedding")
    if (latents is None) == (seed is None):
        raise CfdeployError("give exactly one of --latents or --seed")
    check_output_dir(out, force)
    if refine_steps < 0:
        raise CfdeployError(f"--refine-steps must be 0 or more, got {refine_steps}")
    inputs: dict[str, Any] = {"backend": backend.value}
    text_cache = None
    if backend is Backend.torch:
        if checkpoint is None:
            raise CfdeployError("--backend torch needs --checkpoint (a bundle runs with --backend onnxruntime)")
        if text is not None and clip_weights is None:
            raise CfdeployError("--text needs --clip-weights (CLIP ViT-B/32 weights); or pass --text-embedding")
        from cfdeploy.backends.torch_backend import TorchBackend, resolve_device

        resolve_device(device)
        with console.status("loading models"):
            needs_clip = text is not None or refine_steps > 0
            engine: Any = TorchBackend.from_checkpoint(
                checkpoint, clip_weights if needs_clip else None, device, precision.value, cuda_graphs
            )
        inputs.update(checkpoint=str(checkpoint), clip_weights=str(clip_weights) if clip_weights else None, device=device,
                      precision=precision.value, cuda_graphs=cuda_graphs)
    else:
        if bundle is None:
            raise CfdeployError(f"--backend {backend.value} needs --bundle (make one with cfdeploy export)")
        if device != "cpu" or precision is not TorchPrecision.fp32:
            raise CfdeployError(f"--device and --precision are for the torch backend, not {backend.value}")
        from cfdeploy.bundle import TextLatentCache

        if backend is Backend.tensorrt:
            from cfdeploy.trt import tensorrt_module

            engine = tensorrt_module("runtime").TensorRTBackend.from_bundle(bundle, engines)
            inputs.update(bundle=str(bundle), engines=str(engine.engine_dir), gpu=engine.gpu[0])
        else:
            from cfdeploy.backends.onnxruntime_backend import OnnxRuntimeBackend

            engine = OnnxRuntimeBackend.from_bundle(bundle, providers.split(",") if providers else None)
            inputs.update(bundle=str(bundle), providers=engine.providers)
        text_cache = TextLatentCache(engine.bundle)
    refiner = None
    if refine_steps > 0:
        refiner = build_refiner(
            engine, (refine_steps, refine_lr, refine_l2, refine_layers), text, source_text, checkpoint, clip_weights
        )
    run_edit(
        engine, out, text=text, text_embedding=text_embedding, latents=latents, seed=seed, num=num,
        truncation=truncation, strength=strength, batch_size=batch_size, side_by_side=side_by_side,
        save_latents=save_latents, save_raw=save_raw, force=force, inputs=inputs, text_cache=text_cache, refiner=refiner,
    )


def build_refiner(
    engine: Any,
    options: tuple[int, float, float, str],
    text: str | None,
    source_text: str | None,
    checkpoint: Path | None,
    clip_weights: Path | None,
) -> Any:
    """The torch models refinement differentiates through, whichever backend made the feed-forward edit."""
    try:
        import torch

        from cfdeploy.refine import ClipNCELoss, RefineSettings, Refiner
    except ImportError:
        raise CfdeployError("refinement runs in torch: install the 'export' extra (pip install 'cfdeploy[export]')") from None
    if clip_weights is None:
        raise CfdeployError("--refine-steps needs --clip-weights (CLIP ViT-B/32 with its image encoder)")
    target = text or engine.description
    if not target:
        raise CfdeployError("--refine-steps needs a target prompt: pass --text, or use a checkpoint that records one")
    if getattr(engine, "clip", None) is not None:
        generator, clip = engine.generator, engine.clip
    else:
        if checkpoint is None:
            raise CfdeployError("refinement with a bundle needs the torch models too: pass --checkpoint (and --clip-weights)")
        from cfdeploy.checkpoints import load_cfclip
        from cfdeploy.models.clip_text import ClipText

        device = "cuda" if torch.cuda.is_available() else "cpu"
        generator = load_cfclip(checkpoint).generator.to(device)
        clip = ClipText.from_file(clip_weights).to(device)
    steps, lr, l2, layers = options
    source = source_text or getattr(engine, "source_text", None) or "face"
    settings = RefineSettings(steps, lr, l2, source, layers)
    with console.status("preparing the CLIP-NCE loss"):
        loss = ClipNCELoss(clip, source, target).to(next(generator.parameters()).device)
    return Refiner(generator, loss, settings)


def run_edit(
    engine: Any,
    out: Path,
    *,
    text: str | None,
    text_embedding: Path | None,
    latents: Path | None,
    seed: int | None,
    num: int,
    truncation: float,
    strength: float,
    batch_size: int,
    side_by_side: bool,
    save_latents: bool,
    save_raw: bool,
    force: bool,
    inputs: dict[str, Any],
    text_cache: Any = None,
    refiner: Any = None,
) -> dict[str, Any]:
    """Shared by ``edit`` and ``demo``: resolve latents and text, run, report."""
    from cfdeploy.editing import EditJob, edit_to_directory
    from cfdeploy.inputs import broadcast_latents, load_latents, load_text_embedding, seeded_z

    if latents is not None:
        codes = load_latents(latents, engine.n_latent, engine.style_dim)
        inputs = {**inputs, "latents": str(latents)}
    else:
        assert seed is not None
        w = engine.sample_w(seeded_z(seed, num, engine.style_dim), truncation)
        codes = broadcast_latents(w, engine.n_latent, engine.style_dim, f"seed {seed}")
        inputs = {**inputs, "seed": seed, "num": num, "truncation": truncation}
    features = None
    if text_embedding is not None:
        features = load_text_embedding(text_embedding, len(codes))
        inputs = {**inputs, "text_embedding": str(text_embedding)}
    job = EditJob(codes, text, features, strength, batch_size, with_sources=side_by_side, text_cache=text_cache,
                  refiner=refiner)
    with progress_bar() as progress:
        task = progress.add_task(f"editing ({engine.name})", total=len(codes))
        if refiner is not None:
            steps = progress.add_task("refining", total=refiner.settings.steps * -(-len(codes) // batch_size))
            refiner.on_step = lambda loss: progress.update(steps, advance=1, description=f"refining (loss {loss:.4f})")
        summary = edit_to_directory(
            engine, job, out, force=force, save_latents=save_latents, save_raw=save_raw, inputs=inputs,
            on_batch=lambda done: progress.advance(task, done),
        )
    timings = ", ".join(f"{name} {seconds:.3f}s" for name, seconds in summary["timings_s"].items())
    console.print(f"wrote {len(codes)} image(s) to {out} in {summary['total_s']:.2f}s ({timings})", highlight=False, markup=False)
    if text is not None and engine.description and text.strip().lower() != engine.description.strip().lower():
        console.print(
            f"[yellow]warning:[/] this checkpoint was trained for {escape(repr(engine.description))}, not {escape(repr(text))}; "
            "CF-CLIP mappers are per prompt, so expect a weak or odd edit",
            highlight=False,
        )
    return summary


@app.command("export")
@user_errors
def export_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="CF-CLIP checkpoint to export."),
    clip_weights: Path = typer.Option(..., "--clip-weights", help="CLIP ViT-B/32 weights (OpenAI's ViT-B-32.pt or open_clip)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Bundle directory \\[default: engines/<checkpoint name>]."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18 or newer)."),
    prompt: Optional[List[str]] = typer.Option(
        None, "--prompt", help="Precompute the text branch for this prompt (repeatable); it then needs no CLIP at run time."
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing bundle directory."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Then build TensorRT engines into BUNDLE/tensorrt (options below)."),
    engine_precision: Optional[EnginePrecision] = ENGINE_PRECISION,
    min_batch: int = MIN_BATCH,
    opt_batch: Optional[int] = OPT_BATCH,
    max_batch: int = MAX_BATCH,
    static_batch: Optional[int] = STATIC_BATCH,
    workspace: Optional[str] = WORKSPACE,
) -> None:
    """Export a checkpoint to a self-contained ONNX bundle that runs without torch (and, with --tensorrt, engines).

    Writes one ONNX graph per network (CLIP text, text mapper, latent mapper + residual, generator,
    mapping), the tokenizer data, mean W and manifest.json with sha256 of every file and the parity of
    each graph against torch (checked at batch 1 and 3; export fails past relative L2 1e-5).
    """
    from cfdeploy.outputs import check_output_dir

    target = out or Path("engines") / checkpoint.stem
    check_output_dir(target, force)
    if opset < 18:
        raise CfdeployError(f"--opset {opset}: the exporter needs opset 18 or newer")
    build_settings = None
    if tensorrt:
        build_settings = engine_build_settings(
            engine_precision, min_batch, opt_batch, max_batch, static_batch, workspace, None, False, None
        )
        from cfdeploy.trt import tensorrt_module

        tensorrt_module("builder")  # fail before the slow export, not after it
    from cfdeploy.exporter import export_bundle

    started = time.perf_counter()
    with console.status("exporting") as status:
        manifest = export_bundle(
            checkpoint, clip_weights, target, opset=opset, prompts=prompt or [], force=force,
            on_stage=lambda stage: (status.update(stage), console.log(stage)),
        )
    worst = max(result["rel_l2"] for network in manifest["networks"].values() for result in network["parity"].values())
    console.print(
        f"wrote bundle {target} in {time.perf_counter() - started:.1f}s: {len(manifest['networks'])} graphs, "
        f"worst parity rel L2 {worst:.1e}",
        highlight=False,
    )
    if build_settings is not None:
        build_bundle_engines(target, build_settings)


def engine_build_settings(
    precision: Optional[EnginePrecision], min_batch: int, opt_batch: Optional[int], max_batch: int,
    static_batch: Optional[int], workspace: Optional[str], networks: Optional[str], rebuild: bool, engines: Optional[Path],
) -> Any:
    """Options checked before anything slow starts; TensorRT itself is only imported to build."""
    from cfdeploy.trt.plan import BuildSettings, batch_profile, parse_bytes

    return BuildSettings(
        profile=batch_profile(min_batch, opt_batch, max_batch, static_batch),
        precision=precision.value if precision else None,
        workspace_bytes=parse_bytes(workspace) if workspace else None,
        networks=[name.strip() for name in networks.split(",") if name.strip()] if networks else None,
        rebuild=rebuild,
        engine_dir=engines,
    )


def build_bundle_engines(bundle: Path, settings: Any) -> None:
    from cfdeploy.trt import tensorrt_module

    builder = tensorrt_module("builder")
    started = time.perf_counter()
    with console.status("building TensorRT engines") as status:
        built = builder.build_engines(bundle, settings, lambda message: (status.update(message), console.log(message)))
    for engine in built:
        made = "kept (up to date)" if engine.seconds is None else f"built in {engine.seconds:.1f}s"
        console.print(f"{engine.network}: {engine.key.precision}, {made} → {engine.path}", highlight=False, markup=False)
    console.print(f"engines ready in {time.perf_counter() - started:.1f}s", highlight=False)


@app.command("build-engines")
@user_errors
def build_engines_command(
    bundle: Path = typer.Argument(..., help="Bundle directory from `cfdeploy export`."),
    engine_precision: Optional[EnginePrecision] = ENGINE_PRECISION,
    min_batch: int = MIN_BATCH,
    opt_batch: Optional[int] = OPT_BATCH,
    max_batch: int = MAX_BATCH,
    static_batch: Optional[int] = STATIC_BATCH,
    workspace: Optional[str] = WORKSPACE,
    networks: Optional[str] = typer.Option(None, "--networks", help="Comma-separated subset \\[default: all in the bundle]."),
    engines: Optional[Path] = typer.Option(None, "--engines", help="Engine directory \\[default: BUNDLE/tensorrt]."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Replace engines built for another graph, TensorRT, GPU or profile."),
) -> None:
    """Build TensorRT engines for a bundle on this GPU (run it on the target device: engines do not travel).

    Each engine is stored with a key (ONNX sha256, TensorRT version, GPU and compute capability,
    precision, batch profile); an up-to-date engine is kept, a mismatched one is refused unless
    --rebuild. The mapper engines are built refittable, for `cfdeploy refit`.
    """
    from cfdeploy.bundle import Bundle

    settings = engine_build_settings(
        engine_precision, min_batch, opt_batch, max_batch, static_batch, workspace, networks, rebuild, engines
    )
    Bundle(bundle)
    build_bundle_engines(bundle, settings)


@app.command("refit")
@user_errors
def refit_command(
    bundle: Path = typer.Argument(..., help="Bundle directory to update in place."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="CF-CLIP checkpoint of another prompt, same generator."),
) -> None:
    """Swap a bundle's mappers for another prompt's checkpoint, keeping its generator graph and engines.

    Refuses a checkpoint whose generator weights differ from the bundle's (sha256) or whose mappers
    have another layout. Replaces the text-mapper and latent-editor graphs (checked against torch),
    recomputes stored prompts, and refits the TensorRT mapper engines where TensorRT and a GPU are here.
    """
    from cfdeploy.checkpoints import require_file
    from cfdeploy.refit import refit_bundle

    require_file(checkpoint)
    with console.status("refitting") as status:
        summary = refit_bundle(bundle, checkpoint, lambda message: (status.update(message), console.log(message)))
    changed = ", ".join(f"{name} {count} weights" for name, count in summary["changed_weights"].items())
    console.print(f"refitted {bundle} to {summary['description']!r}: {changed}", highlight=False, markup=False)
    if summary["stale_engines"]:
        console.print(
            f"stale TensorRT engines (rebuild on the target GPU with cfdeploy build-engines --rebuild): "
            f"{', '.join(summary['stale_engines'])}", highlight=False, markup=False,
        )


@app.command("embed")
@user_errors
def embed_command(
    prompts: List[str] = typer.Argument(..., help="One or more prompts."),
    clip_weights: Path = typer.Option(..., "--clip-weights", help="CLIP ViT-B/32 weights file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy: float32 [N,512], unnormalised."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing --out file."),
) -> None:
    """Encode prompts with CLIP's text tower (the features CF-CLIP's text mapper reads)."""
    from cfdeploy.outputs import write_npy_atomic

    if out.exists() and not force:
        raise CfdeployError(f"{out}: file exists (use --force to replace it)")
    import torch

    from cfdeploy.backends.torch_backend import resolve_device
    from cfdeploy.models.clip_text import ClipText
    from cfdeploy.tokenizer import ClipTokenizer

    target = resolve_device(device)
    tokens = torch.from_numpy(ClipTokenizer()(prompts)).to(target)
    clip = ClipText.from_file(clip_weights).to(target)
    with torch.inference_mode():
        features = clip(tokens).float().cpu().numpy()
    write_npy_atomic(out, features, force)
    console.print(f"wrote {out}: {len(prompts)} embedding(s) [{features.shape[0]},{features.shape[1]}]", highlight=False, markup=False)


@app.command("inspect")
@user_errors
def inspect_command(
    file: Path = typer.Argument(..., help="Checkpoint, CLIP weights, latents/embedding array, or bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Say what a file is: kind, resolution, levels, trained prompt, mapper groups, parameter counts."""
    from cfdeploy.inspection import inspect_file

    report = inspect_file(file)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.table import Table

    table = Table(title=str(file), show_header=False)
    for key, value in report.items():
        if isinstance(value, dict) and all(isinstance(entry, str) for entry in value.values()):
            value = "\n".join(f"{name}: {entry}" for name, entry in value.items()) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{name} {count:,}" if isinstance(count, int) else f"{name} {count}" for name, count in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        table.add_row(key, str(value))
    Console().print(table)


@app.command("demo")
@user_errors
def demo_command(
    out: Path = typer.Option(Path("cfdeploy-demo"), "--out", "-o", help="Output directory."),
    size: int = typer.Option(256, "--size", help="Generator resolution (power of two, 256…1024)."),
    num: int = typer.Option(4, "--num", min=1, help="How many seeded codes to edit."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace a non-empty --out directory."),
) -> None:
    """Run the whole pipeline on a synthetic model set: no downloads, real architecture, real timings.

    The weights are random, so the pictures mean nothing; the pipeline and its speed are real.
    """
    from cfdeploy.demo import DEMO_PROMPT, synthetic_backend
    from cfdeploy.outputs import check_output_dir

    if size < 8 or size & (size - 1):
        raise CfdeployError(f"--size must be a power of two, got {size}")
    check_output_dir(out, force)
    console.print(
        "[bold]demo:[/] synthetic weights (seeded random, real CF-CLIP architecture): "
        "the pipeline and its timings are real, the pictures are not meaningful.",
        highlight=False,
    )
    started = time.perf_counter()
    with console.status("building synthetic models"):
        engine = synthetic_backend(size=size, seed=0, device=device)
    build_s = time.perf_counter() - started
    run_edit(
        engine, out, text=DEMO_PROMPT, text_embedding=None, latents=None, seed=0, num=num, truncation=0.7,
        strength=1.0, batch_size=2, side_by_side=True, save_latents=True, save_raw=False, force=force,
        inputs={"synthetic_weights": True, "model_build_s": round(build_s, 3)},
    )
    console.print(f"before|after pairs: {out}/000000.png …; details: {out}/edit.json", highlight=False, markup=False)


def _int_list(value: str, option: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise CfdeployError(f"{option} {value!r}: expected comma-separated integers") from None
    if not numbers or min(numbers) < 1:
        raise CfdeployError(f"{option} {value!r}: expected positive integers")
    return numbers


@app.command("bench")
@user_errors
def bench_command(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="CF-CLIP checkpoint to benchmark."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Exported bundle to benchmark."),
    synthetic: Optional[int] = typer.Option(
        None, "--synthetic", help="Benchmark the real architecture at this size with synthetic weights (no files needed)."
    ),
    clip_weights: Optional[Path] = typer.Option(None, "--clip-weights", help="CLIP weights, to time the text stages on torch."),
    backends: str = typer.Option("torch-reference,torch,onnxruntime", "--backends", help="Comma-separated backends."),
    batch_sizes: str = typer.Option("1", "--batch-sizes", help="Comma-separated batch sizes, e.g. 1,2,4,8."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed runs first."),
    runs: int = typer.Option(5, "--runs", min=1, help="Timed runs per backend and batch size."),
    prompt: str = typer.Option("green lipstick", "--prompt", help="Prompt for the text stages."),
    refine_steps: int = typer.Option(
        0, "--refine-steps", min=0, help="Also time K CLIP-NCE refinement steps per batch (torch backends; needs CLIP visual weights)."
    ),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Write one row per backend and batch size."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of latency per stage and backend."),
) -> None:
    """Per-stage latency (median, p90, p99, mean), images/s, peak RSS and image parity per backend.

    Each backend runs in its own process; parity is against the torch fp32 backend. Backends that are
    not installed, or have no device, are listed as skipped with the reason.
    """
    import tempfile

    from cfdeploy.bench import BACKENDS, BenchSettings, Sources, run_bench

    if sum(source is not None for source in (checkpoint, bundle, synthetic)) != 1:
        raise CfdeployError("give exactly one of --checkpoint, --bundle or --synthetic SIZE")
    names = [name.strip() for name in backends.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise CfdeployError(f"unknown backends {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    settings = BenchSettings(names, _int_list(batch_sizes, "--batch-sizes"), warmup, runs, prompt, refine_steps=refine_steps)
    with tempfile.TemporaryDirectory(prefix="cfdeploy-bench-") as scratch:
        sources = Sources(checkpoint, clip_weights, bundle)
        if synthetic is not None:
            if synthetic < 8 or synthetic & (synthetic - 1):
                raise CfdeployError(f"--synthetic must be a power of two, got {synthetic}")
            from cfdeploy.demo import save_synthetic_files

            with console.status(f"writing synthetic {synthetic} px files"):
                sources.checkpoint, sources.clip_weights = save_synthetic_files(
                    Path(scratch), synthetic, with_visual=refine_steps > 0
                )
        if "onnxruntime" in names and sources.bundle is None and sources.clip_weights is not None:
            from cfdeploy.exporter import export_bundle

            assert sources.checkpoint is not None
            with console.status("exporting a bundle for onnxruntime") as status:
                sources.bundle = Path(scratch) / "bundle"
                export_bundle(sources.checkpoint, sources.clip_weights, sources.bundle, on_stage=status.update)
        with console.status("benchmarking") as status:
            report = run_bench(sources, settings, on_backend=lambda name: status.update(f"benchmarking {name}"))
    print_bench(report)
    from cfdeploy.bench import write_csv, write_json, write_plot

    for path, writer in ((json_file, write_json), (csv_file, write_csv), (plot_file, write_plot)):
        if path is not None:
            writer(report, path)
            console.print(f"wrote {path}", highlight=False, markup=False)


def print_bench(report: dict[str, Any]) -> None:
    from rich.table import Table

    from cfdeploy.bench import STAGES, table_rows

    table = Table(title="cfdeploy bench: median ms per stage (per batch)")
    columns = ["backend", "batch", *STAGES, "p90", "p99", "img/s", "RSS MB", "GPU MB", "GPU ms", "max abs err", "PSNR dB"]
    for column in columns:
        table.add_column(column, justify="left" if column == "backend" else "right")

    def cell(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in table_rows(report):
        table.add_row(
            row["backend"], str(row["batch"]), *(cell(row[f"{stage}_median_ms"]) for stage in STAGES),
            cell(row["total_p90_ms"]), cell(row["total_p99_ms"]), cell(row["images_per_s"], 2), cell(row["peak_rss_mb"], 0),
            cell(row["gpu_memory_mb"], 0), cell(row["gpu_ms"]),
            cell(row["max_abs_error"], 6), cell(row["psnr_db"]),
        )
    screen = Console(width=None if sys.stdout.isatty() else 240)
    screen.print(table)
    for backend in report["backends"]:
        if "skipped" in backend:
            screen.print(f"skipped {backend['backend']}: {backend['skipped']}", highlight=False)


def main() -> None:
    app(prog_name="cfdeploy")


if __name__ == "__main__":
    sys.exit(main())
