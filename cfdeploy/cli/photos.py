"""``cfdeploy invert``: your photos to W+ codes (align the face, encode it with e4e), ready for ``edit --latents``."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from cfdeploy.cli.common import (
    PRECISION_CHOICES,
    Precision,
    app,
    no_session_cache_option,
    phase,
    precision_among,
    progress_bar,
    require_files,
    require_range,
    say,
    session_cache_option,
    threads_option,
    user_errors,
    warn,
)
from cfdeploy.errors import CfdeployError

FACES = "Faces"
PASTE = "Your photo back (photos not --aligned)"


class BundleRuntime(str, Enum):
    onnxruntime = "onnxruntime"
    openvino = "openvino"


def landmark_options(
    aligned: bool, landmarks: Path | None, landmarks_model: Path | None, all_faces: bool, skip_missing: bool
) -> dict[str, Any]:
    if sum((aligned, landmarks is not None, landmarks_model is not None)) != 1:
        raise CfdeployError("give exactly one of --aligned, --landmarks FILE or --landmarks-model FILE")
    return {
        "aligned": aligned,
        "landmarks": landmarks,
        "landmarks_model": landmarks_model,
        "all_faces": all_faces,
        "skip_missing": skip_missing,
    }


def paste_settings(
    pasting: bool,
    crops: bool,
    mask_dilate: float,
    feather: float,
    save_mask: bool,
    jpeg_quality: int,
    keep_metadata: bool,
    png_compression: int,
) -> Any:
    """The paste-back's settings (a ``PasteSettings``), or None when nothing is pasted, where its options are refused."""
    from cfdeploy.photos.images import DEFAULT_JPEG_QUALITY, PhotoEncoding
    from cfdeploy.photos.invert import PasteSettings
    from cfdeploy.photos.paste import MaskSettings

    mask = MaskSettings(mask_dilate, feather)
    if not pasting:
        given = [
            name
            for name, value, default in (
                ("--crops", crops, False),
                ("--mask-dilate", mask_dilate, MaskSettings.dilate),
                ("--feather", feather, MaskSettings.feather),
                ("--save-mask", save_mask, False),
                ("--jpeg-quality", jpeg_quality, DEFAULT_JPEG_QUALITY),
                ("--keep-metadata", keep_metadata, False),
            )
            if value != default
        ]
        if given:
            raise CfdeployError(f"{', '.join(given)}: only for --images photos that are not --aligned (pasted back)")
        return None
    mask.check()
    require_range(1, 100, jpeg_quality=jpeg_quality)
    return PasteSettings(mask, PhotoEncoding(jpeg_quality, png_compression, keep_metadata), save_mask)


ALIGNED = typer.Option(
    False,
    "--aligned",
    rich_help_panel=FACES,
    help="The photos are aligned face crops already (FFHQ-style): only resized to 256 px.",
)
LANDMARKS = typer.Option(
    None,
    "--landmarks",
    metavar="FILE",
    rich_help_panel=FACES,
    help="Face points from any detector, one entry per photo (.json or .npy): 68x2 (dlib order) "
    "or 5x2 (left eye, right eye, nose, left and right mouth corner).",
)
LANDMARKS_MODEL = typer.Option(
    None,
    "--landmarks-model",
    metavar="FILE",
    rich_help_panel=FACES,
    help="dlib's shape_predictor_68_face_landmarks.dat: detect faces with dlib (the "
    "'photos' extra). Its training data's licence excludes commercial use.",
)
ALL_FACES = typer.Option(
    False, "--all-faces", rich_help_panel=FACES, help="Every face in a photo, not only the largest."
)
SKIP_MISSING = typer.Option(
    False,
    "--skip-missing",
    rich_help_panel=FACES,
    help="Skip photos without a face instead of stopping (listed under `skipped` in index.json, or edit.json).",
)


