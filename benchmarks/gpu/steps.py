"""The steps of benchmarks/gpu/run.sh that are more than one command; each writes RESULTS/NAME.json.

``CFDEPLOY_GPU_RUN_DRY=1`` (run.sh --dry-run) makes every step tiny and CPU-only: it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRY = os.environ.get("CFDEPLOY_GPU_RUN_DRY") == "1"
# What each GPU step runs at, and (dry run) at what the CPU checks it: the smallest sizes each path takes, so that
# every step is seconds on two cores (CLIP ViT-B/32 and ArcFace keep their fixed architectures and input sizes).
SIZES = {"backends_256": 256, "backends_1024": 1024, "edit": 1024, "train": 1024}
DRY_SIZE = 16
DRY_E4E_SIZE = 64  # the smallest e4e checkpoint tests/synthetic_files.py writes
DRY_IMAGES = 2
NEEDED_MODULES = (
    "open_clip",
    "ftfy",
    "onnxslim",
    "typer",
    "diffusers",
    "torchvision",
    "onnxscript",
    "PIL",
    "rich",
    "pytest",
)


def write(results: Path, name: str, figures: dict) -> None:
    (results / f"{name}.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def keep_rules() -> dict[str, str]:
    """wheels.txt's ``keep:`` notes: the versions of an installed copy that are good enough (default: any)."""
    rules = {}
    for line in (Path(__file__).parent / "wheels.txt").read_text().splitlines():
        spec, _, note = line.partition("#")
        if spec.strip() and "keep:" in note:
            rules[normalised(spec.split("==")[0].strip())] = note.split("keep:")[1].split()[0]
    return rules


def fits(version: str, rule: str) -> bool:
    if rule == "any":
        return True
    from packaging.specifiers import SpecifierSet

    return version in SpecifierSet(rule)


def install(args: argparse.Namespace) -> None:
    """Unpack each carried wheel whose distribution is missing here (or installed in a version its keep: rule
    refuses) into the site directory that PYTHONPATH puts first: no pip, no network."""
    rules = keep_rules()
    installed = {
        normalised(dist.metadata["Name"]): dist.version for dist in metadata.distributions() if dist.metadata["Name"]
    }
    done, kept = [], []
    args.site.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []:
        name, version = wheel.name.split("-")[:2]
        have = installed.get(normalised(name))
        if have is not None and fits(have, rules.get(normalised(name), "any")):
            kept.append(f"{name} {have}")
            continue
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(args.site)
        done.append(f"{name} {version}")
    check = (
        "import importlib, sys\nfor name in sys.argv[1:]:\n    try:\n        importlib.import_module(name)\n"
        "    except Exception as why:\n        print(f'{name}: {type(why).__name__}: {why}'[:300])"
    )
    found = subprocess.run(
        [sys.executable, "-c", check, *NEEDED_MODULES], capture_output=True, text=True
    )  # the new path
    missing = found.stdout.strip().splitlines() + ([found.stderr.strip()[-300:]] if found.returncode else [])
    write(
        args.results,
        "install",
        {
            "installed": done,
            "already_here": kept,
            "missing": missing,
            "wheels_dir": str(args.wheels),
            "wheels_found": args.wheels.is_dir(),
        },
    )
    if missing:
        sys.exit("cannot import: " + "; ".join(missing))


def environment(args: argparse.Namespace) -> None:
    import torch

    info: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dry_run": DRY,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(
            torch_device=properties.name,
            capability=f"{properties.major}.{properties.minor}",
            memory_gib=round(properties.total_memory / 2**30, 1),
            multiprocessors=properties.multi_processor_count,
        )
    fields = (
        "name",
        "driver_version",
        "memory.total",
        "clocks.sm",
        "clocks.max.sm",
        "clocks.mem",
        "clocks.max.mem",
        "power.limit",
        "temperature.gpu",
        "pstate",
        "compute_mode",
        "mig.mode.current",
    )
    try:
        query = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        info["gpus"] = (
            [
                dict(zip(fields, (part.strip() for part in line.split(",")), strict=False))
                for line in query.stdout.strip().splitlines()
            ]
            if query.returncode == 0
            else []
        )
        info["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as why:
        info["gpus"], info["nvidia_smi"] = [], f"nvidia-smi: {why}"
    try:
        info["packages"] = {
            name: metadata.version(name)
            for name in (
                "numpy",
                "onnx",
                "onnxruntime",
                "open_clip_torch",
                "diffusers",
                "transformers",
                "torchvision",
                "typer",
                "triton",
            )
        }
    except metadata.PackageNotFoundError:
        pass
    write(args.results, "environment", info)


def backends(args: argparse.Namespace) -> None:
    """benchmarks/gpu_backends.py at one size: torch on CUDA in fp32, fp16 + CUDA graphs and torch.compile."""
    if DRY:  # compile takes minutes on a small CPU: the dry run checks the bench's plumbing with the eager CPU path
        command = ["--sizes", str(DRY_SIZE), "--backends", "torch", "--batches", "1", "--runs", "1"]
    else:
        command = [
            "--sizes",
            str(args.size),
            "--backends",
            "torch-cuda,torch-cuda-fp16,torch-cuda-compile",
            "--runs",
            "10" if args.size <= 256 else "5",
        ]
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_backends.py"), *command, "--out", str(args.results)], check=True
    )
    produced = args.results / f"gpu_{DRY_SIZE if DRY else args.size}.json"
    write(args.results, f"backends_{args.size}", {"report": produced.name})


