"""Bundle commands: ``cfdeploy export``, ``build-engines`` and ``refit``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from cfdeploy.cli.common import (
    POSITIONAL_ARTIFACT,
    PRECISION_CHOICES,
    Precision,
    app,
    artifact,
    no_session_cache_option,
    phase,
    precision_among,
    reporter,
    retired,
    say,
    session_cache_option,
    user_errors,
    warn,
)
from cfdeploy.errors import CfdeployError

# Engine build options, shared by `export --tensorrt` and `build-engines`.
ENGINE_PRECISION = typer.Option(
    None,
    "--precision",
    metavar=PRECISION_CHOICES,
    help="Engine precision for CLIP text and the generator: fp32, fp16, or mixed (fp16 convolutions; style, demodulation "
    "and RGB layers fp32). Default: each network's contract (generator mixed, CLIP text fp16). The mappers and the "
    "mapping network are always fp32.",
)
MIN_BATCH = typer.Option(1, "--min-batch", help="Engine profile: smallest batch.")
OPT_BATCH = typer.Option(None, "--opt-batch", help="Engine profile: batch tuned for \\[default: --max-batch].")
MAX_BATCH = typer.Option(8, "--max-batch", help="Engine profile: largest batch.")
STATIC_BATCH = typer.Option(
    None,
    "--static-batch",
    help="Build for exactly this batch (smaller batches are padded): less memory, and CUDA graphs.",
)
WORKSPACE = typer.Option(
    None, "--workspace", help="TensorRT workspace limit, e.g. 512MiB on a small Jetson \\[default: TensorRT's]."
)


@app.command("export")
@user_errors
def export_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", metavar="FILE", help="CF-CLIP checkpoint to export."),
    clip_weights: Path | None = typer.Option(
        None,
        "--clip-weights",
        metavar="FILE",
        help="CLIP ViT-B/32 weights (OpenAI's ViT-B-32.pt or open_clip); not needed with --without-clip and no --text.",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", metavar="DIR", help="Bundle directory \\[default: engines/<checkpoint name>]."
    ),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18 or newer)."),
    text: list[str] | None = typer.Option(
        None,
        "--text",
        "-t",
        metavar="PROMPT",
        help="Precompute the text branch for this prompt (repeatable); it then needs no CLIP at run time.",
    ),
    old_prompt: list[str] | None = typer.Option(None, "--prompt", hidden=True),
    encoder: Path | None = typer.Option(
        None,
        "--encoder",
        metavar="FILE",
        help="Also export the e4e encoder (e4e_ffhq_encode.pt) as encoder.onnx, for photos in "
        "(`cfdeploy invert --bundle`, `cfdeploy edit --images`) without torch.",
    ),
    identity_weights: Path | None = typer.Option(
        None,
        "--identity-weights",
        metavar="FILE",
        help="Also export ArcFace IR-SE-50 (model_ir_se50.pth) as identity.onnx: `cfdeploy edit` then reports each "
        "edit's identity score (edit.json) without torch.",
    ),
    without_clip: bool = typer.Option(
        False,
        "--without-clip",
        help="Leave out the CLIP text graph (about 250 MB): the bundle then edits only the "
        "--text prompts precomputed here (these need --clip-weights), or --text-embedding features (no CLIP needed at "
        "all). For small edge devices.",
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing bundle directory."),
    no_export_cache: bool = typer.Option(
        False,
        "--no-export-cache",
        help="Trace every graph afresh. By default a graph exported before from the same weights, code and "
        "versions (the generator and CLIP that prompts share) is reused from the cache beside the compiled graphs "
        "($CFDEPLOY_CACHE_DIR, else ~/.cache/cfdeploy), and checked against torch like a new one.",
    ),
    tensorrt: bool = typer.Option(
        False, "--tensorrt", help="Then build TensorRT engines into BUNDLE/tensorrt (options below)."
    ),
    engine_precision: Precision | None = ENGINE_PRECISION,
    min_batch: int = MIN_BATCH,
    opt_batch: int | None = OPT_BATCH,
    max_batch: int = MAX_BATCH,
    static_batch: int | None = STATIC_BATCH,
    workspace: str | None = WORKSPACE,
) -> None:
    """Export a checkpoint to a self-contained ONNX bundle that runs without torch (and, with --tensorrt, engines).

    Writes one ONNX graph per network (CLIP text, text mapper, latent mapper + residual, generator,
    mapping), the tokenizer data, mean W and manifest.json with sha256 of every file and the parity of
    each graph against torch (checked at batch 1 and 3; export fails past relative L2 1e-5).
    """
    from cfdeploy.outputs import check_output_dir

    prompt = retired("--prompt", old_prompt, "--text", text)
    target = out or Path("engines") / checkpoint.stem
    check_output_dir(
        target, force, [path for path in (checkpoint, clip_weights, encoder, identity_weights) if path is not None]
    )
    if clip_weights is None and (not without_clip or prompt):
        needed = "--text" if without_clip else "the CLIP text graph"
        raise CfdeployError(
            f"{needed} needs --clip-weights (a bundle with --without-clip and no --text edits only with --text-embedding)"
        )
    if opset < 18:
        raise CfdeployError(f"--opset {opset}: the exporter needs opset 18 or newer")
    build_settings = None
    if tensorrt:
        build_settings = engine_build_settings(
            engine_precision, min_batch, opt_batch, max_batch, static_batch, workspace, None, False, None
        )
        from cfdeploy.trt import tensorrt_builder

        tensorrt_builder()  # fail before the slow export, not after it
    from cfdeploy.exporter import export_bundle

    started = time.perf_counter()
    with phase("exporting") as status:
        manifest = export_bundle(
            checkpoint,
            clip_weights,
            target,
            opset=opset,
            prompts=prompt or [],
            force=force,
            include_clip_text=not without_clip,
            encoder=encoder,
            identity_weights=identity_weights,
            reuse_exports=not no_export_cache,
            on_stage=reporter(status),
        )
    worst = max(result["rel_l2"] for network in manifest["networks"].values() for result in network["parity"].values())
    reused = manifest["export"]["reused"]
    say(
        f"wrote bundle {target} in {time.perf_counter() - started:.1f}s: {len(manifest['networks'])} graphs"
        + (f" ({', '.join(reused)} reused from earlier exports)" if reused else "")
        + f", worst parity rel L2 {worst:.1e}"
    )
    if build_settings is not None:
        build_bundle_engines(target, build_settings)


def engine_build_settings(
    precision: Precision | None,
    min_batch: int,
    opt_batch: int | None,
    max_batch: int,
    static_batch: int | None,
    workspace: str | None,
    networks: str | None,
    rebuild: bool,
    engines: Path | None,
) -> Any:
    """Options checked before anything slow starts; TensorRT itself is only imported to build."""
    from cfdeploy.trt.plan import PRECISIONS as ENGINE_PRECISIONS
    from cfdeploy.trt.plan import BuildSettings, batch_profile, parse_bytes

    return BuildSettings(
        profile=batch_profile(min_batch, opt_batch, max_batch, static_batch),
        precision=precision_among(precision, ENGINE_PRECISIONS, "TensorRT engines"),
        workspace_bytes=parse_bytes(workspace) if workspace else None,
        networks=[name.strip() for name in networks.split(",") if name.strip()] if networks else None,
        rebuild=rebuild,
        engine_dir=engines,
    )


def build_bundle_engines(bundle: Path, settings: Any, device: str = "cuda") -> None:
    from cfdeploy.trt import tensorrt_builder

    builder = tensorrt_builder()
    started = time.perf_counter()
    with phase("building TensorRT engines") as status:
        built = builder.build_engines(bundle, settings, reporter(status), device)
    for engine in built:
        made = "kept (up to date)" if engine.seconds is None else f"built in {engine.seconds:.1f}s"
        say(f"{engine.network}: {engine.key.precision}, {made} → {engine.path}")
    say(f"engines ready in {time.perf_counter() - started:.1f}s")


@app.command("build-engines", context_settings=POSITIONAL_ARTIFACT)
@user_errors
def build_engines_command(
    context: typer.Context,
    bundle: Path | None = typer.Option(
        None, "--bundle", metavar="DIR", help="Bundle directory from `cfdeploy export`."
    ),
    device: str = typer.Option("cuda", "--device", metavar="DEVICE", help="The GPU to build for: cuda or cuda:N."),
    engine_precision: Precision | None = ENGINE_PRECISION,
    min_batch: int = MIN_BATCH,
    opt_batch: int | None = OPT_BATCH,
    max_batch: int = MAX_BATCH,
    static_batch: int | None = STATIC_BATCH,
    workspace: str | None = WORKSPACE,
    networks: str | None = typer.Option(
        None, "--networks", help="Comma-separated subset \\[default: all in the bundle]."
    ),
    engines: Path | None = typer.Option(
        None, "--engines", metavar="DIR", help="Engine directory \\[default: BUNDLE/tensorrt]."
    ),
    rebuild: bool = typer.Option(
        False, "--rebuild", help="Replace engines built for another graph, TensorRT, GPU or profile."
    ),
) -> None:
    """Build TensorRT engines for a bundle on this GPU (run it on the target device: engines do not travel).

    Each engine is stored with a key (ONNX sha256, TensorRT version, GPU and compute capability,
    precision, batch profile); an up-to-date engine is kept, a mismatched one is refused unless
    --rebuild. The mapper engines are built refittable, for `cfdeploy refit`.
    """
    from cfdeploy.bundle import Bundle
    from cfdeploy.devices import parse_device

    bundle = artifact("--bundle", bundle, context)
    parse_device(device)
    settings = engine_build_settings(
        engine_precision, min_batch, opt_batch, max_batch, static_batch, workspace, networks, rebuild, engines
    )
    Bundle(bundle)
    build_bundle_engines(bundle, settings, device)


@app.command("refit", context_settings=POSITIONAL_ARTIFACT)
@user_errors
def refit_command(
    context: typer.Context,
    bundle: Path | None = typer.Option(None, "--bundle", metavar="DIR", help="Bundle directory to update in place."),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", "-c", metavar="FILE", help="CF-CLIP checkpoint of another prompt, same generator."
    ),
    no_session_cache: bool = no_session_cache_option(),
) -> None:
    """Swap a bundle's mappers for another prompt's checkpoint, keeping its generator graph and engines.

    Refuses a checkpoint whose generator weights differ from the bundle's (sha256) or whose mappers
    have another layout. Replaces the text-mapper and latent-editor graphs (checked against torch),
    recomputes stored prompts, and refits the TensorRT mapper engines where TensorRT and a GPU are here.
    """
    from cfdeploy.files import require_file
    from cfdeploy.refit import refit_bundle

    bundle = artifact("--bundle", bundle, context)
    require_file(checkpoint)
    with phase("refitting") as status:
        summary = refit_bundle(bundle, checkpoint, reporter(status), session_cache_option(no_session_cache))
    changed = ", ".join(f"{name} {count} weights" for name, count in summary["changed_weights"].items())
    say(f"refitted {bundle} to {summary['description']!r}: {changed}")
    if summary["stale_engines"]:
        warn(
            f"stale TensorRT engines (rebuild on the target GPU with cfdeploy build-engines --rebuild): "
            f"{', '.join(summary['stale_engines'])}"
        )
