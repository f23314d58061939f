"""``cfdeploy bench``: per-stage latency of each backend, measured the way trtexec reports it.

Each backend runs in a fresh child process (so its peak RSS is its own), through the same
``iter_edits`` path ``cfdeploy edit`` uses: warm-up runs, then timed runs with every stage timed
(device work is synchronised inside each stage, since every stage returns host arrays). GPU backends
also report GPU time from CUDA events (TensorRT per engine, torch for the generator) and GPU memory. Images
are compared against the torch fp32 backend for a parity column (max abs error and PSNR).
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cfdeploy.errors import CfdeployError

BACKENDS = (
    "torch-reference", "torch", "torch-bf16", "torch-cuda", "torch-cuda-fp16",
    "onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt",
)
ORT_PROVIDERS = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
STAGES = ("tokenize", "text_encoder", "text_mapper", "mapper", "refine", "generator", "png", "total")
PARITY_REFERENCE = "torch"


class Skipped(Exception):
    """A backend that cannot run here; the reason goes into the report."""


@dataclass
class Sources:
    checkpoint: Path | None = None
    clip_weights: Path | None = None
    bundle: Path | None = None


@dataclass
class BenchSettings:
    backends: Sequence[str]
    batch_sizes: Sequence[int] = (1,)
    warmup: int = 1
    runs: int = 5
    prompt: str = "green lipstick"
    seed: int = 0
    refine_steps: int = 0


def open_backend(name: str, sources: Sources) -> Any:
    """Build one backend, or raise :class:`Skipped` saying why it cannot run here."""
    if name.startswith("torch"):
        if sources.checkpoint is None:
            raise Skipped("needs --checkpoint (or --synthetic)")
        try:
            import torch
        except ImportError:
            raise Skipped("torch is not installed (the 'export' extra)") from None
        if name.startswith("torch-cuda") and not torch.cuda.is_available():
            raise Skipped("no CUDA GPU visible to torch")
        if name == "torch-reference":
            from cfdeploy.backends.reference_backend import TorchReferenceBackend

            return TorchReferenceBackend.from_checkpoint(sources.checkpoint, sources.clip_weights)
        from cfdeploy.backends.torch_backend import TorchBackend

        device = "cuda" if name.startswith("torch-cuda") else "cpu"
        precision = {"torch-bf16": "bf16", "torch-cuda-fp16": "fp16"}.get(name, "fp32")
        backend = TorchBackend.from_checkpoint(
            sources.checkpoint, sources.clip_weights, device, precision, cuda_graphs=name == "torch-cuda-fp16"
        )
        backend.name = name
        return backend
    if sources.bundle is None:
        raise Skipped("needs --bundle (or --checkpoint with --clip-weights, or --synthetic, to export one)")
    if name in ORT_PROVIDERS:
        from cfdeploy.backends.onnxruntime_backend import OnnxRuntimeBackend

        try:
            backend = OnnxRuntimeBackend.from_bundle(sources.bundle, ORT_PROVIDERS[name])
        except CfdeployError as why:
            raise Skipped(str(why)) from None
        backend.name = name
        return backend
    if name == "tensorrt":
        from cfdeploy.trt import tensorrt_module

        try:
            backend = tensorrt_module("runtime").TensorRTBackend.from_bundle(sources.bundle)
            for network in ("clip_text", "text_mapper", "latent_editor", "generator"):  # what bench runs
                backend.engine(network)
        except CfdeployError as why:
            raise Skipped(str(why)) from None
        return backend
    raise CfdeployError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")


def gpu_memory_mb(backend: Any) -> float | None:
    """Peak GPU memory of a torch CUDA backend, or GPU memory in use for a TensorRT one; None on CPU."""
    if getattr(backend, "device", None) is not None and backend.device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(backend.device) / (1 << 20)
    if backend.name == "tensorrt":
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

    return {"median": statistics.median(ordered), "p90": percentile(0.9), "p99": percentile(0.99),
            "mean": statistics.fmean(ordered)}


def measure_backend(name: str, sources: Sources, settings: BenchSettings) -> dict[str, Any]:
    """Runs in a child process: time every stage at every batch size; return stats and images."""
    from PIL import Image

    from cfdeploy.editing import EditJob, StageTimer, iter_edits
    from cfdeploy.outputs import to_uint8

    try:
        backend = open_backend(name, sources)
    except Skipped as reason:
        return {"backend": name, "skipped": str(reason)}
    rng = np.random.default_rng(settings.seed)
    latents = rng.standard_normal((max(settings.batch_sizes), backend.n_latent, 512)).astype(np.float32)
    has_clip = not name.startswith("torch") or sources.clip_weights is not None  # bundles carry CLIP's text graph
    features = None if has_clip else rng.standard_normal((1, 512)).astype(np.float32)
    results = []
    refiner = make_refiner(backend, settings) if settings.refine_steps else None
    for batch in settings.batch_sizes:
        job = EditJob(latents[:batch], settings.prompt if has_clip else None, features, batch_size=batch, refiner=refiner)
        samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
        images = None
        device_ms_before: dict[str, float] = {}
        for run in range(settings.warmup + settings.runs):
            if run == settings.warmup and hasattr(backend, "device_ms"):
                device_ms_before = backend.device_ms()
            timer = StageTimer()
            started = time.perf_counter()
            for edited in iter_edits(backend, job, timer):
                images = edited.images
                with timer.stage("png"):
                    for pixels in to_uint8(edited.images):
                        Image.fromarray(pixels).save(io.BytesIO(), format="png")
            timer.seconds["total"] = time.perf_counter() - started
            if run >= settings.warmup:
                for stage in STAGES:
                    if stage in timer.seconds:
                        samples[stage].append(timer.seconds[stage])
        stages = {stage: summarize(values) for stage, values in samples.items() if values}
        if refiner is not None:
            stages["refine_per_step"] = summarize([
                seconds / max(1, len(curve)) for seconds, curve in zip(samples["refine"], refiner.curves[-settings.runs:])
            ])
        device_ms = {network: (ms - device_ms_before.get(network, 0.0)) / settings.runs
                      for network, ms in backend.device_ms().items()} if hasattr(backend, "device_ms") else None
        results.append({
            "batch": batch,
            "device_ms_per_run": device_ms,
            "stages_s": stages,
            "images_per_s": batch / stages["total"]["median"],
            "per_image_s": stages["total"]["median"] / batch,
            "images": images,
        })
    return {"backend": name, "results": results, "peak_rss_mb": peak_rss_mb(), "gpu_memory_mb": gpu_memory_mb(backend),
            "threads": thread_counts(backend)}


def make_refiner(backend: Any, settings: BenchSettings) -> Any:
    """A refiner with a fixed step count (no early stop), so per-step cost compares; None where it cannot run.

    Refinement runs in torch: torch backends with CLIP weights that include the image encoder.
    """
    if getattr(backend, "clip", None) is None or not backend.clip.has_visual_weights:
        return None
    from cfdeploy.refine import ClipNCELoss, RefineSettings, Refiner

    loss = ClipNCELoss(backend.clip, "face", settings.prompt).to(backend.device)
    steps = settings.refine_steps
    return Refiner(backend.generator, loss, RefineSettings(steps, patience=steps + 1))


def thread_counts(backend: Any) -> dict[str, int]:
    counts = {}
    options = getattr(backend, "options", None)
    if options is not None:
        counts["onnxruntime_intra_op"] = options.intra_op_num_threads
    try:
        import torch

        counts["torch_intra_op"] = torch.get_num_threads()
    except ImportError:
        pass
    return counts


def parity(images: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    """Max abs error and PSNR (data range 2: images live in about [-1, 1]) against the reference images."""
    error = images.astype(np.float64) - expected
    mse = float(np.mean(error**2))
    return {"reference": PARITY_REFERENCE, "max_abs": float(np.abs(error).max()),
            "psnr_db": float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)}


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    found = {}
    for package in ("cfdeploy", "numpy", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": found}


def run_bench(sources: Sources, settings: BenchSettings, on_backend=lambda name: None) -> dict[str, Any]:
    """Measure every requested backend, each in its own spawned process, and assemble the report."""
    context = multiprocessing.get_context("spawn")
    reports = []
    for name in settings.backends:
        on_backend(name)
        with context.Pool(1) as pool:
            reports.append(pool.apply(measure_backend, (name, sources, settings)))
    reference = next((r for r in reports if r["backend"] == PARITY_REFERENCE and "results" in r), None)
    reference_images = {result["batch"]: result["images"] for result in reference["results"]} if reference else {}
    for report in reports:
        for result in report.get("results", []):
            images = result.pop("images")
            if result["batch"] in reference_images:
                result["parity"] = parity(images, reference_images[result["batch"]])
    return {"machine": machine_info(), "settings": {**settings.__dict__, "backends": list(settings.backends)},
            "backends": reports}


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per backend and batch size (the CSV, and the table on screen)."""
    rows = []
    for backend in report["backends"]:
        for result in backend.get("results", []):
            row: dict[str, Any] = {"backend": backend["backend"], "batch": result["batch"]}
            for stage in STAGES:
                row[f"{stage}_median_ms"] = 1000 * result["stages_s"][stage]["median"] if stage in result["stages_s"] else None
            total = result["stages_s"]["total"]
            row.update(total_p90_ms=1000 * total["p90"], total_p99_ms=1000 * total["p99"], total_mean_ms=1000 * total["mean"],
                       images_per_s=result["images_per_s"], per_image_ms=1000 * result["per_image_s"],
                       peak_rss_mb=backend.get("peak_rss_mb"), gpu_memory_mb=backend.get("gpu_memory_mb"),
                       gpu_ms=sum((result.get("device_ms_per_run") or {}).values()) or None,
                       refine_per_step_ms=1000 * result["stages_s"]["refine_per_step"]["median"]
                       if "refine_per_step" in result["stages_s"] else None,
                       max_abs_error=result.get("parity", {}).get("max_abs"), psnr_db=result.get("parity", {}).get("psnr_db"))
            rows.append(row)
    return rows


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")


def write_csv(report: dict[str, Any], path: Path) -> None:
    import csv

    rows = table_rows(report)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["backend"])
        writer.writeheader()
        writer.writerows(rows)


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Stacked bars: median milliseconds per stage, one bar per backend and batch size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CfdeployError(f"{path}: --plot needs matplotlib (pip install matplotlib)") from None
    rows = table_rows(report)
    labels = [f"{row['backend']}\nbatch {row['batch']}" for row in rows]
    figure, axis = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.5))
    bottom = np.zeros(len(rows))
    for stage in STAGES[:-1]:
        values = np.array([row[f"{stage}_median_ms"] or 0.0 for row in rows])
        axis.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    axis.set_ylabel("median ms per batch")
    axis.set_title("cfdeploy bench: latency per stage")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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