def timed(function, runs: int, device: str) -> float:
    import torch

    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def encoder_clip(args: argparse.Namespace) -> None:
    """The e4e encoder (256 px photos to W+) and CLIP's text tower at batch 1 and 8, median ms."""
    import torch

    from cfdeploy.checkpoints import load_e4e
    from cfdeploy.models.clip_text import ClipText
    from cfdeploy.samples import official as synthetic_files

    batches, runs = ((1, 2), 1) if DRY else ((1, 8), 10)
    figures: dict = {"device": args.device}
    path = args.results / "logs" / "e4e.pt"
    torch.save(synthetic_files.e4e_checkpoint(seed=0, size=DRY_E4E_SIZE if DRY else 1024), path)
    encoder = load_e4e(path).encoder.eval().to(args.device)
    path.unlink()
    clip = ClipText.random(seed=0).eval().to(args.device)
    with torch.inference_mode():
        for batch in batches:
            photos = torch.randn(batch, 3, 256, 256, device=args.device)
            tokens = torch.randint(1, 49000, (batch, 77), device=args.device)

            def run_encoder(photos=photos):
                return encoder(photos)

            def run_clip(tokens=tokens):
                return clip(tokens)

            timed(run_encoder, 1, args.device)  # warm-up
            timed(run_clip, 1, args.device)
            figures[f"e4e_ms batch {batch}"] = 1000 * timed(run_encoder, runs, args.device)
            figures[f"clip_text_ms batch {batch}"] = 1000 * timed(run_clip, runs, args.device)
    write(args.results, "encoder_clip", figures)


def synthetic_checkpoint(scratch: Path, size: int, with_visual: bool = False) -> tuple[Path, Path]:
    from cfdeploy.demo import save_synthetic_files

    directory = scratch / f"synthetic_{size}{'_visual' if with_visual else ''}"
    return save_synthetic_files(directory, size, with_visual=with_visual)


def cfdeploy(*arguments: object) -> None:
    subprocess.run([sys.executable, "-m", "cfdeploy", *(str(argument) for argument in arguments)], check=True)


def edit(args: argparse.Namespace) -> None:
    """`cfdeploy edit --device cuda` of 32 seeded codes at 1024 px: where the time goes (PNG, host, generator)."""
    import numpy as np

    size, count = (DRY_SIZE, DRY_IMAGES) if DRY else (SIZES["edit"], 32)
    checkpoint, _ = synthetic_checkpoint(args.scratch, size)
    embedding = args.scratch / "embedding.npy"
    np.save(embedding, np.random.default_rng(0).standard_normal(512).astype(np.float32))
    out = args.scratch / "edit"
    started = time.perf_counter()
    cfdeploy(
        "edit",
        "-c",
        checkpoint,
        "--text-embedding",
        embedding,
        "--seed",
        0,
        "--num",
        count,
        "--batch-size",
        min(count, 8),
        "--device",
        args.device,
        "-o",
        out,
        "--force",
    )
    wall = time.perf_counter() - started
    summary = json.loads((out / "edit.json").read_text())
    timings = summary["timings_s"]
    write(
        args.results,
        "edit_e2e",
        {
            "size": size,
            "images": count,
            "device": args.device,
            "command_wall_s": wall,
            "edit_total_s": summary["total_s"],
            "timings_s": timings,
            "png_share": timings.get("png", 0.0) / summary["total_s"],
            "outside_the_edit_s": wall - summary["total_s"],
        },
    )


