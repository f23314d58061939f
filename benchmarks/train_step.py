"""`cfdeploy train`: time and peak memory of one training step, and where the time goes.

For each size (256 and 1024 px), device (the CPU; CUDA when present) and precision (fp32 and bf16; fp16
on CUDA), a fresh process builds the trainer on synthetic files in the official formats (a CF-CLIP
checkpoint whose generator is reused, CLIP ViT-B/32 with its image tower, ArcFace IR-SE-50: seeded
random weights, the real architectures) at the official settings (batch 2, 8 warps, all three loss
terms, Ranger), runs --warmup steps, then times --steps steps (median). The parts are then timed alone
on the same batch: the generator's forward for the source (no gradient), its forward and backward
through w_hat, CLIP-NCE (image encoder on 8 warps + the source, forward and backward) and the identity
loss (ArcFace, forward and backward). Peak memory: the process's maximum resident set on the CPU,
`torch.cuda.max_memory_allocated` on CUDA.

Run by hand (about 10 minutes on 2 cores; the synthetic files are kept in --cache):

    python benchmarks/train_step.py --cache /tmp/cfdeploy-train-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SIZES = (256, 1024)
PARTS = ("generator (source, no grad)", "generator fwd+bwd", "CLIP-NCE fwd+bwd", "identity fwd+bwd")


def files_for(cache: Path, size: int) -> dict[str, Path]:
    import numpy as np
    import torch

    from cfdeploy.bench import prepare_sources
    from cfdeploy.models.arcface import ArcFace

    directory = cache / f"{size}px"
    checkpoint, clip = directory / f"synthetic_{size}.pt", directory / "synthetic_clip_text.pt"
    if not (checkpoint.exists() and clip.exists()):  # each configuration's process reads the same files
        sources = prepare_sources(directory, synthetic=size, need_bundle=False, with_visual=True)
        assert (sources.checkpoint, sources.clip_weights) == (checkpoint, clip)
    arcface, latents = cache / "arcface.pt", directory / "latents.npy"
    if not arcface.exists():
        torch.manual_seed(0)
        torch.save(ArcFace().state_dict(), arcface)
    if not latents.exists():
        n_latent = 2 * (size.bit_length() - 1) - 2
        np.save(latents, np.random.default_rng(0).standard_normal((8, n_latent, 512)).astype(np.float32))
    return {"generator": checkpoint, "clip": clip, "arcface": arcface, "latents": latents}


def timed(function: Callable[[], Any], runs: int, synchronize: Callable[[], None]) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        synchronize()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def measure(
    cache: Path,
    size: int,
    device: str,
    precision: str,
    warmup: int,
    steps: int,
    batch_size: int = 2,
    augmentations: int = 8,
    frozen_losses: bool = True,
) -> dict[str, Any]:
    """One configuration, in this process. A check of the script may ask a smaller batch, fewer warps, or no
    CLIP-NCE and identity terms (their networks' sizes are fixed); the official settings are the defaults."""
    import torch

    from cfdeploy.models.arcface import identity_loss
    from cfdeploy.training.run import prepare
    from cfdeploy.training.trainer import TrainInputs, TrainSettings, step_generator

    files = files_for(cache, size)
    settings = TrainSettings(
        "green lipstick",
        steps=warmup + steps,
        precision=precision,
        batch_size=batch_size,
        augmentations=augmentations,
        **({} if frozen_losses else {"nce_lambda": 0.0, "id_lambda": 0.0}),
    )
    inputs = TrainInputs(files["generator"], files["clip"], files["latents"], identity_weights=files["arcface"])
    trainer = prepare(settings, inputs, device, lambda stage: None)
    model = trainer.model
    synchronize = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        trainer.train_step()
    step_s = statistics.median(trainer.train_step().step_s for _ in range(steps))

    w = trainer.latents(slice(0, settings.batch_size))
    with torch.no_grad(), model.reduced_precision():
        source = model.generator(w).float()

    def generator_source() -> None:
        with torch.no_grad(), model.reduced_precision():
            model.generator(w)

    def generator_backward() -> None:
        latent = w.clone().requires_grad_(True)
        with model.reduced_precision():
            image = model.generator(latent)
        image.float().square().mean().backward()

    def nce_backward() -> None:
        edited = source.clone().requires_grad_(True)
        with model.reduced_precision():
            loss = model.nce(edited, source, step_generator(0, 1))
        loss.backward()

    def identity_backward() -> None:
        assert model.arcface is not None
        edited = source.clone().requires_grad_(True)
        with model.reduced_precision():
            loss = identity_loss(model.arcface, edited, source)
        loss.backward()

    functions = (
        generator_source,
        generator_backward,
        nce_backward if model.nce is not None else None,
        identity_backward if model.arcface is not None else None,
    )
    parts = {
        name: timed(function, steps, synchronize) if function is not None else None
        for name, function in zip(PARTS, functions, strict=True)
    }
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "size": size,
        "device": device,
        "precision": precision,
        "batch_size": batch_size,
        "augmentations": augmentations,
        "frozen_losses": frozen_losses,
        "step_s": step_s,
        "parts_s": parts,
        "peak_memory_gib": peak,
        "threads": torch.get_num_threads(),
    }


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        "| size | device | precision | step (s) | "
        + " | ".join(f"{part} (s)" for part in PARTS)
        + " | 1,000 steps | peak memory (GiB) |",
        "| ---: | --- | --- | ---: |" + " ---: |" * (len(PARTS) + 2),
    ]
    for result in results:
        hours = result["step_s"] * 1000 / 3600
        lines.append(
            f"| {result['size']} | {result['device']} | {result['precision']} | {result['step_s']:.2f} | "
            + " | ".join("-" if result["parts_s"][part] is None else f"{result['parts_s'][part]:.2f}" for part in PARTS)
            + f" | {hours:.1f} h | {result['peak_memory_gib']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="keep the synthetic files here between runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (and timed runs of each part)")
    parser.add_argument("--json", type=Path, default=RESULTS / "train_step.json")
    parser.add_argument("--one", nargs=3, metavar=("SIZE", "DEVICE", "PRECISION"), help=argparse.SUPPRESS)
    # benchmarks/gpu/run.sh --dry-run checks the script with the smallest batch (not the official settings).
    parser.add_argument("--batch-size", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--augmentations", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--no-frozen-losses", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, device, precision = args.one
        figures = measure(
            args.cache,
            int(size),
            device,
            precision,
            args.warmup,
            args.steps,
            args.batch_size,
            args.augmentations,
            not args.no_frozen_losses,
        )
        print(json.dumps(figures))
        return
    import torch

    configurations = [("cpu", "fp32"), ("cpu", "bf16")]
    if torch.cuda.is_available():
        configurations += [("cuda", "fp32"), ("cuda", "bf16"), ("cuda", "fp16")]
    results = []
    for size in args.sizes:
        files_for(args.cache, size)  # written once, outside the timed processes
        for device, precision in configurations:
            command = [
                sys.executable,
                __file__,
                "--cache",
                str(args.cache),
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
                "--one",
                str(size),
                device,
                precision,
            ]
            completed = subprocess.run(command, capture_output=True, text=True)
            if completed.returncode != 0:
                raise SystemExit(completed.stderr[-2000:])
            results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            print(render(results[-1:]).splitlines()[-1], flush=True)
    from cfdeploy.environment import machine_info

    report = {
        "machine": machine_info(),
        "settings": vars(args) | {"cache": str(args.cache), "json": str(args.json)},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(render(results))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
