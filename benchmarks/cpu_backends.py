"""The README's CPU performance tables: every CPU backend at 256 and 1024 px, and batch scaling.

Runs `cfdeploy bench` (the library under it) on synthetic weights of the real architecture, writes
the reports to benchmarks/results/, then prints the Markdown tables rendered from those JSON files.
`--render` only re-renders the committed JSON (that is how the README's tables were made):

    python benchmarks/cpu_backends.py            # measure (about 10 minutes on 2 cores), then render
    python benchmarks/cpu_backends.py --render   # render benchmarks/results/*.json

`--runtimes BUNDLE [BUNDLE...]` compares the bundle runtimes side by side instead: ONNX Runtime fp32, OpenVINO fp32
and OpenVINO bf16 (a row saying why where the CPU has no bf16), each in its own process with its compiled-graph
cache warm, driven in turn with the order rotating each round; medians of --runs, ratios from the same run. It times
the generator at batch 1 and 8, the edit (latent editor + generator, batch 1) and, for a bundle with one, the e4e
encoder at batch 1 and 8, and writes benchmarks/results/openvino.json:

    python benchmarks/cpu_backends.py --runtimes engines/b256 engines/with_encoder --runs 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

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


RUNTIMES = {"onnxruntime fp32": ("onnxruntime", None), "openvino fp32": ("openvino", None)}
RUNTIMES["openvino bf16"] = ("openvino", "bf16")
RUNTIME_BASELINE = "onnxruntime fp32"


def runtime_worker(connection: Any, runtime: str, precision: str | None, bundle: str) -> None:
    """One runtime over one bundle in its own process: answers (stage, batch) with the seconds it took, or why not."""
    from cfdeploy.backends import open_backend
    from cfdeploy.errors import CfdeployError

    try:
        backend = open_backend(runtime, Path(bundle), precision=precision)
    except CfdeployError as why:
        connection.send(str(why))
        return
    connection.send("ready")
    rng = np.random.default_rng(0)
    while (job := connection.recv()) is not None:
        stage, batch = job
        w = (0.5 * rng.standard_normal((batch, backend.n_latent, backend.style_dim))).astype(np.float32)
        images = rng.uniform(-1, 1, (batch, 3, 256, 256)).astype(np.float32)
        started = time.perf_counter()
        if stage == "generator":
            backend.synthesize(w)
        elif stage == "encoder":
            backend.encode(images)
        else:
            backend.synthesize(backend.edit_latents(w, w[:1], 1.0))
        connection.send(time.perf_counter() - started)
    connection.send(backend.describe())


def measure_runtimes(bundles: list[str], runs: int) -> dict[str, Any]:
    """Every stage of every bundle on every runtime, alternating processes; medians in seconds."""
    from cfdeploy.bundle import Bundle
    from cfdeploy.environment import machine_info

    rows: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    for bundle in bundles:
        opened = Bundle(Path(bundle))
        stages = [("generator", 1), ("generator", 8), ("edit", 1)]
        stages += [("encoder", 1), ("encoder", 8)] if opened.has_network("encoder") else []
        workers, skipped = {}, {}
        for label, (runtime, precision) in RUNTIMES.items():
            ours, theirs = context.Pipe()
            process = context.Process(target=runtime_worker, args=(theirs, runtime, precision, bundle))
            process.start()
            answer = ours.recv()
            if answer == "ready":
                workers[label] = (process, ours)
            else:
                skipped[label] = answer
                process.join()
        for stage, batch in stages:
            for _, connection in workers.values():  # warm-up: first call at this shape
                connection.send((stage, batch))
                connection.recv()
            times: dict[str, list[float]] = {label: [] for label in workers}
            order = list(workers)
            for round_index in range(runs):
                for label in order[round_index % len(order) :] + order[: round_index % len(order)]:
                    workers[label][1].send((stage, batch))
                    times[label].append(workers[label][1].recv())
            row = {"bundle": Path(bundle).name, "size": opened.size, "stage": stage, "batch": batch}
            row["seconds"] = {label: statistics.median(values) for label, values in times.items()}
            row["skipped"] = skipped
            rows.append(row)
            print(row)
        for process, connection in workers.values():
            connection.send(None)
            connection.recv()
            process.join()
    return {"rows": rows, "settings": {"runs": runs}, "machine": machine_info()}


def render_runtimes(report: dict[str, Any]) -> str:
    """ONNX Runtime against OpenVINO, per stage: medians and ratios to ONNX Runtime fp32 from the same run."""
    lines = [
        f"Bundle runtimes, side by side (alternating processes, median of {report['settings']['runs']}, seconds; "
        f"x = speed relative to {RUNTIME_BASELINE})",
        "",
        "| bundle | stage | batch | " + " | ".join(RUNTIMES) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(RUNTIMES),
    ]
    for row in report["rows"]:
        baseline = row["seconds"][RUNTIME_BASELINE]
        cells = [
            f"{row['seconds'][label]:.3f} ({baseline / row['seconds'][label]:.2f}x)"
            if label in row["seconds"]
            else "not run here"
            for label in RUNTIMES
        ]
        lines.append(
            f"| {row['bundle']} ({row['size']} px) | {row['stage']} | {row['batch']} | " + " | ".join(cells) + " |"
        )
    reasons = {label: why for row in report["rows"] for label, why in row["skipped"].items()}
    lines += ["", *(f"{label}: not run here: {why}" for label, why in reasons.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only render the committed JSON")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runtimes", nargs="+", metavar="BUNDLE", help="compare ONNX Runtime and OpenVINO instead")
    args = parser.parse_args()
    if args.runtimes:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "openvino.json").write_text(json.dumps(measure_runtimes(args.runtimes, args.runs), indent=2) + "\n")
        print(render_runtimes(json.loads((RESULTS / "openvino.json").read_text())))
        return
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