def refine(args: argparse.Namespace) -> None:
    """One refinement run (CLIP-NCE steps on W+) through `cfdeploy edit --refine-steps`."""
    size, steps = (DRY_SIZE, 1) if DRY else (1024, 10)
    checkpoint, clip = synthetic_checkpoint(args.scratch, size, with_visual=True)
    out = args.scratch / "refine"
    cfdeploy(
        "edit",
        "-c",
        checkpoint,
        "--clip-weights",
        clip,
        "--text",
        "green lipstick",
        "--seed",
        0,
        "--num",
        1,
        "--refine-steps",
        steps,
        "--device",
        args.device,
        "-o",
        out,
        "--force",
    )
    summary = json.loads((out / "edit.json").read_text())
    write(
        args.results,
        "refine",
        {
            "size": size,
            "steps": steps,
            "device": args.device,
            "timings_s": summary["timings_s"],
            "total_s": summary["total_s"],
        },
    )


def train(args: argparse.Namespace) -> None:
    """benchmarks/train_step.py for one configuration (official settings, synthetic files)."""
    size = DRY_SIZE if DRY else SIZES["train"]
    cache = args.scratch / "train_cache"
    steps = ["--warmup", "0", "--steps", "1"] if DRY else ["--warmup", "1", "--steps", "3"]
    if DRY:  # one image, one warp: CLIP's and ArcFace's fixed sizes are most of the step
        steps += ["--batch-size", "1", "--augmentations", "1"]
        if args.precision != "fp32":  # bf16 matrix products are emulated, several times slower, on CPUs without AMX
            steps.append("--no-frozen-losses")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "train_step.py"),
            "--cache",
            str(cache),
            *steps,
            "--one",
            str(size),
            args.device,
            args.precision,
        ],
        capture_output=True,
        text=True,
    )
    sys.stderr.write(done.stderr[-3000:])
    done.check_returncode()
    write(args.results, f"train_{args.precision}", json.loads(done.stdout.strip().splitlines()[-1]))


def dac(args: argparse.Namespace) -> None:
    """A DAC run (one abduction step each) on random weights, then a 30-step sample (31 UNet calls) on the device."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dac import PROMPT, TARGET, prepare

    shape, steps = ("tiny", 2) if DRY else ("sd-2-1-base", 30)
    cache = args.scratch / "dac"
    started = time.perf_counter()
    base, image = prepare(cache, shape)
    from cfdeploy.dac.synthetic import SHAPES

    figures: dict = {"shape": shape, "device": args.device, "random_weights_s": time.perf_counter() - started}
    run, out = cache / "run", cache / "edit"
    started = time.perf_counter()
    cfdeploy(
        "dac",
        "abduct",
        "-i",
        image,
        "-p",
        PROMPT,
        "-t",
        TARGET,
        "-b",
        base,
        "-o",
        run,
        "--unet-steps",
        1,
        "--text-steps",
        1,
        "--resolution",
        SHAPES[shape]["image_size"],
        "--device",
        args.device,
        "--force",
    )
    figures["abduct_1_and_1_steps_s"] = time.perf_counter() - started
    started = time.perf_counter()
    cfdeploy(
        "dac", "edit", run, "-o", out, "--steps", steps, "--seed", 0, "--samples", 1, "--device", args.device, "--force"
    )
    figures["sample_command_s"] = time.perf_counter() - started
    figures["steps"] = steps
    summary = json.loads((out / "edit.json").read_text())
    figures["seconds_per_sample"] = summary.get("seconds_per_sample")
    write(args.results, "dac", figures)


def summary(args: argparse.Namespace) -> None:
    records = [json.loads(line) for line in (args.results / "steps.jsonl").read_text().splitlines() if line.strip()]
    steps = list({record["step"]: record for record in records}.values())  # a rerun's record replaces the first
    report = {
        "total_s": round(time.time() - args.started, 1),
        "dry_run": DRY,
        "steps": steps,
        "failed": [step["step"] for step in steps if not step["ok"]],
    }
    (args.results / "run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{len(steps) - len(report['failed'])}/{len(steps)} steps ok in {report['total_s']}s"
        + (f"; failed: {', '.join(report['failed'])}" if report["failed"] else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "step",
        choices=["install", "environment", "backends", "encoder-clip", "edit", "refine", "train", "dac", "summary"],
    )
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--wheels", type=Path)
    parser.add_argument("--site", type=Path)
    parser.add_argument("--scratch", type=Path)
    parser.add_argument("--size", type=int)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--started", type=float)
    args = parser.parse_args()
    {
        "install": install,
        "environment": environment,
        "backends": backends,
        "encoder-clip": encoder_clip,
        "edit": edit,
        "refine": refine,
        "train": train,
        "dac": dac,
        "summary": summary,
    }[args.step](args)


if __name__ == "__main__":
    main()
