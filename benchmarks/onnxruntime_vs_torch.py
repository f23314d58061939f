"""Edit latency of the ONNX Runtime bundle against the torch backend, and cold start against `import torch`.

Synthetic weights in the official formats (the architecture is real), exported with `cfdeploy export`.
Per size: the edit (latent_editor + generator, batch 1, text branch precomputed) timed for both
backends interleaved, median after warm-up. Then the cold start of `cfdeploy edit --bundle` (process
start to its first PNG written and the process gone) against a process that only runs `import torch`.
Run by hand:

    python benchmarks/onnxruntime_vs_torch.py --sizes 256 1024 --runs 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from cfdeploy.backends import open_backend
from cfdeploy.bench import prepare_sources


def edit_once(backend, w: np.ndarray, text_latents: np.ndarray) -> float:
    start = time.perf_counter()
    backend.synthesize(backend.edit_latents(w, text_latents, 1.0))
    return time.perf_counter() - start


def process_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(size: int, workdir: Path, warmup: int, runs: int) -> dict:
    sources = prepare_sources(workdir / f"files_{size}", synthetic=size)
    assert sources.checkpoint is not None and sources.bundle is not None
    bundle = sources.bundle
    backends = {"torch": open_backend("torch", sources.checkpoint), "onnxruntime": open_backend("onnxruntime", bundle)}
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1, backends["torch"].n_latent, 512)).astype(np.float32)
    text_latents = backends["torch"].text_latents(rng.standard_normal((1, 512)).astype(np.float32))
    samples: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(warmup):
        for backend in backends.values():
            edit_once(backend, w, text_latents)
    for _ in range(runs):
        for name, backend in backends.items():
            samples[name].append(edit_once(backend, w, text_latents))

    np.save(workdir / "w1.npy", w)
    np.save(workdir / "t.npy", rng.standard_normal(512).astype(np.float32))
    edit_command = [
        sys.executable,
        "-m",
        "cfdeploy",
        "edit",
        "--bundle",
        str(bundle),
        "-l",
        str(workdir / "w1.npy"),
        "--text-embedding",
        str(workdir / "t.npy"),
        "-o",
        str(workdir / "cold"),
        "--force",
    ]
    cold = {"cfdeploy edit --bundle": [], "import torch": []}
    for _ in range(runs):
        cold["cfdeploy edit --bundle"].append(process_seconds(edit_command))
        cold["import torch"].append(process_seconds([sys.executable, "-c", "import torch"]))
    return {
        "size": size,
        "edit_median_s": {name: statistics.median(times) for name, times in samples.items()},
        "edit_samples_s": samples,
        "cold_start_median_s": {name: statistics.median(times) for name, times in cold.items()},
        "cold_start_samples_s": cold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = [measure(size, Path(scratch), args.warmup, args.runs) for size in args.sizes]

    table = Table(
        title=f"edit (latent_editor + generator), batch 1, fp32, CPU, median of {args.runs} after {args.warmup} warm-up"
    )
    for column in (
        "size",
        "torch (s)",
        "onnxruntime (s)",
        "torch / onnxruntime",
        "cold `cfdeploy edit --bundle` (s)",
        "`import torch` alone (s)",
    ):
        table.add_column(column, justify="right")
    for result in results:
        edit, cold = result["edit_median_s"], result["cold_start_median_s"]
        table.add_row(
            str(result["size"]),
            f"{edit['torch']:.3f}",
            f"{edit['onnxruntime']:.3f}",
            f"{edit['torch'] / edit['onnxruntime']:.2f}x",
            f"{cold['cfdeploy edit --bundle']:.2f}",
            f"{cold['import torch']:.2f}",
        )
    Console().print(table)
    if args.json:
        machine = {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        }
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