@app.command("invert")
@user_errors
def invert_command(
    photos: list[Path] = typer.Argument(
        ..., metavar="PHOTO_OR_DIR...", help="JPEG, PNG or WebP files, or folders of them."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", metavar="DIR", help="Output directory (empty or absent unless --force)."
    ),
    encoder: Path | None = typer.Option(
        None, "--encoder", metavar="FILE", help="e4e checkpoint (e4e_ffhq_encode.pt): runs in torch."
    ),
    bundle: Path | None = typer.Option(
        None, "--bundle", metavar="DIR", help="A bundle exported with --encoder: runs on ONNX Runtime, no torch."
    ),
    aligned: bool = ALIGNED,
    landmarks: Path | None = LANDMARKS,
    landmarks_model: Path | None = LANDMARKS_MODEL,
    all_faces: bool = ALL_FACES,
    skip_missing: bool = SKIP_MISSING,
    save_aligned: bool = typer.Option(
        False, "--save-aligned", help="Also write the aligned crops, aligned/NNNNNN.png."
    ),
    save_reconstruction: bool = typer.Option(
        False,
        "--save-reconstruction",
        help="Also write the generator's image of each code, reconstructions/NNNNNN.png.",
    ),
    batch_size: int = typer.Option(4, "--batch-size", "-b", metavar="B", help="Faces per encoder call."),
    device: str = typer.Option("cpu", "--device", metavar="DEVICE", help="With --encoder: cpu, cuda or cuda:N."),
    backend: BundleRuntime | None = typer.Option(
        None,
        "--backend",
        metavar="NAME",
        help="With --bundle: onnxruntime or openvino. \\[default: the fastest exact one installed, as for edit]",
    ),
    precision: Precision | None = typer.Option(
        None,
        "--precision",
        metavar=PRECISION_CHOICES,
        help="With --backend openvino: bf16 on CPUs with AMX or AVX-512 BF16. \\[default: fp32]",
    ),
    threads: int | None = threads_option(),
    no_session_cache: bool = no_session_cache_option(),
    force: bool = typer.Option(
        False, "--force", "-f", help="Replace a non-empty --out (never one that holds an input)."
    ),
) -> None:
    """Invert photos to W+ codes with e4e: DIR/latents.npy ([N,18,512] float32, for `cfdeploy edit --latents`)
    and DIR/index.json (row → photo, face box, landmarks, alignment transform).

    Example: cfdeploy invert photos/ --encoder e4e_ffhq_encode.pt --landmarks-model shape_predictor_68_face_landmarks.dat
    --out codes/
    """
    import numpy as np

    from cfdeploy.outputs import StagedDirectory

    require_range(1, batch_size=batch_size, threads=threads)
    if (encoder is None) == (bundle is None):
        raise CfdeployError("give exactly one of --encoder (torch) or --bundle (a bundle exported with --encoder)")
    if encoder is not None and (backend, precision, threads) != (None, None, None):
        raise CfdeployError("--backend, --precision and --threads are for --bundle (--encoder runs in torch)")
    faces = landmark_options(aligned, landmarks, landmarks_model, all_faces, skip_missing)
    inputs = [path for path in (*photos, encoder, bundle, landmarks, landmarks_model) if path is not None]
    require_files(encoder, landmarks, landmarks_model)
    with StagedDirectory(out, force, inputs) as staged:
        from cfdeploy.photos.invert import E4EInverter, encode_faces, photo_faces

        started = time.perf_counter()
        with phase("loading the encoder"):
            if encoder is not None:
                inverter: Any = E4EInverter(encoder, device)
            else:
                from cfdeploy.backends import backend_info, default_bundle_backend, open_backend
                from cfdeploy.environment import cpu_features

                assert bundle is not None
                name = backend.value if backend else default_bundle_backend(cpu_features(), "cpu")
                inverter = open_backend(
                    name,
                    bundle,
                    precision=precision_among(precision, backend_info(name).precisions, f"the {name} backend"),
                    threads=threads,
                    session_cache=session_cache_option(no_session_cache),
                )
        with progress_bar() as progress:  # each batch's photos are decoded as the batch is encoded
            task = progress.add_task("aligning and encoding photos", total=None)
            found = photo_faces(photos, **faces, on_photo=lambda path: progress.advance(task))
            progress.update(task, total=len(found.paths))
            codes = encode_faces(inverter, found, batch_size)
        staged.write_npy("latents.npy", codes)
        for folder, wanted in (("aligned", save_aligned), ("reconstructions", save_reconstruction)):
            if wanted:
                (staged.path / folder).mkdir()
        for row, crop in enumerate(found.crops):
            if save_aligned:
                staged.write_png(f"aligned/{row:06d}.png", np.asarray(crop.image))
        if save_reconstruction:
            from cfdeploy.outputs import to_uint8

            for start in range(0, len(codes), batch_size):
                for offset, pixels in enumerate(to_uint8(inverter.synthesize(codes[start : start + batch_size]))):
                    staged.write_png(f"reconstructions/{start + offset:06d}.png", pixels)
        staged.write_json(
            "index.json",
            {
                "encoder": str(encoder) if encoder is not None else None,
                "bundle": str(bundle) if bundle else None,
                "faces": {key: str(value) if isinstance(value, Path) else value for key, value in faces.items()},
                "rows": [{"row": row, **crop.record} for row, crop in enumerate(found.crops)],
                "skipped": found.skipped,
                "total_s": round(time.perf_counter() - started, 3),
            },
        )
    for skipped in found.skipped:
        warn(f"skipped {skipped['reason']}")  # the reason names the photo
    say(f"wrote {len(codes)} code(s) from {len(found.crops)} face(s) to {out}/latents.npy (index: {out}/index.json)")


CROPS = typer.Option(
    False,
    "--crops",
    rich_help_panel=PASTE,
    help="Also write the aligned edits, crops/NNNNNN.png (--side-by-side writes them as rows).",
)
MASK_DILATE = typer.Option(
    0.03,
    "--mask-dilate",
    metavar="F",
    rich_help_panel=PASTE,
    help="How far the mask reaches past the face's outline, as a fraction of the aligned square's side.",
)
FEATHER = typer.Option(
    0.06,
    "--feather",
    metavar="F",
    rich_help_panel=PASTE,
    help="Over how much the mask fades out, as a fraction of the aligned square's side.",
)
SAVE_MASK = typer.Option(
    False, "--save-mask", rich_help_panel=PASTE, help="Also write each photo's mask, masks/NAME.png (255: the edit)."
)
JPEG_QUALITY = typer.Option(
    95, "--jpeg-quality", metavar="1-100", rich_help_panel=PASTE, help="Quality of the edited copies of JPEG photos."
)
KEEP_METADATA = typer.Option(
    False,
    "--keep-metadata",
    rich_help_panel=PASTE,
    help="Keep the photos' EXIF (camera, date, GPS position) in the edited copies; the colour profile is always kept.",
)
