"""The README's CPU performance tables: every CPU backend at 256 and 1024 px, and batch scaling.

Runs `cfdeploy bench` (the library under it) on synthetic weights of the real architecture, writes
the reports to benchmarks/results/, then prints the Markdown tables rendered from those JSON files.
`--render` only re-renders the committed JSON (that is how the README's tables were made):

    python benchmarks/cpu_backends.py            # measure (about 10 minutes on 2 cores), then render
    python benchmarks/cpu_backends.py --render   # render benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cfdeploy.bench import (
    BenchSettings,
    gemm_peak_gflops,
    generator_gflop,
    prepare_sources,
    run_bench,
    write_json,
)

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("torch-reference", "torch", "torch-bf16", "onnxruntime")
BASELINE = "torch-reference"
SHOWN_STAGES = ("clip_text", "text_mapper", "latent_editor", "generator", "png", "total")
EDIT_STAGES = ("latent_editor", "generator")  # the edit itself, without the once-per-prompt text branch


def measure(size: int, batch_sizes: list[int], backends: tuple[str, ...], runs: int, name: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        sources = prepare_sources(Path(scratch), synthetic=size)
        report = run_bench(sources, BenchSettings(backends, batch_sizes, 1, runs), on_progress=print)
    report["size"] = size
    report["machine"]["gemm_peak_gflops"] = gemm_peak_gflops()
    write_json(report, RESULTS / name)


def backend_rows(report: dict) -> dict[str, dict]:
    return {backend["backend"]: backend for backend in report["backends"] if "results" in backend}


def edit_seconds(result: dict) -> float:
    """Median seconds of the edit itself (latent editor + generator) in one run."""
    return sum(result["stages_s"][stage]["median"] for stage in EDIT_STAGES)


def render_latency(report: dict) -> str:
    size, peak = report["size"], report["machine"]["gemm_peak_gflops"]
    rows = backend_rows(report)
    baseline = rows[BASELINE]["results"][0]
    lines = [
        f"**{size} px**, batch 1, median of {report['settings']['runs']} (ms); fp32 GEMM peak measured {peak:.0f} GFLOP/s",
        "",
        "| backend | "
        + " | ".join(SHOWN_STAGES)
        + " | vs torch-reference (edit) | generator GFLOP/s | PSNR vs torch fp32 (dB) | peak RSS (MB) |",
        "| --- |" + " ---: |" * (len(SHOWN_STAGES) + 4),
    ]
    for name, backend in rows.items():
        result = backend["results"][0]
        stages = result["stages_s"]
        psnr = result.get("parity", {}).get("psnr_db")
        lines.append(
            f"| {name} | "
            + " | ".join(f"{1000 * stages[stage]['median']:.0f}" for stage in SHOWN_STAGES)
            + f" | {edit_seconds(baseline) / edit_seconds(result):.2f}x"
            + f" | {generator_gflop(size) / stages['generator']['median']:.0f}"
            + f" | {'exact' if psnr == float('inf') else f'{psnr:.1f}'} | {backend['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def render_scaling(report: dict) -> str:
    rows = backend_rows(report)
    batches = [result["batch"] for result in next(iter(rows.values()))["results"]]
    lines = [
        f"**{report['size']} px batch scaling**: ms per image (latent_editor + generator), "
        f"median of {report['settings']['runs']}",
        "",
        "| backend | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "| --- |" + " ---: |" * len(batches),
    ]
    for name, backend in rows.items():
        cells = [1000 * edit_seconds(result) / result["batch"] for result in backend["results"]]
        lines.append(f"| {name} | " + " | ".join(f"{cell:.0f}" for cell in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only render the committed JSON")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not args.render:
        RESULTS.mkdir(exist_ok=True)
        measure(256, [1], BACKENDS, args.runs, "cpu_256.json")
        measure(1024, [1], BACKENDS, args.runs, "cpu_1024.json")
        measure(256, [1, 2, 4, 8], ("torch", "torch-bf16", "onnxruntime"), 3, "cpu_256_batches.json")
    for name in ("cpu_256.json", "cpu_1024.json"):
        print(render_latency(json.loads((RESULTS / name).read_text())), end="\n\n")
    print(render_scaling(json.loads((RESULTS / "cpu_256_batches.json").read_text())))


if __name__ == "__main__":
    main()
