"""``cfdeploy edit`` and ``cfdeploy demo``: parse, open a backend, run the edit into a staged directory, report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from cfdeploy.cli.common import (
    PRECISION_CHOICES,
    Precision,
    app,
    console,
    no_session_cache_option,
    phase,
    plain,
    precision_among,
    progress_bar,
    require_files,
    require_finite,
    require_range,
    say,
    session_cache_option,
    threads_option,
    user_errors,
    warn,
)
from cfdeploy.cli.photos import (
    ALIGNED,
    ALL_FACES,
    CROPS,
    FEATHER,
    JPEG_QUALITY,
    KEEP_METADATA,
    LANDMARKS,
    LANDMARKS_MODEL,
    MASK_DILATE,
    SAVE_MASK,
    SKIP_MISSING,
    landmark_options,
    paste_settings,
)
from cfdeploy.editing import DEFAULT_BATCH_SIZE, DEFAULT_PNG_COMPRESSION, check_sampling, paired_strengths
from cfdeploy.errors import CfdeployError, missing_extra

INPUT, PROMPT, OUTPUT, RUNTIME, REFINE = "Input", "Prompt", "Output", "Runtime", "Refinement (optional, torch)"


class BackendName(str, Enum):
    torch = "torch"
    onnxruntime = "onnxruntime"
    openvino = "openvino"
    tensorrt = "tensorrt"


def run_edit(
    backend: Any,
    staged: Any,
    codes: Any,
    *,
    text: str | list[str] | None,
    text_embedding: list[Path],
    strength: float | list[float],
    batch_size: int,
    side_by_side: bool,
    save_latents: bool,
    save_raw: bool,
    png_compression: int,
    inputs: dict[str, Any],
    refiner: Any = None,
    photos: Any = None,
    prior_timings: dict[str, float] | None = None,
    pasted: Any = None,
    crops: str | None = "",
    faces: Any = None,
) -> dict[str, Any]:
    """Shared by ``edit`` and ``demo``: the text, then the edit of ``codes`` with progress; returns edit.json's content.

    Several prompts (or text embeddings) compose into one edit; one of each is the paper's edit, recorded as before.
    The edit is scored for identity where the backend has the network (``faces``: the photos' aligned faces).
    """
    from cfdeploy.editing import EditJob, edit_to_directory
    from cfdeploy.inputs import load_text_embedding

    features = None
    if text_embedding:
        loaded = [load_text_embedding(path, len(codes)) for path in text_embedding]
        features = loaded[0] if len(loaded) == 1 else loaded
        named = [str(path) for path in text_embedding]
        inputs = {**inputs, "text_embedding": named[0] if len(named) == 1 else named}
    job = EditJob(
        codes,
        text,
        features,
        strength,
        batch_size,
        with_sources=side_by_side,
        refiner=refiner,
        identity=backend.identity_source is not None,
        faces=faces,
    )
    with progress_bar() as progress:
        task = progress.add_task(f"editing ({backend.name})", total=len(codes))
        if refiner is not None:
            steps = progress.add_task("refining", total=refiner.settings.steps * -(-len(codes) // batch_size))
            refiner.on_step = lambda loss: progress.update(steps, advance=1, description=f"refining (loss {loss:.4f})")
        return edit_to_directory(
            backend,
            job,
            staged,
            save_latents=save_latents,
            save_raw=save_raw,
            png_compression=png_compression,
            inputs=inputs,
            on_image=lambda: progress.advance(task),
            photos=photos if side_by_side else None,
            prior_timings=prior_timings,
            pasted=pasted,
            crops=crops,
        )


def photo_codes(backend: Any, images: list[Path], faces: dict[str, Any], batch_size: int) -> tuple[Any, ...]:
    """``edit --images``: align and encode the photos' faces; codes, input record, faces, timings, warnings."""
    from cfdeploy.editing import StageTimer
    from cfdeploy.photos.invert import (
        encode_faces,
        generator_mismatch,
        photo_faces,
    )

    timer = StageTimer()
    with phase("finding faces") as status, timer.stage("align"):
        found = photo_faces(
            images, **faces, on_photo=lambda path: status.update(f"aligning {plain(path.name)}")
        ).complete()
    with phase(f"encoding {len(found.crops)} face(s)"), timer.stage("encoder"):
        codes = encode_faces(backend, found.crops, batch_size)
    notes = [f"skipped {skipped['reason']}" for skipped in found.skipped]  # the reason names the photo
    mismatch = generator_mismatch(backend, found.crops[0], codes)
    if mismatch:
        notes.append(mismatch)
    record = {"images": [crop.record for crop in found.crops], "skipped": found.skipped}
    return codes, record, found.crops, dict(timer.seconds), notes


def report(summary: dict[str, Any], out: Path, backend: Any, texts: Sequence[str], notes: Sequence[str] = ()) -> None:
    from cfdeploy.editing import prompt_mismatch

    for note in (*notes, *(prompt_mismatch(backend, text) for text in texts)):
        if note:
            warn(note)
    timings = ", ".join(f"{name} {seconds:.3f}s" for name, seconds in summary["timings_s"].items())
    photos = summary["photos"]
    written = (
        f"{len(photos)} photo(s), {summary['count']} face(s) edited," if photos else f"{summary['count']} image(s)"
    )
    say(f"wrote {written} to {out} with {backend.name} in {summary['total_s']:.2f}s ({timings})")
    identity = summary["identity"]
    if identity is not None:
        scores = identity["scores"]
        means = ", ".join(
            f"{name} {sum(score[name] for score in scores) / len(scores):.3f}" for name in scores[0] if name != "row"
        )
        say(f"identity (ArcFace cosine with {identity['reference']}, mean of {len(scores)}): {means}")


@app.command("edit")
@user_errors
def edit_command(
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        metavar="DIR",
        rich_help_panel=OUTPUT,
        help="Output directory (must be empty or absent unless --force; `.` works).",
    ),
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        "-c",
        metavar="FILE",
        rich_help_panel=INPUT,
        help="CF-CLIP checkpoint (.pt with state_dict and opts): the torch backend.",
    ),
    bundle: Path | None = typer.Option(
        None,
        "--bundle",
        metavar="DIR",
        rich_help_panel=INPUT,
        help="Bundle from `cfdeploy export`: the onnxruntime or tensorrt backend.",
    ),
    latents: Path | None = typer.Option(
        None,
        "--latents",
        "-l",
        metavar="FILE",
        rich_help_panel=INPUT,
        help="W+ [N,n,512] or W [N,512] codes (.npy, or a torch-saved tensor).",
    ),
    seed: int | None = typer.Option(
        None, "--seed", metavar="N", rich_help_panel=INPUT, help="Sample codes from this seed instead of --latents."
    ),
    images: list[Path] | None = typer.Option(
        None,
        "--images",
        metavar="PHOTO_OR_DIR",
        rich_help_panel=INPUT,
        help="Edit your photos (repeatable; files or folders): align each face, invert it with e4e (--encoder, or a "
        "bundle exported with --encoder), then edit. With --side-by-side: photo | reconstruction | edit.",
    ),
    encoder: Path | None = typer.Option(
        None,
        "--encoder",
        metavar="FILE",
        rich_help_panel=INPUT,
        help="torch backend with --images: the e4e checkpoint (e4e_ffhq_encode.pt).",
    ),
    identity_weights: Path | None = typer.Option(
        None,
        "--identity-weights",
        metavar="FILE",
        rich_help_panel=OUTPUT,
        help="torch backend: ArcFace IR-SE-50 (model_ir_se50.pth); edit.json then scores each edit's identity (a "
        "bundle exported with --identity-weights always does).",
    ),
    aligned: bool = ALIGNED,
    landmarks: Path | None = LANDMARKS,
    landmarks_model: Path | None = LANDMARKS_MODEL,
    all_faces: bool = ALL_FACES,
    skip_missing: bool = SKIP_MISSING,
    crops: bool = CROPS,
    mask_dilate: float = MASK_DILATE,
    feather: float = FEATHER,
    save_mask: bool = SAVE_MASK,
    jpeg_quality: int = JPEG_QUALITY,
    keep_metadata: bool = KEEP_METADATA,
    num: int = typer.Option(
        1, "--num", metavar="K", rich_help_panel=INPUT, help="With --seed: how many codes to sample."
    ),
    truncation: float = typer.Option(
        0.7, "--truncation", metavar="PSI", rich_help_panel=INPUT, help="With --seed: truncation psi toward the mean W."
    ),
    text: list[str] | None = typer.Option(
        None,
        "--text",
        "-t",
        metavar="PROMPT",
        rich_help_panel=PROMPT,
        help="Prompt to edit toward; repeat it to compose several edits, w + sum of S_i*0.1*delta_i (beyond the "
        "paper, which edits one prompt).",
    ),
    text_embedding: list[Path] | None = typer.Option(
        None,
        "--text-embedding",
        metavar="FILE",
        rich_help_panel=PROMPT,
        help=".npy of unnormalised CLIP text features, [512] or [N,512]; bypasses CLIP. Repeatable, as --text.",
    ),
    clip_weights: Path | None = typer.Option(
        None,
        "--clip-weights",
        metavar="FILE",
        rich_help_panel=PROMPT,
        help="CLIP ViT-B/32 weights (OpenAI's ViT-B-32.pt or open_clip): torch backend with --text, and refinement.",
    ),
    strength: list[float] | None = typer.Option(
        None,
        "--strength",
        "-s",
        metavar="S",
        rich_help_panel=PROMPT,
        help="Edit strength: w_hat = w + S*0.1*delta (1 = official, 0 = the source); one for all prompts, or one per "
        "prompt in their order. \\[default: 1]",
    ),
    side_by_side: bool = typer.Option(
        False, "--side-by-side", rich_help_panel=OUTPUT, help="Write source|edit pairs instead of edits."
    ),
    save_latents: bool = typer.Option(
        False, "--save-latents", rich_help_panel=OUTPUT, help="Also write latents.npy (edited W+, float32)."
    ),
    save_raw: bool = typer.Option(
        False, "--save-raw", rich_help_panel=OUTPUT, help="Also write images.npy (raw generator output, float32)."
    ),
    png_compression: int = typer.Option(
        DEFAULT_PNG_COMPRESSION,
        "--png-compression",
        metavar="0-9",
        rich_help_panel=OUTPUT,
        help="zlib level of the PNGs: 1 is several times faster to write at 1024 px, files ~1.3x larger.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        "-f",
        rich_help_panel=OUTPUT,
        help="Replace a non-empty --out (never one that holds an input).",
    ),
    backend: BackendName | None = typer.Option(
        None,
        "--backend",
        metavar="NAME",
        rich_help_panel=RUNTIME,
        help="torch (from --checkpoint), onnxruntime, openvino or tensorrt (from --bundle). \\[default: torch for "
        "--checkpoint; for --bundle the fastest exact one installed: openvino on CPUs with AVX-512 or AMX, else "
        "onnxruntime]",
    ),
    device: str | None = typer.Option(
        None,
        "--device",
        metavar="DEVICE",
        rich_help_panel=RUNTIME,
        help="cpu, cuda or cuda:N, for every backend (openvino: cpu, or gpu/npu where OpenVINO finds them). "
        "\\[default: cpu; tensorrt: cuda]",
    ),
    precision: Precision | None = typer.Option(
        None,
        "--precision",
        metavar=PRECISION_CHOICES,
        rich_help_panel=RUNTIME,
        help="torch backend, generator only: fp16 (autocast, for CUDA) or bf16 (CPUs with bf16 units); openvino: "
        "bf16 for the generator and encoder on CPUs with AMX or AVX-512 BF16; the other backends run what their "
        "bundle or engines hold. \\[default: fp32]",
    ),
    cuda_graphs: bool = typer.Option(
        False,
        "--cuda-graphs",
        rich_help_panel=RUNTIME,
        help="torch on CUDA: replay the generator as a CUDA graph (TensorRT static engines always do).",
    ),
    compile: bool = typer.Option(
        False,
        "--compile",
        rich_help_panel=RUNTIME,
        help="torch backend: torch.compile the generator (reduce-overhead on CUDA, default "
        "on a CPU); each batch size's first call compiles.",
    ),
    engines: Path | None = typer.Option(
        None,
        "--engines",
        metavar="DIR",
        rich_help_panel=RUNTIME,
        help="tensorrt backend: engine directory. \\[default: BUNDLE/tensorrt]",
    ),
    providers: str | None = typer.Option(
        None,
        "--providers",
        metavar="LIST",
        rich_help_panel=RUNTIME,
        help="onnxruntime backend, expert override of --device: comma-separated execution providers. "
        "\\[default: those --device picks]",
    ),
    batch_size: int = typer.Option(
        DEFAULT_BATCH_SIZE, "--batch-size", "-b", metavar="B", rich_help_panel=RUNTIME, help="Codes per generator call."
    ),
    threads: int | None = threads_option(RUNTIME),
    no_session_cache: bool = no_session_cache_option(RUNTIME),
    cache_max: int | None = typer.Option(
        None,
        "--cache-max",
        metavar="N",
        rich_help_panel=RUNTIME,
        help="Bundles: keep at most N prompts in BUNDLE/cache (least recently used go first). \\[default: 256]",
    ),
    expect_manifest: str | None = typer.Option(
        None,
        "--expect-manifest",
        metavar="SHA256",
        rich_help_panel=RUNTIME,
        help="Bundles: refuse the bundle unless its manifest.json has this sha256 (`cfdeploy inspect BUNDLE` prints it).",
    ),
    refine_steps: int = typer.Option(
        0,
        "--refine-steps",
        metavar="K",
        rich_help_panel=REFINE,
        help="After the one-pass edit, optimise each latent for up to K steps of CLIP-NCE.",
    ),
    refine_lr: float = typer.Option(
        0.01, "--refine-lr", metavar="LR", rich_help_panel=REFINE, help="Adam learning rate."
    ),
    refine_l2: float = typer.Option(
        0.8, "--refine-l2", metavar="L", rich_help_panel=REFINE, help="Weight L of mean((w - w_hat)^2)."
    ),
    source_text: str | None = typer.Option(
        None,
        "--source-text",
        metavar="TEXT",
        rich_help_panel=REFINE,
        help="What the source images show. \\[default: the checkpoint's, or 'face']",
    ),
    refine_layers: str = typer.Option(
        "all",
        "--refine-layers",
        metavar="LEVELS",
        rich_help_panel=REFINE,
        help="Levels refined: all, coarse, medium or fine.",
    ),
) -> None:
    """Edit images toward a text prompt with a CF-CLIP checkpoint (torch) or a bundle (onnxruntime, tensorrt).

    Writes DIR/000000.png, 000001.png, … and DIR/edit.json (inputs, timings, versions) through a
    staging directory: if anything fails or the run is killed, DIR is left as it was. Photos that are not
    --aligned come back whole, edited: DIR/<photo's name>, the faces pasted back.

    Example: cfdeploy edit --bundle engines/green_lipstick --text "green lipstick" --seed 1 --num 8 --out edits/
    """
    from cfdeploy.backends import backend_info, default_bundle_backend, open_backend
    from cfdeploy.environment import cpu_features
    from cfdeploy.outputs import StagedDirectory

    name = backend.value if backend else "torch"
    if backend is None and bundle is not None and checkpoint is None:
        name = "onnxruntime" if providers else default_bundle_backend(cpu_features(), device)
    info = backend_info(name)
    if bool(text) == bool(text_embedding):
        raise CfdeployError("give --text or --text-embedding (each may be repeated), not both")
    strengths = paired_strengths(len(text or text_embedding or []), strength or [1.0])
    if sum(given is not None for given in (latents, seed, images)) != 1:
        raise CfdeployError("give exactly one of --latents, --seed or --images")
    faces = landmark_options(aligned, landmarks, landmarks_model, all_faces, skip_missing) if images else None
    pasting = bool(images) and not aligned
    pasted_settings = paste_settings(
        pasting, crops, mask_dilate, feather, save_mask, jpeg_quality, keep_metadata, png_compression
    )
    if encoder is not None and (info.source != "checkpoint" or not images):
        raise CfdeployError("--encoder is for --images on the torch backend (a bundle carries its encoder)")
    if identity_weights is not None and info.source != "checkpoint":
        raise CfdeployError(
            "--identity-weights is for the torch backend (a bundle carries its identity graph: "
            "cfdeploy export --identity-weights)"
        )
    require_finite(refine_lr=refine_lr, refine_l2=refine_l2)
    require_range(0, refine_steps=refine_steps, cache_max=cache_max)
    require_range(1, batch_size=batch_size, threads=threads)
    require_range(0, 9, png_compression=png_compression)
    if seed is not None:
        check_sampling(seed, num, truncation)
    source = checkpoint if info.source == "checkpoint" else bundle
    if source is None:
        needed = "--checkpoint" if info.source == "checkpoint" else "--bundle (make one with cfdeploy export)"
        raise CfdeployError(f"--backend {name} needs {needed}")
    refine_settings = None
    if refine_steps > 0:
        try:
            from cfdeploy.refine import RefineSettings
        except ModuleNotFoundError as missing:
            raise missing_extra(missing.name or "torch", "refinement (--refine-steps)") from None
        if clip_weights is None:
            raise CfdeployError("--refine-steps needs --clip-weights (CLIP ViT-B/32 with its image encoder)")
        if len(strengths) > 1:
            raise CfdeployError("--refine-steps refines toward one prompt: give one --text")
        refine_settings = RefineSettings(refine_steps, refine_lr, refine_l2, source_text or "face", refine_layers)
    needs_clip = info.source == "checkpoint" and (bool(text) or refine_steps > 0)
    if needs_clip and clip_weights is None:
        raise CfdeployError("--text needs --clip-weights (CLIP ViT-B/32 weights); or pass --text-embedding")
    options = {
        "clip_weights": clip_weights if needs_clip else None,
        "device": device,
        "precision": precision_among(precision, info.precisions, f"the {name} backend") if precision else None,
        "cuda_graphs": cuda_graphs or None,
        "compile": compile or None,
        "engines": engines,
        "providers": [part.strip() for part in providers.split(",") if part.strip()] if providers else None,
        "cache_max": cache_max,
        "expect_manifest": expect_manifest,
        "encoder": encoder,
        "threads": threads,
        "session_cache": session_cache_option(no_session_cache) if "session_cache" in info.options else None,
        "identity_weights": identity_weights,
    }
    files = (checkpoint, latents, *(text_embedding or []), clip_weights, encoder, identity_weights, landmarks_model)
    require_files(*files, landmarks)
    inputs = [path for path in (*files, landmarks, bundle, *(images or [])) if path is not None]
    if pasting:
        from cfdeploy.photos.images import photo_paths
        from cfdeploy.photos.invert import pasted_names

        pasted_names(photo_paths(list(images or [])))  # two photos with one name stop the run before it starts
    with StagedDirectory(out, force, inputs) as staged:
        with phase("loading models"):
            editor = open_backend(name, source, **options)
        if editor.text_cache is not None:
            editor.text_cache.on_warning = warn
        compiled_cache = getattr(getattr(editor, "graphs", None), "cache", None)
        if compiled_cache is not None:
            compiled_cache.on_warning = warn
        refiner = None
        if refine_settings is not None:
            refiner = build_refiner(
                editor, refine_settings, text[0] if text else None, source_text, checkpoint, clip_weights
            )
        recorded = {
            "backend": name,
            info.source: str(source),
            **{
                key: str(value) if isinstance(value, Path) else value
                for key, value in options.items()
                if value is not None
            },
        }
        photos, timings, notes, pasted, aligned_faces = None, None, [], None, None
        if images:
            from cfdeploy.photos import batch_inputs
            from cfdeploy.photos.invert import PhotoPaster, photo_pixels

            assert faces is not None
            codes, origin, found, timings, notes = photo_codes(editor, images, faces, batch_size)
            photos = photo_pixels(found, editor.size) if side_by_side else None
            if editor.identity_source is not None:
                aligned_faces = batch_inputs([crop.image for crop in found])
            if pasted_settings is not None:
                pasted = PhotoPaster(found, staged.write, pasted_settings)
                if pasted_settings.save_mask:
                    (staged.path / "masks").mkdir()
        else:
            from cfdeploy.editing import resolve_latents

            codes, origin = resolve_latents(editor, latents, seed, num, truncation)
        summary = run_edit(
            editor,
            staged,
            codes,
            text=text[0] if text and len(text) == 1 else text,
            text_embedding=text_embedding or [],
            strength=strengths[0] if len(strengths) == 1 else strengths,
            batch_size=batch_size,
            side_by_side=side_by_side,
            save_latents=save_latents,
            save_raw=save_raw,
            png_compression=png_compression,
            inputs={**recorded, **origin},
            refiner=refiner,
            photos=photos,
            prior_timings=timings,
            pasted=pasted,
            crops=("crops" if crops or side_by_side else None) if pasting else "",
            faces=aligned_faces,
        )
    report(summary, out, editor, text or [], notes)


