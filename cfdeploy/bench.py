"""``cfdeploy bench``: per-stage latency of each backend, measured the way trtexec reports it.

Each backend runs in a fresh child process (so its peak RSS is its own), through the same
``iter_edits`` path ``cfdeploy edit`` uses: warm-up runs, then timed runs with every stage timed
(device work is synchronised inside each stage, since every stage returns host arrays). Backends
that hold the e4e encoder (torch opened with ``--encoder``, a bundle with its encoder graph) start
each run from photos, as ``edit --images`` does: a synthetic photo aligned once per image, then the
batch encoded. Backends that hold ArcFace (torch opened with ``--identity-weights``, a bundle with its
identity graph) score each edit's identity, as ``edit`` does: the ``source_generator`` and ``identity``
stages. GPU backends also report GPU time from CUDA events (TensorRT per engine, torch for the
generator) and GPU memory. Images are compared against the torch fp32 backend for a parity column
(max abs error and PSNR).
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import queue
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cfdeploy import editing
from cfdeploy.backends import BACKENDS, PRESETS, open_preset
from cfdeploy.environment import machine_info
from cfdeploy.errors import CfdeployError, missing_extra
from cfdeploy.outputs import to_uint8, write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from cfdeploy.editing import EditBackend
    from cfdeploy.refine import Refiner

# The pipeline's stages (cfdeploy.editing.STAGES), then the whole run: the keys of every timing bench reports.
STAGES = (*editing.STAGES, "total")
PARITY_REFERENCE = "torch"
PHOTO_SIZE = 1024
# The photo runs start from: a centred, upright face, eyes 200 px apart, in RetinaFace/SCRFD's 5-point order.
# Its crop lies inside the photo, so alignment takes its common path (no shrink, no blurred padding).
CENTRED_FACE = np.array([[412.0, 440.0], [612.0, 440.0], [512.0, 540.0], [432.0, 620.0], [592.0, 620.0]])
Progress = Callable[[str], None]


def ignore_progress(message: str) -> None:
    """The default progress callback: report nothing."""


@dataclass
class Sources:
    """The files the backends read: torch ones the checkpoint (and CLIP weights, the e4e encoder, ArcFace), the others
    the bundle."""

    checkpoint: Path | None = None
    clip_weights: Path | None = None
    bundle: Path | None = None
    encoder: Path | None = None
    identity_weights: Path | None = None


@dataclass
class BenchSettings:
    backends: Sequence[str]
    batch_sizes: Sequence[int] = (1,)
    warmup: int = 1
    runs: int = 5
    prompt: str = "green lipstick"
    seed: int = 0
    refine_steps: int = 0
    session_cache: bool | None = None  # False: --no-session-cache


def reads_bundle(name: str) -> bool:
    """Whether preset ``name`` runs a bundle (else a CF-CLIP checkpoint)."""
    return BACKENDS[PRESETS[name].backend].source == "bundle"


def check_backend_names(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise CfdeployError(f"unknown backends {', '.join(unknown)} (known: {', '.join(PRESETS)})")


def prepare_sources(
    scratch: Path,
    *,
    synthetic: int | None = None,
    checkpoint: Path | None = None,
    clip_weights: Path | None = None,
    bundle: Path | None = None,
    encoder: Path | None = None,
    identity_weights: Path | None = None,
    need_bundle: bool = True,
    with_visual: bool = False,
    on_progress: Progress = ignore_progress,
) -> Sources:
    """The files to benchmark: the given ones, or synthetic ones, plus a bundle exported when one is needed.

    Args:
        scratch: a directory for what is written here (synthetic files, the exported bundle).
        synthetic: the image size of a checkpoint and CLIP weights to write (the real architecture,
            seeded random weights). Give exactly one of ``synthetic``, ``checkpoint`` and ``bundle``.
        checkpoint: a CF-CLIP checkpoint; with ``clip_weights``, torch backends time the text stages
            and a bundle can be exported.
        bundle: an exported bundle (its encoder graph, if it has one, is timed on photos).
        encoder: an e4e checkpoint, with ``checkpoint`` or ``synthetic``: torch backends open it and the
            exported bundle includes it, so every run starts from photos.
        identity_weights: ArcFace IR-SE-50, with ``checkpoint`` or ``synthetic``: torch backends open it and the
            exported bundle includes it, so every run scores its edits' identity.
        need_bundle: export a bundle from the checkpoint when none is given and CLIP weights are there
            (bundle backends are then skipped if they cannot be had).
        with_visual: synthetic CLIP weights include the image encoder (what refinement needs).
        on_progress: told what is being written.

    Returns:
        The :class:`Sources` the backends open.
    """
    if sum(source is not None for source in (checkpoint, bundle, synthetic)) != 1:
        raise CfdeployError("give exactly one of --checkpoint, --bundle or --synthetic SIZE")
    if encoder is not None and bundle is not None:
        raise CfdeployError(
            "--encoder goes with --checkpoint or --synthetic (a bundle's own encoder graph is timed if it has one)"
        )
    if identity_weights is not None and bundle is not None:
        raise CfdeployError(
            "--identity-weights goes with --checkpoint or --synthetic (a bundle's own identity graph is timed if it "
            "has one)"
        )
    sources = Sources(checkpoint, clip_weights, bundle, encoder, identity_weights)
    if synthetic is not None:
        if synthetic < 8 or synthetic & (synthetic - 1):
            raise CfdeployError(f"--synthetic must be a power of two of at least 8, got {synthetic}")
        from cfdeploy.demo import save_synthetic_files

        on_progress(f"writing synthetic {synthetic} px files")
        sources.checkpoint, sources.clip_weights = save_synthetic_files(scratch, synthetic, with_visual=with_visual)
    if need_bundle and sources.bundle is None and sources.checkpoint is not None and sources.clip_weights is not None:
        from cfdeploy.exporter import export_bundle

        on_progress("exporting a bundle for the bundle backends")
        sources.bundle = scratch / "bundle"
        export_bundle(
            sources.checkpoint,
            sources.clip_weights,
            sources.bundle,
            encoder=encoder,
            identity_weights=identity_weights,
            on_stage=on_progress,
        )
    return sources


def open_for_bench(name: str, sources: Sources, session_cache: bool | None = None) -> EditBackend:
    """Open preset ``name`` over its source, or raise a :class:`CfdeployError` saying why it cannot run here."""
    if reads_bundle(name):
        if sources.bundle is None:
            raise CfdeployError("needs --bundle (or --checkpoint with --clip-weights, or --synthetic, to export one)")
        backend = open_preset(name, sources.bundle, session_cache=session_cache)
        if PRESETS[name].backend == "tensorrt":
            for network in networks_run(backend):
                backend.engine(network)  # type: ignore[attr-defined]  # each engine built, and for this GPU
    else:
        if sources.checkpoint is None:
            raise CfdeployError("needs --checkpoint (or --synthetic)")
        backend = open_preset(
            name,
            sources.checkpoint,
            clip_weights=sources.clip_weights,
            encoder=sources.encoder,
            identity_weights=sources.identity_weights,
        )
        encoder = getattr(backend, "encoder", None)
        if encoder is not None and encoder.n_latent != backend.n_latent:
            raise CfdeployError(
                f"{sources.encoder}: the encoder makes W+ codes of {encoder.n_latent} levels, the "
                f"generator of {sources.checkpoint} takes {backend.n_latent}"
            )
    backend.text_cache = None  # every run times the whole text branch (and writes nothing into the bundle)
    return backend


def networks_run(backend: Any) -> list[str]:
    """The bundle's graphs an edit runs (stages are named after networks), in pipeline order."""
    return [stage for stage in editing.STAGES if backend.bundle.has_network(stage)]


