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

BACKENDS = ("torch", "torch-cuda", "torch-cuda-fp16", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
BATCHES = [1, 8]
BASELINE = "torch-cuda"


def measure(size: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        sources = prepare_sources(Path(scratch), synthetic=size)
        try:
            settings = BuildSettings(batch_profile(1, max(BATCHES), max(BATCHES)))
            tensorrt_builder().build_engines(sources.bundle, settings, print)
        except CfdeployError as why:
            print(f"no TensorRT engines: {why}")
        report = run_bench(sources, BenchSettings(BACKENDS, BATCHES, 2, runs), on_progress=print)
    report["size"] = size
    write_json(report, RESULTS / f"gpu_{size}.json")


def render(report: dict) -> str:
    rows = backend_rows(report)
    lines = [
        f"**{report['size']} px**, median of {report['settings']['runs']}: ms per image for latent_editor + generator",
        "",
        "| backend | batch | latent_editor + generator (ms/image) | vs torch-cuda fp32 | GPU ms per run (CUDA events) | GPU MB | PSNR vs CPU fp32 (dB) |",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only render the committed JSON")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    args = parser.parse_args()
    if not args.render:
        RESULTS.mkdir(exist_ok=True)
        for size in args.sizes:
            measure(size, args.runs)
    for size in args.sizes:
        path = RESULTS / f"gpu_{size}.json"
        if path.is_file():
            print(render(json.loads(path.read_text())), end="\n\n")


if __name__ == "__main__":
    main()
