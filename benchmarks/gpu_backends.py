"""GPU backends at 256 and 1024 px, batch 1 and 8: latency, GPU memory and parity with the CPU fp32 path.

Runs `cfdeploy bench` (the library under it) on synthetic weights of the real architecture: the
torch backend on CPU (the parity reference), torch on CUDA in fp32 and in fp16 with CUDA graphs, ONNX
Runtime's CUDA and TensorRT providers, and TensorRT engines built by `cfdeploy build-engines` (the
backends a machine lacks are listed as skipped). Writes benchmarks/results/gpu_*.json, then prints
Markdown tables; `--render` only re-renders them:

    python benchmarks/gpu_backends.py            # measure on a GPU machine, then render
    python benchmarks/gpu_backends.py --render   # render benchmarks/results/gpu_*.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cpu_backends import RESULTS, backend_rows, edit_seconds

from cfdeploy.bench import BenchSettings, prepare_sources, run_bench, write_json
from cfdeploy.errors import CfdeployError
from cfdeploy.trt import tensorrt_builder
from cfdeploy.trt.plan import BuildSettings, batch_profile

BACKENDS = (
    "torch",
    "torch-cuda",
    "torch-cuda-fp16",
    "torch-cuda-compile",
    "onnxruntime-cuda",
    "onnxruntime-tensorrt",
    "tensorrt",
)
BATCHES = [1, 8]
BASELINE = "torch-cuda"
GENERATOR_GFLOP = {1024: 150.7}  # per image, multiply-adds counted twice (docs/performance.md)
# The dense peaks the floor is drawn from (TFLOP/s, without sparsity) for the cards the GPU machine has.
PEAK_TFLOPS = {"H100": {"fp32": 67.0, "fp16": 989.0}, "H200": {"fp32": 67.0, "fp16": 989.0}}


def measure(
    size: int, runs: int, backends: tuple[str, ...] = BACKENDS, batches: list[int] = BATCHES, out: Path = RESULTS
) -> Path:
    """Time ``backends`` at ``size`` px; a bundle is exported and engines built only when a bundle backend is asked."""
    from cfdeploy.bench import reads_bundle

    with tempfile.TemporaryDirectory() as scratch:
        need_bundle = any(reads_bundle(name) for name in backends)
        sources = prepare_sources(Path(scratch), synthetic=size, need_bundle=need_bundle)
        if need_bundle:
            try:
                settings = BuildSettings(batch_profile(1, max(batches), max(batches)))
                tensorrt_builder().build_engines(sources.bundle, settings, print)
            except CfdeployError as why:
                print(f"no TensorRT engines: {why}")
        report = run_bench(sources, BenchSettings(backends, batches, 2, runs), on_progress=print)
    report["size"] = size
    path = out / f"gpu_{size}.json"
    write_json(report, path)
    return path


def render(report: dict) -> str:
    rows = backend_rows(report)
    lines = [
        f"**{report['size']} px**, median of {report['settings']['runs']}: ms per image for latent_editor + generator",
        "",
        "| backend | batch | latent_editor + generator (ms/image) | vs torch-cuda fp32 "
        "| GPU ms per run (CUDA events) | GPU MB | PSNR vs CPU fp32 (dB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    baseline = {r["batch"]: r for r in rows[BASELINE]["results"]} if BASELINE in rows else {}

    def edit_ms(result: dict) -> float:
        return 1000 * edit_seconds(result) / result["batch"]

    for name, backend in rows.items():
        for result in backend["results"]:
            reference = baseline.get(result["batch"])
            speedup = f"{edit_ms(reference) / edit_ms(result):.2f}x" if reference else "-"
            device = sum((result.get("device_ms_per_run") or {}).values())
            psnr = result.get("parity", {}).get("psnr_db")
            memory = backend.get("gpu_memory_mb")
            lines.append(
                f"| {name} | {result['batch']} | {edit_ms(result):.1f} | {speedup} | {f'{device:.1f}' if device else '-'} "
                f"| {f'{memory:.0f}' if memory else '-'} | {'exact' if psnr == float('inf') else f'{psnr:.1f}'} |"
            )
    skipped = [f"{backend['backend']} ({backend['skipped']})" for backend in report["backends"] if "skipped" in backend]
    return "\n".join(lines + ([f"\nskipped: {'; '.join(skipped)}"] if skipped else []))


def floor_ms(size: int, card: str | None, precision: str) -> float | None:
    """The physics floor of one image's generator: its FLOPs at the card's dense peak (None where either is unknown)."""
    gflop = GENERATOR_GFLOP.get(size)
    peaks = next((peaks for name, peaks in PEAK_TFLOPS.items() if card and name in card), None)
    if gflop is None or peaks is None:
        return None
    return gflop / peaks[precision]


def render_run(results: Path) -> str:
    """benchmarks/gpu/run.sh's results folder as tables: the card, driver and date, each step, each figure."""
    environment = (
        json.loads((results / "environment.json").read_text()) if (results / "environment.json").is_file() else {}
    )
    steps = [json.loads(line) for line in (results / "steps.jsonl").read_text().splitlines() if line.strip()]
    gpu = (environment.get("gpus") or [{}])[0]
    card = gpu.get("name") or environment.get("torch_device") or "no GPU"
    lines = [
        f"**{card}**, driver {gpu.get('driver_version', '-')}, torch {environment.get('torch', '-')} (CUDA "
        f"{environment.get('torch_cuda', '-')}), {environment.get('date', '-')}"
        + (
            " — a dry run on the CPU: these figures check the script, they measure nothing"
            if environment.get("dry_run")
            else ""
        ),
        "",
        "| step | result | seconds (budget) |",
        "| --- | --- | ---: |",
    ]
    for step in steps:
        state = "ok" if step["ok"] else ("ran out of time" if step["timed_out"] else f"failed (exit {step['rc']})")
        lines.append(f"| {step['step']} | {state} | {step['seconds']:.1f} ({step['budget_s']}) |")
    for size in (256, 1024):
        path = results / f"gpu_{size}.json"
        if path.is_file():
            report = json.loads(path.read_text())
            lines += ["", render(report)]
            floors = [(precision, floor_ms(size, card, precision)) for precision in ("fp32", "fp16")]
            if all(value is not None for _, value in floors):
                lines.append(
                    "\nphysics floor of the generator at the card's dense peak: "
                    + ", ".join(f"{precision} {value:.2f} ms/image" for precision, value in floors)
                    + f" ({GENERATOR_GFLOP[size]} GFLOP per image)"
                )
    for name in ("encoder_clip", "edit_e2e", "refine", "train_fp32", "train_bf16", "dac"):
        path = results / f"{name}.json"
        if path.is_file():
            figures = json.loads(path.read_text())
            shown = ", ".join(
                f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                for key, value in flatten(figures).items()
            )
            lines += ["", f"**{name}**: {shown}"]
    return "\n".join(lines)


def flatten(figures: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key} "))
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only render the committed JSON")
    parser.add_argument(
        "--render-run", type=Path, metavar="DIR", help="only render a benchmarks/gpu/run.sh results folder"
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated bench presets")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where gpu_SIZE.json go")
    args = parser.parse_args()
    if args.render_run:
        print(render_run(args.render_run))
        return
    if not args.render:
        args.out.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            measure(size, args.runs, tuple(args.backends.split(",")), args.batches, args.out)
    for size in args.sizes:
        path = args.out / f"gpu_{size}.json"
        if path.is_file():
            print(render(json.loads(path.read_text())), end="\n\n")


if __name__ == "__main__":
    main()