def encodes_text(backend: Any) -> bool:
    """Whether the backend runs CLIP on the prompt: a bundle with CLIP's text graph, a torch backend with CLIP weights.

    Without CLIP, bench feeds random text features and the text branch starts at the text mapper.
    """
    bundle = getattr(backend, "bundle", None)
    return bundle.has_network("clip_text") if bundle is not None else getattr(backend, "clip", None) is not None


def encodes_photos(backend: Any) -> bool:
    """Whether the backend holds the e4e encoder: a bundle with the encoder graph, a torch backend opened with one."""
    bundle = getattr(backend, "bundle", None)
    return bundle.has_network("encoder") if bundle is not None else getattr(backend, "encoder", None) is not None


def synthetic_photo(seed: int, size: int = PHOTO_SIZE) -> Image.Image:
    """A smooth random RGB photo (colour blobs, like an out-of-focus scene): what the photo runs align."""
    from PIL import Image

    blobs = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(blobs).resize((size, size), Image.Resampling.BICUBIC)


def encode_photos(
    backend: EditBackend, photo: Image.Image, count: int, timer: editing.StageTimer
) -> tuple[np.ndarray, np.ndarray]:
    """What ``edit --images`` runs before the edit, as its ``align`` and ``encoder`` stages: the face of
    ``photo`` at :data:`CENTRED_FACE` aligned once per image, then the ``count`` crops encoded in one batch.
    Returns the codes and the encoder's inputs (the aligned faces, which identity scores compare with)."""
    from cfdeploy.photos import align_face, batch_inputs

    with timer.stage("align"):
        faces = [align_face(photo, CENTRED_FACE).image for _ in range(count)]
    with timer.stage("encoder"):
        inputs = batch_inputs(faces)
        return backend.encode(inputs), inputs