def build_refiner(
    editor: Any,
    settings: Any,
    text: str | None,
    source_text: str | None,
    checkpoint: Path | None,
    clip_weights: Path | None,
) -> Any:
    from dataclasses import replace

    from cfdeploy.refine import refiner_for

    target = text or editor.description
    if not target:
        raise CfdeployError("--refine-steps needs a target prompt: pass --text, or use a checkpoint that records one")
    settings = replace(settings, source_text=source_text or editor.source_text or "face")
    with phase("preparing the CLIP-NCE loss"):
        return refiner_for(editor, settings, target, checkpoint, clip_weights)


@app.command("demo")
@user_errors
def demo_command(
    out: Path = typer.Option(Path("cfdeploy-demo"), "--out", "-o", metavar="DIR", help="Output directory."),
    size: int = typer.Option(256, "--size", metavar="PX", help="Generator resolution (power of two, 8…1024)."),
    num: int = typer.Option(4, "--num", metavar="K", help="How many seeded codes to edit."),
    device: str = typer.Option("cpu", "--device", metavar="DEVICE", help="cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace a non-empty --out directory."),
) -> None:
    """Run the whole pipeline on a synthetic model set: no downloads, real architecture, real timings.

    The weights are random, so the pictures mean nothing; the pipeline and its speed are real. Writes
    before|after pairs DIR/000000.png …, the edited codes DIR/latents.npy and DIR/edit.json.
    """
    from cfdeploy.outputs import StagedDirectory

    require_range(1, num=num)
    if size < 8 or size > 1024 or size & (size - 1):
        raise CfdeployError(f"--size must be a power of two from 8 to 1024, got {size}")
    with StagedDirectory(out, force) as staged:
        from cfdeploy.demo import DEMO_PROMPT, synthetic_backend
        from cfdeploy.editing import resolve_latents

        console.print(
            "[bold]demo:[/] synthetic weights (seeded random, real CF-CLIP architecture): "
            "the pipeline and its timings are real, the pictures are not meaningful."
        )
        started = time.perf_counter()
        with phase("building synthetic models"):
            editor = synthetic_backend(size=size, seed=0, device=device)
        build_s = time.perf_counter() - started
        codes, origin = resolve_latents(editor, seed=0, num=num, truncation=0.7)
        summary = run_edit(
            editor,
            staged,
            codes,
            text=DEMO_PROMPT,
            text_embedding=[],
            strength=1.0,
            batch_size=2,
            side_by_side=True,
            save_latents=True,
            save_raw=False,
            png_compression=DEFAULT_PNG_COMPRESSION,
            inputs={"synthetic_weights": True, "model_build_s": round(build_s, 3), **origin},
        )
    report(summary, out, editor, [DEMO_PROMPT])
    say(
        f"before|after pairs: {plain(out)}/000000.png …; edited codes: {plain(out)}/latents.npy; details: {plain(out)}/edit.json"
    )
