"""MkDocs hook: measured figures are rendered from the benchmark JSON in benchmarks/results/, never retyped.

A page line of the form `<!-- figures: NAME -->` is replaced by the Markdown table(s) rendered from the
JSON named in FIGURES, followed by a line naming the source file, the script that measured it and the
machine the JSON records. Where a benchmark script has its own renderer (`cpu_backends.py --render`,
`encoder.py`, `train_step.py`, `dac.py`, `gpu_backends.py --render`) that renderer is used; the others
are rendered here from the JSON directly. An unknown NAME, or a missing JSON other than a GPU one, is an
error (the build fails); GPU figures, and encoder.py's cold-start part, that have not been measured yet say so.

The docs build in a light environment: nothing here imports torch, and a benchmark script is imported
only when its top level needs nothing heavier than numpy and `cfdeploy.bench`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- figures: ([a-z0-9_]+) -->[ \t]*$", re.MULTILINE)


def benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (its `main` is not run), with the repository importable."""
    module_name = f"_cfdeploy_benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load(file: str) -> dict[str, Any]:
    return json.loads((RESULTS / file).read_text())


def machine(report: dict[str, Any]) -> str:
    """What the JSON says about the machine it was measured on, and nothing more."""
    info = report.get("machine", {})
    parts = []
    if info.get("cpu"):
        parts.append(f"{info['cpu']}, {info['logical_cpus']} logical CPUs" if info.get("logical_cpus") else info["cpu"])
    if info.get("threads"):
        parts.append(f"{info['threads']} threads")
    if info.get("device"):
        parts.append(f"device {info['device']}")
    if info.get("gemm_peak_gflops"):
        parts.append(f"fp32 GEMM peak {info['gemm_peak_gflops']:.0f} GFLOP/s")
    if info.get("platform"):
        parts.append(info["platform"])
    versions = info.get("versions") or {}
    if versions:
        parts.append(", ".join(f"{package} {version}" for package, version in versions.items()))
    if not parts and info.get("node"):
        parts.append(f"host {info['node']} (the JSON records no CPU model)")
    return "; ".join(parts) or "not recorded in the JSON"


# --- renderers for the JSON whose scripts print their table inline (or import torch at top level) ---


