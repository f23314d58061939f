"""Generator forward time: cfdeploy's batch-agnostic modulated conv vs the official grouped-conv form.

Both run the same synthetic weights, interleaved run by run in one process so machine noise hits
both alike; the table shows medians and the ratio. Run by hand:

    python benchmarks/generator_formulations.py --sizes 256 1024 --runs 7
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from cfdeploy.models import reference
from cfdeploy.models.stylegan2 import Generator, GeneratorConfig


def time_once(forward, latents: torch.Tensor) -> float:
    start = time.perf_counter()
    forward(latents)
    return time.perf_counter() - start


def measure(size: int, batch: int, warmup: int, runs: int) -> dict:
    torch.manual_seed(0)
    generator = Generator(GeneratorConfig(size)).eval()
    state = generator.state_dict()
    latents = torch.randn(batch, generator.config.n_latent, 512)
    forwards = {"cfdeploy": generator, "official grouped conv": lambda w: reference.generator(state, w)}
    samples: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        outputs = {name: forward(latents) for name, forward in forwards.items()}
        for _ in range(warmup):
            for forward in forwards.values():
                forward(latents)
        for _ in range(runs):
            for name, forward in forwards.items():
                samples[name].append(time_once(forward, latents))
    ours, official = outputs["cfdeploy"], outputs["official grouped conv"]
    return {
        "size": size,
        "batch": batch,
        "median_s": {name: statistics.median(times) for name, times in samples.items()},
        "samples_s": samples,
        "rel_l2": float((ours - official).norm() / official.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    results = [measure(size, args.batch, args.warmup, args.runs) for size in args.sizes]
    table = Table(
        title=f"generator forward, batch {args.batch}, fp32, {torch.get_num_threads()} threads, median of {args.runs}"
    )
    for column in ("size", "cfdeploy (s)", "official grouped conv (s)", "official / cfdeploy", "rel L2"):
        table.add_column(column, justify="right")
    for result in results:
        ours, official = result["median_s"]["cfdeploy"], result["median_s"]["official grouped conv"]
        table.add_row(
            str(result["size"]), f"{ours:.3f}", f"{official:.3f}", f"{official / ours:.2f}x", f"{result['rel_l2']:.1e}"
        )
    Console().print(table)
    if args.json:
        machine = {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