def gpu_memory_mb(name: str, backend: Any) -> float | None:
    """Peak GPU memory of a torch CUDA backend, or GPU memory in use for a TensorRT one; None on CPU."""
    if getattr(backend, "device", None) is not None and backend.device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(backend.device) / (1 << 20)
    if PRESETS[name].backend == "tensorrt":
        from cfdeploy.trt.cuda import memory_in_use_mb

        return memory_in_use_mb()
    return None


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def summarize(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def percentile(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "median": statistics.median(ordered),
        "p90": percentile(0.9),
        "p99": percentile(0.99),
        "mean": statistics.fmean(ordered),
    }


def measure_backend(
    name: str, sources: Sources, settings: BenchSettings, on_progress: Progress = ignore_progress
) -> dict[str, Any]:
    """Time every stage at every batch size; return stats and images, or why the backend was skipped."""
    try:
        backend = open_for_bench(name, sources, settings.session_cache)
        return {"backend": name, **measure(name, backend, settings, on_progress)}
    except CfdeployError as reason:
        return {"backend": name, "skipped": str(reason)}


def measure(name: str, backend: EditBackend, settings: BenchSettings, on_progress: Progress) -> dict[str, Any]:
    """Warm-up and timed runs of the edit (and PNG encoding) at each batch size; stats per stage, the last images.

    A backend that holds the e4e encoder edits the codes of photos (:func:`encode_photos`), others random codes;
    one that holds ArcFace scores every edit's identity.
    """
    from PIL import Image

    rng = np.random.default_rng(settings.seed)
    latents = rng.standard_normal((max(settings.batch_sizes), backend.n_latent, 512)).astype(np.float32)
    prompt = settings.prompt if encodes_text(backend) else None
    features = None if prompt is not None else rng.standard_normal((1, 512)).astype(np.float32)
    refiner = make_refiner(backend, settings) if settings.refine_steps else None
    photo = synthetic_photo(settings.seed) if encodes_photos(backend) else None
    results = []
    for batch in settings.batch_sizes:
        samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
        images = None
        device_ms_before: dict[str, float] = {}
        for run in range(settings.warmup + settings.runs):
            if run == settings.warmup and hasattr(backend, "device_ms"):
                device_ms_before = backend.device_ms()
            timer = editing.StageTimer()
            started = time.perf_counter()
            codes, faces = (latents[:batch], None) if photo is None else encode_photos(backend, photo, batch, timer)
            job = editing.EditJob(
                codes,
                prompt,
                features,
                batch_size=batch,
                refiner=refiner,
                identity=backend.identity_source is not None,
                faces=faces,
            )
            for edited in editing.iter_edits(backend, job, timer):
                images = edited.images
                with timer.stage("png"):
                    for pixels in to_uint8(edited.images):
                        Image.fromarray(pixels).save(io.BytesIO(), format="png")
            timer.seconds["total"] = seconds = time.perf_counter() - started
            if run < settings.warmup:
                on_progress(f"{name}: batch {batch}, warm-up {run + 1}/{settings.warmup} in {seconds:.2f} s")
                continue
            on_progress(f"{name}: batch {batch}, run {run + 1 - settings.warmup}/{settings.runs} in {seconds:.2f} s")
            for stage in STAGES:
                if stage in timer.seconds:
                    samples[stage].append(timer.seconds[stage])
        stages = {stage: summarize(values) for stage, values in samples.items() if values}
        if refiner is not None:
            stages["refine_per_step"] = summarize(
                [
                    seconds / max(1, len(curve))
                    for seconds, curve in zip(samples["refine"], refiner.curves[-settings.runs :], strict=False)
                ]
            )
        device_ms = (
            {
                network: (ms - device_ms_before.get(network, 0.0)) / settings.runs
                for network, ms in backend.device_ms().items()
            }
            if hasattr(backend, "device_ms")
            else None
        )
        results.append(
            {
                "batch": batch,
                "device_ms_per_run": device_ms,
                "stages_s": stages,
                "images_per_s": batch / stages["total"]["median"],
                "per_image_s": stages["total"]["median"] / batch,
                "images": images,
            }
        )
    compiled = getattr(backend, "compile_s", None)
    return {
        "results": results,
        "peak_rss_mb": peak_rss_mb(),
        "gpu_memory_mb": gpu_memory_mb(name, backend),
        "threads": thread_counts(backend),
        **({"compile_s": compiled()} if compiled is not None and compiled() else {}),
    }


def make_refiner(backend: Any, settings: BenchSettings) -> Refiner | None:
    """A refiner with a fixed step count (no early stop), so per-step cost compares; None where it cannot run.

    Refinement runs in torch: torch backends with CLIP weights that include the image encoder.
    """
    clip = getattr(backend, "clip", None)
    if clip is None or not clip.has_visual_weights:
        return None
    from cfdeploy.refine import RefineSettings, refiner_for

    steps = settings.refine_steps
    return refiner_for(backend, RefineSettings(steps, patience=steps + 1), settings.prompt)


def thread_counts(backend: Any) -> dict[str, int]:
    """Intra-op threads of the runtimes this process loaded (torch counts only if the backend imported it)."""
    counts = {}
    graphs = getattr(backend, "graphs", None)
    if graphs is not None:
        counts[f"{graphs.describe()['backend']}_intra_op"] = graphs.threads
    torch = sys.modules.get("torch")
    if torch is not None:
        counts["torch_intra_op"] = torch.get_num_threads()
    return counts


def parity(images: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    """Max abs error and PSNR (data range 2: images live in about [-1, 1]) against the reference images."""
    error = images.astype(np.float64) - expected
    mse = float(np.mean(error**2))
    return {
        "reference": PARITY_REFERENCE,
        "max_abs": float(np.abs(error).max()),
        "psnr_db": float("inf") if mse == 0 else 10 * math.log10(4.0 / mse),
    }


def measure_in_child(messages: Any, name: str, sources: Sources, settings: BenchSettings) -> None:
    """A child process's work: progress messages, then the report (or the exception) on ``messages``."""
    try:
        report = measure_backend(name, sources, settings, lambda message: messages.put(("progress", message)))
    except BaseException as error:  # the parent raises it, as if it had run here
        messages.put(("error", error))
    else:
        messages.put(("report", report))


def measure_in_process(name: str, sources: Sources, settings: BenchSettings, on_progress: Progress) -> dict[str, Any]:
    """:func:`measure_backend` in a fresh spawned process, passing its progress messages on as they come."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    process = context.Process(target=measure_in_child, args=(messages, name, sources, settings))
    process.start()
    try:
        while True:
            try:
                kind, payload = messages.get(timeout=0.5)
            except queue.Empty:
                if process.is_alive() or not messages.empty():
                    continue
                raise CfdeployError(
                    f"the process benchmarking {name} ended without a report (exit code {process.exitcode})"
                ) from None
            if kind == "progress":
                on_progress(payload)
            elif kind == "error":
                raise payload
            else:
                report: dict[str, Any] = payload
                process.join()
                return report
    finally:
        if process.is_alive():  # the parent was interrupted, or the child's error came first
            process.terminate()
        process.join()


def run_bench(sources: Sources, settings: BenchSettings, on_progress: Progress = ignore_progress) -> dict[str, Any]:
    """Measure every requested backend (:data:`PRESETS` names), each in its own process, and assemble the report.

    Ctrl-C after a backend was measured ends the run with the report of those measured so far, ``interrupted_at``
    naming the backend it stopped (an interrupt before any was measured propagates).
    """
    check_backend_names(settings.backends)
    reports: list[dict[str, Any]] = []
    interrupted_at = None
    for index, name in enumerate(settings.backends, 1):
        on_progress(f"{name}: opening (backend {index}/{len(settings.backends)})")
        try:
            reports.append(measure_in_process(name, sources, settings, on_progress))
        except KeyboardInterrupt:
            if not any("results" in report for report in reports):
                raise
            interrupted_at = name
            break
    reference = next((r for r in reports if r["backend"] == PARITY_REFERENCE and "results" in r), None)
    reference_images = {result["batch"]: result["images"] for result in reference["results"]} if reference else {}
    for report in reports:
        for result in report.get("results", []):
            images = result.pop("images")
            if result["batch"] in reference_images:
                result["parity"] = parity(images, reference_images[result["batch"]])
    return {
        "machine": machine_info(),
        "settings": {**settings.__dict__, "backends": list(settings.backends)},
        "backends": reports,
        **({"interrupted_at": interrupted_at} if interrupted_at else {}),
    }


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per backend and batch size, every field (the CSV; the table on screen shows some)."""
    rows = []
    for backend in report["backends"]:
        for result in backend.get("results", []):
            row: dict[str, Any] = {"backend": backend["backend"], "batch": result["batch"]}
            for stage in STAGES:
                row[f"{stage}_median_ms"] = (
                    1000 * result["stages_s"][stage]["median"] if stage in result["stages_s"] else None
                )
            total = result["stages_s"]["total"]
            row.update(
                total_p90_ms=1000 * total["p90"],
                total_p99_ms=1000 * total["p99"],
                total_mean_ms=1000 * total["mean"],
                images_per_s=result["images_per_s"],
                per_image_ms=1000 * result["per_image_s"],
                peak_rss_mb=backend.get("peak_rss_mb"),
                gpu_memory_mb=backend.get("gpu_memory_mb"),
                gpu_ms=sum((result.get("device_ms_per_run") or {}).values()) or None,
                refine_per_step_ms=1000 * result["stages_s"]["refine_per_step"]["median"]
                if "refine_per_step" in result["stages_s"]
                else None,
                max_abs_error=result.get("parity", {}).get("max_abs"),
                psnr_db=result.get("parity", {}).get("psnr_db"),
            )
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Column:
    """A column of the table on screen: its heading, the :func:`table_rows` key it shows, and its decimals."""

    heading: str
    key: str
    digits: int | None = 1  # None: shown as is


NAME_COLUMNS = (Column("backend", "backend", None), Column("batch", "batch", None))
COMPACT_COLUMNS = (
    *NAME_COLUMNS,
    Column("total ms", "total_median_ms"),
    Column("p90 ms", "total_p90_ms"),
    Column("img/s", "images_per_s", 2),
    Column("RSS MB", "peak_rss_mb", 0),
    Column("GPU ms", "gpu_ms"),
    Column("GPU MB", "gpu_memory_mb", 0),
    Column("PSNR dB", "psnr_db"),
)
WIDE_COLUMNS = (
    *NAME_COLUMNS,
    *(Column(stage, f"{stage}_median_ms") for stage in STAGES),
    Column("p90", "total_p90_ms"),
    Column("p99", "total_p99_ms"),
    Column("img/s", "images_per_s", 2),
    Column("RSS MB", "peak_rss_mb", 0),
    Column("GPU ms", "gpu_ms"),
    Column("GPU MB", "gpu_memory_mb", 0),
    Column("refine/step", "refine_per_step_ms"),
    Column("max abs err", "max_abs_error", 6),
    Column("PSNR dB", "psnr_db"),
)


def table_columns(rows: Sequence[dict[str, Any]], wide: bool = False) -> list[Column]:
    """The compact (or wide: per stage) columns that hold a value in some row."""
    return [
        column
        for column in (WIDE_COLUMNS if wide else COMPACT_COLUMNS)
        if any(row[column.key] is not None for row in rows)
    ]


def cell_text(value: Any, column: Column) -> str:
    if value is None:
        return "-"
    return str(value) if column.digits is None else f"{value:.{column.digits}f}"


def write_json(report: dict[str, Any], path: Path) -> None:
    write_atomic(path, (json.dumps(report, indent=2, default=float) + "\n").encode())


def write_csv(report: dict[str, Any], path: Path) -> None:
    import csv

    rows = table_rows(report)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["backend"])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue().encode())