def render_onnxruntime_vs_torch(report: dict[str, Any]) -> str:
    """benchmarks/onnxruntime_vs_torch.py's table (the script prints it with rich; it imports torch)."""
    lines = [
        "| size | torch (s) | onnxruntime (s) | torch / onnxruntime "
        "| cold `cfdeploy edit --bundle` (s) | `import torch` alone (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in report["results"]:
        edit, cold = result["edit_median_s"], result["cold_start_median_s"]
        runs = len(next(iter(result["edit_samples_s"].values())))
        lines.append(
            f"| {result['size']} | {edit['torch']:.3f} | {edit['onnxruntime']:.3f} | "
            f"{edit['torch'] / edit['onnxruntime']:.2f}x | {cold['cfdeploy edit --bundle']:.2f} | "
            f"{cold['import torch']:.2f} |"
        )
    return f"Edit (latent_editor + generator), batch 1, fp32, CPU, median of {runs}\n\n" + "\n".join(lines)


def render_serve_throughput(report: dict[str, Any]) -> str:
    """benchmarks/serve_throughput.py's table (the script prints it from main; it imports Ray Serve's server)."""
    settings = report["settings"]
    loop = next(row for name, row in report["results"].items() if name.startswith("sequential loop"))
    lines = [
        f"{settings['requests']} requests per run; {settings['replicas']} replicas × {settings['cpus_per_replica']} CPU, "
        f"backend {settings['backend']}, largest generator batch {settings['max_batch']}",
        "",
        "| run | requests/s | vs loop | p50 (ms) | p99 (ms) | p99/p50 | mean generator batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["results"].items():
        batch = row.get("mean_generator_batch")
        lines.append(
            f"| {name} | {row['requests_per_s']:.2f} | {row['requests_per_s'] / loop['requests_per_s']:.2f}x "
            f"| {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['p99_ms'] / row['p50_ms']:.2f} "
            f"| {'' if batch is None else f'{batch:.2f}'} |"
        )
    per_image = report["generator_s_per_image"]
    largest = max(per_image, key=int)
    lines += [
        "",
        f"Generator alone: {1000 * per_image['1']:.0f} ms per image at batch 1, "
        f"{1000 * per_image[largest]:.0f} ms at batch {largest}.",
    ]
    return "\n".join(lines)


def render_gpu(size: int) -> Callable[[], tuple[str, str | None]]:
    def render() -> tuple[str, str | None]:
        file = f"gpu_{size}.json"
        if not (RESULTS / file).is_file():
            return (
                f"**{size} px on a GPU: not measured on a GPU yet** (`python benchmarks/gpu_backends.py` "
                f"writes `benchmarks/results/{file}` on a GPU machine).",
                None,
            )
        report = load(file)
        return benchmark("gpu_backends").render(report), file

    return render


def render_gpu_run() -> tuple[str, str | None]:
    """benchmarks/gpu/run.sh's results, committed as benchmarks/results/gpu_run/ (the folder names its own machine)."""
    folder = RESULTS / "gpu_run"
    if not (folder / "steps.jsonl").is_file():
        return (
            "**Every CUDA path (benchmarks/gpu/run.sh): not measured on a GPU yet** (`benchmarks/gpu/prepare.sh`, then "
            "`benchmarks/gpu/run.sh DIR` on a GPU machine; its folder goes to `benchmarks/results/gpu_run/`).",
            None,
        )
    table = benchmark("gpu_backends").render_run(folder)
    return f"{table}\n\n*Rendered from `benchmarks/results/gpu_run/` (measured by `benchmarks/gpu/run.sh`).*", None


def render_photo_cold_start() -> tuple[str, str | None]:
    """encoder.py's cold-start part, with the machine it records itself (it can be measured apart from the rest)."""
    report = load("encoder.json")
    table = benchmark("encoder").render_cold_start(report)
    if "cold_start" not in report:
        return table, None  # "not measured yet"
    source = (
        "*Rendered from `benchmarks/results/encoder.json` (measured by `benchmarks/encoder.py --parts cold-start`); "
        f"machine: {machine(report['cold_start'])}.*"
    )
    return f"{table}\n\n{source}", None


def from_json(file: str, render: Callable[[dict[str, Any]], str]) -> Callable[[], tuple[str, str | None]]:
    def rendered() -> tuple[str, str | None]:
        return render(load(file)), file

    return rendered


# NAME -> (renderer returning (Markdown, JSON file or None), the script that measures it)
FIGURES: dict[str, tuple[Callable[[], tuple[str, str | None]], str]] = {
    "cpu_256": (
        from_json("cpu_256.json", lambda r: benchmark("cpu_backends").render_latency(r)),
        "benchmarks/cpu_backends.py",
    ),
    "cpu_1024": (
        from_json("cpu_1024.json", lambda r: benchmark("cpu_backends").render_latency(r)),
        "benchmarks/cpu_backends.py",
    ),
    "cpu_256_batches": (
        from_json("cpu_256_batches.json", lambda r: benchmark("cpu_backends").render_scaling(r)),
        "benchmarks/cpu_backends.py",
    ),
    "openvino": (
        from_json("openvino.json", lambda r: benchmark("cpu_backends").render_runtimes(r)),
        "benchmarks/cpu_backends.py --runtimes",
    ),
    "encoder": (
        from_json("encoder.json", lambda r: benchmark("encoder").render(r, cold_start=False)),
        "benchmarks/encoder.py",
    ),
    "photo_cold_start": (render_photo_cold_start, "benchmarks/encoder.py --parts cold-start"),
    "train_step": (
        from_json("train_step.json", lambda r: benchmark("train_step").render(r["results"])),
        "benchmarks/train_step.py",
    ),
    "dac": (
        from_json("dac.json", lambda r: benchmark("dac").table(r["results"], r["machine"]["device"])),
        "benchmarks/dac.py",
    ),
    "onnxruntime_vs_torch": (
        from_json("onnxruntime_vs_torch.json", render_onnxruntime_vs_torch),
        "benchmarks/onnxruntime_vs_torch.py",
    ),
    "serve_throughput": (from_json("serve_throughput.json", render_serve_throughput), "benchmarks/serve_throughput.py"),
    "gpu_256": (render_gpu(256), "benchmarks/gpu_backends.py"),
    "gpu_1024": (render_gpu(1024), "benchmarks/gpu_backends.py"),
    "gpu_run": (render_gpu_run, "benchmarks/gpu/run.sh"),
}


def figures(name: str) -> str:
    if name not in FIGURES:
        raise KeyError(f"unknown figures marker {name!r}; known: {', '.join(sorted(FIGURES))}")
    render, script = FIGURES[name]
    table, file = render()
    if file is None:
        return table
    source = f"*Rendered from `benchmarks/results/{file}` (measured by `{script}`); machine: {machine(load(file))}.*"
    return f"{table}\n\n{source}"


def on_page_markdown(markdown: str, **_: Any) -> str:
    return MARKER.sub(lambda match: figures(match.group(1)), markdown)
