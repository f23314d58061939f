"""Swapping a prompt's mappers into a bundle with `cfdeploy refit` vs exporting the new checkpoint afresh.

Synthetic weights of the real architecture; the second checkpoint shares the first one's generator,
as CF-CLIP's per-prompt checkpoints do. Prints wall-clock seconds of each command (medians, run
alternately, in fresh processes as users run them): refit, an export of the new checkpoint with the export cache
filled by the first bundle's (generator and CLIP graphs reused), and one traced afresh (``--no-export-cache``).
The cache lives in the scratch directory, so a user's own is neither read nor filled:

    python benchmarks/refit_vs_export.py --size 256 --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cfdeploy.bench import prepare_sources


def timed(*args: str, cache: Path) -> float:
    started = time.perf_counter()
    environment = {**os.environ, "CFDEPLOY_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-m", "cfdeploy", *args], check=True, capture_output=True, env=environment)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        sources = prepare_sources(directory, synthetic=args.size, need_bundle=False)
        checkpoint, clip_weights = sources.checkpoint, sources.clip_weights
        content = torch.load(checkpoint, weights_only=True)
        generator = torch.Generator().manual_seed(1)
        for key, value in content["state_dict"].items():
            if not key.startswith("decoder."):
                # another prompt's values everywhere, biases too (zero in a new run's mappers, whose std is 0)
                scale = value.std() if value.std() > 0 else 0.1
                content["state_dict"][key] = torch.randn(value.shape, generator=generator) * scale
        other = directory / "other_prompt.pt"
        torch.save(content, other)
        bundle = directory / "bundle"
        export = ["export", "-c", str(other), "--clip-weights", str(clip_weights), "--text", "green lipstick", "-f"]
        timed(
            "export",
            "-c",
            str(checkpoint),
            "--clip-weights",
            str(clip_weights),
            "--text",
            "green lipstick",
            "-o",
            str(bundle),
            cache=directory / "cache",
        )
        refits, cached, fresh = [], [], []
        for run in range(args.runs):
            refits.append(timed("refit", "--bundle", str(bundle), "-c", str(other), cache=directory / "cache"))
            # each export finds the cache as the first bundle's export left it: its generator and CLIP, no mappers
            as_left = shutil.copytree(directory / "cache", directory / f"cache_{run}")
            cached.append(timed(*export, "-o", str(directory / "cached"), cache=as_left))
            fresh.append(timed(*export, "--no-export-cache", "-o", str(directory / "fresh"), cache=directory / "cache"))
    refit, with_cache, afresh = (statistics.median(times) for times in (refits, cached, fresh))
    print(
        "| size | cfdeploy refit (s) | export, cache filled (s) | export traced afresh (s) | afresh / refit |\n"
        "| ---: | ---: | ---: | ---: | ---: |\n"
        f"| {args.size} | {refit:.1f} | {with_cache:.1f} | {afresh:.1f} | {afresh / refit:.1f}x |"
    )


if __name__ == "__main__":
    main()