def plot_figure(report: dict[str, Any]) -> Figure:
    """Stacked bars of median ms per stage (the stages that ran), one bar per backend and batch size.

    The legend sits to the right of the axes, so it never covers a bar.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as missing:
        raise missing_extra("matplotlib", "--plot", missing) from None
    rows = table_rows(report)
    labels = [f"{row['backend']}\nbatch {row['batch']}" for row in rows]
    ran = [stage for stage in editing.STAGES if any(row[f"{stage}_median_ms"] for row in rows)]
    figure = Figure(figsize=(max(6.0, 1.4 * len(rows)) + 1.5, 4.5), layout="constrained")
    axis = figure.subplots()
    bottom = np.zeros(len(rows))
    for stage in ran:
        values = np.array([row[f"{stage}_median_ms"] or 0.0 for row in rows])
        axis.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    axis.set_ylabel("median ms per batch")
    axis.set_title("cfdeploy bench: latency per stage")
    figure.legend(loc="outside right upper", fontsize=8, title="stage", reverse=True)  # top to bottom, as stacked
    return figure


def write_plot(report: dict[str, Any], path: Path) -> None:
    plot_figure(report).savefig(path, dpi=120)


def generator_gflop(size: int, channel_multiplier: int = 2) -> float:
    """Convolution GFLOP of one config-f generator forward (modulated 3x3 convs and 1x1 ToRGB)."""

    def channels(resolution: int) -> int:
        return min(512, 16384 * channel_multiplier // resolution)

    flop = 2 * 9 * channels(4) ** 2 * 16 + 2 * channels(4) * 3 * 16
    resolution = 8
    while resolution <= size:
        c_in, c_out = channels(resolution // 2), channels(resolution)
        flop += 2 * 9 * c_in * c_out * (resolution // 2) ** 2  # transposed 3x3, stride 2, on the input grid
        flop += 2 * 9 * c_out * c_out * resolution**2 + 2 * c_out * 3 * resolution**2
        resolution *= 2
    return flop / 1e9


def gemm_peak_gflops(seconds: float = 1.0, n: int = 2048) -> float:
    """fp32 matrix-multiply throughput numpy reaches here: the yardstick for achieved GFLOP/s."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ a
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - started) / 1e9
