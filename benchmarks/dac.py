"""`cfdeploy dac`: the cost of an edit, per stage and backend, on random models of the real shapes.

For each shape (``tiny``, and ``sd-2-1-base``: Stable Diffusion 2.1-base's 865.9 M-parameter UNet,
ViT-H text encoder, 512 px; random weights written once to --cache, no download), fresh processes
measure, on this machine's device (CPU fp32 here; CUDA when present):

- abduction: seconds per optimiser step of Abduction-1 (U, rank 512) and Abduction-2 (Δ, rank 4,
  through the UNet), median over --steps steps after one warm-up step, at the official settings, and
  the process's peak memory;
- prediction: one UNet call at CFG batch 2 with U exact (unmerged branches at a weight), U merged, and
  without U, in PyTorch; with --onnx also ONNX Runtime on the exported bundle (scale-input and merged);
  the VAE decode; the relative L2 between the merged and the exact UNet at γ(t) for three timesteps.

Run by hand:

    python benchmarks/dac.py --cache /tmp/cfdeploy-dac-bench --shapes tiny sd-2-1-base --onnx tiny

The table goes to stdout; the figures to benchmarks/results/dac.json. The paper's figures (A100, fp32):
6 + 9 minutes of abduction per edit (1000 + 1000 steps), 4 s per 30-step sample.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "dac.json"
PROMPT, TARGET = "A cat.", "A cat wearing a wool cap."


def peak_memory_mb(device: str) -> float:
    """The process's peak resident memory on the CPU; the peak CUDA allocation on a GPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(function: Callable[[], Any], runs: int, device: str = "cpu") -> float:
    """The median wall time of ``function``, waiting for the GPU's queued work when timing CUDA."""
    import torch

    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    samples = []
    for _ in range(runs):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def prepare(cache: Path, shape: str) -> tuple[Path, Path]:
    """The random base model of ``shape`` and a source image, written once."""
    import numpy as np
    from PIL import Image

    from cfdeploy.dac.synthetic import write_random_base_model

    base = cache / shape
    if not (base / "model_index.json").exists():
        write_random_base_model(base, shape)
    image = cache / "image.png"
    if not image.exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 640, 3), dtype=np.uint8)).save(image)
    return base, image


def abduction(cache: Path, shape: str, steps: int, device: str) -> dict[str, Any]:
    from cfdeploy.dac.abduct import AbductInputs, abduct
    from cfdeploy.dac.run import AbductSettings
    from cfdeploy.dac.synthetic import SHAPES

    base, image = prepare(cache, shape)
    times: dict[str, list[float]] = {}
    settings = AbductSettings(
        PROMPT,
        TARGET,
        unet_steps=steps + 1,
        text_steps=steps + 1,
        save_every=10**9,
        resolution=SHAPES[shape]["image_size"],
    )
    out = cache / f"run-{shape}"
    abduct(
        settings,
        AbductInputs(image, base),
        out,
        device=device,
        force=True,
        on_progress=lambda progress: times.setdefault(progress.phase, []).append(progress.step_s),
    )
    return {
        "per_step_s": {phase: statistics.median(values[1:]) for phase, values in times.items()},
        "peak_memory_mb": peak_memory_mb(device),
        "run": str(out),
    }


def prediction(cache: Path, shape: str, runs: int, device: str) -> dict[str, Any]:
    import torch

    from cfdeploy.dac import lora
    from cfdeploy.dac.base_model import inspect_base_model, load_base_model
    from cfdeploy.dac.export import merge_scale
    from cfdeploy.dac.plms import anneal
    from cfdeploy.dac.predict import load_run_adapters
    from cfdeploy.dac.run import read_run

    run = read_run(cache / f"run-{shape}")
    info = inspect_base_model(cache / shape)
    base = load_base_model(info, device)
    side = run.settings.resolution // info.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, side, side), generator=generator).to(device)
    context = torch.randn((2, 77, int(info.configs["text_encoder"]["hidden_size"])), generator=generator).to(device)
    timesteps = (958, 500, 1)

    def call(timestep: int = 500) -> torch.Tensor:
        with torch.no_grad():
            noise: torch.Tensor = base.unet(
                latents, torch.tensor([timestep], device=device), encoder_hidden_states=context
            ).sample
        return noise

    figures: dict[str, Any] = {"torch": {}}
    figures["torch"]["unet_call_s without U"] = median_time(call, runs, device)
    load_run_adapters(base, run)
    eta = run.settings.eta
    lora.set_weight(base.unet, lora.UNET_ADAPTER, anneal(500, eta))
    figures["torch"]["unet_call_s exact (U unmerged)"] = median_time(call, runs, device)
    exact = []
    for timestep in timesteps:
        lora.set_weight(base.unet, lora.UNET_ADAPTER, anneal(timestep, eta))
        exact.append(call(timestep))
    scale = merge_scale(eta, info.configs["scheduler"])
    for layer in lora.lora_layers(base.unet, lora.UNET_ADAPTER).values():
        layer.set_scale(lora.UNET_ADAPTER, scale)
        layer.merge(adapter_names=[lora.UNET_ADAPTER])
    figures["torch"]["unet_call_s merged"] = median_time(call, runs, device)
    figures["merged_vs_exact_rel_l2"] = max(
        float((call(t) - e).norm() / e.norm()) for t, e in zip(timesteps, exact, strict=True)
    )
    with torch.no_grad():
        figures["torch"]["vae_decode_s"] = median_time(
            lambda: base.vae.decode(latents[:1] / info.scaling_factor), runs, device
        )
    figures["peak_memory_mb"] = peak_memory_mb(device)
    return figures


def onnx_prediction(cache: Path, shape: str, runs: int) -> dict[str, Any]:
    """Export the run both ways (in this process alone: a full-size export needs the memory) and time ONNX Runtime."""
    import numpy as np
    import onnxruntime

    from cfdeploy.dac.bundle import DacBundle
    from cfdeploy.dac.export import export_dac_bundle
    from cfdeploy.dac.plms import anneal

    figures: dict[str, Any] = {}
    for mode in ("scale-input", "merged"):
        bundle = cache / f"bundle-{shape}-{mode}"
        if not (bundle / "manifest.json").exists():
            started = time.perf_counter()
            export_dac_bundle(cache / f"run-{shape}", bundle, unet_mode=mode, force=True)
            figures[f"export_s {mode}"] = time.perf_counter() - started
        opened = DacBundle(bundle)
        figures[f"parity {mode}"] = opened.manifest["parity"]
        channels, side, _ = opened.latent_shape
        rng = np.random.default_rng(0)
        latents = rng.standard_normal((2, channels, side, side), dtype=np.float32)
        context = opened.array("edit_embeddings.npy")
        eta = opened.settings.eta
        session = onnxruntime.InferenceSession(str(bundle / "unet.onnx"), providers=["CPUExecutionProvider"])
        feed = {"sample": latents, "timestep": np.array([500], np.float32), "encoder_hidden_states": context}
        if mode == "scale-input":
            feed["lora_scale"] = np.array([anneal(500, eta)], np.float32)
        session.run(None, feed)
        figures[f"unet_call_s {mode}"] = median_time(lambda session=session, feed=feed: session.run(None, feed), runs)
    return figures


def child(kind: str, cache: Path, shape: str, steps: int, device: str) -> dict[str, Any]:
    process = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--cache",
            str(cache),
            "--shapes",
            shape,
            "--steps",
            str(steps),
            "--device",
            device,
        ],
        capture_output=True,
        text=True,
    )
    if process.returncode != 0:
        raise SystemExit(f"{kind} on {shape} failed:\n{process.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(process.stdout.strip().splitlines()[-1])
    return result


def table(results: dict[str, Any], device: str) -> str:
    memory = "CUDA allocated" if device.startswith("cuda") else "resident"
    lines = ["| shape | stage | PyTorch | ONNX Runtime |", "| --- | --- | ---: | ---: |"]
    for shape, figures in results.items():
        steps = figures["abduction"]["per_step_s"]
        for phase, seconds in steps.items():
            lines.append(f"| {shape} | {phase}: s/step | {seconds:.3f} | |")
        torch_figures, onnx_figures = figures["prediction"]["torch"], figures.get("onnxruntime", {})
        for label, torch_key, onnx_key in (
            ("UNet call, U exact (γ(t) input)", "unet_call_s exact (U unmerged)", "unet_call_s scale-input"),
            ("UNet call, U merged", "unet_call_s merged", "unet_call_s merged"),
            ("UNet call, no U", "unet_call_s without U", None),
            ("VAE decode", "vae_decode_s", None),
        ):
            onnx_value = f"{onnx_figures[onnx_key]:.3f}" if onnx_key and onnx_key in onnx_figures else ""
            lines.append(f"| {shape} | {label}: s | {torch_figures[torch_key]:.3f} | {onnx_value} |")
        exact = torch_figures["unet_call_s exact (U unmerged)"]
        lines.append(
            f"| {shape} | 30-step sample (31 exact calls + decode): s | {31 * exact + torch_figures['vae_decode_s']:.1f} | |"
        )
        lines.append(
            f"| {shape} | merged vs exact UNet output: rel L2 | {figures['prediction']['merged_vs_exact_rel_l2']:.2e} | |"
        )
        for mode in ("scale-input", "merged"):
            if f"parity {mode}" in onnx_figures:
                parity = onnx_figures[f"parity {mode}"]
                exported = onnx_figures.get(f"export_s {mode}")
                took = f"export {exported:.0f} s; " if exported is not None else ""
                lines.append(
                    f"| {shape} | {mode} bundle: {took}ONNX Runtime vs PyTorch rel L2, text / UNet / VAE | | "
                    f"{parity['text_encoder']['rel_l2']:.1e} / {parity['unet']['rel_l2']:.1e} / "
                    f"{parity['vae_decoder']['rel_l2']:.1e} |"
                )
        lines.append(
            f"| {shape} | peak memory ({memory}), abduction / prediction: MB | "
            f"{figures['abduction']['peak_memory_mb']:.0f} / {figures['prediction']['peak_memory_mb']:.0f} | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="Where the random models, runs and bundles are kept.")
    parser.add_argument("--shapes", nargs="+", default=["tiny", "sd-2-1-base"])
    parser.add_argument("--onnx", nargs="*", default=["tiny"], help="Shapes also exported and timed in ONNX Runtime.")
    parser.add_argument("--steps", type=int, default=3, help="Timed abduction steps (and UNet calls) per figure.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["abduction", "prediction", "onnxruntime"], help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    arguments.cache.mkdir(parents=True, exist_ok=True)
    if arguments.child:
        shape = arguments.shapes[0]
        if arguments.child == "abduction":
            result = abduction(arguments.cache, shape, arguments.steps, arguments.device)
        elif arguments.child == "prediction":
            result = prediction(arguments.cache, shape, arguments.steps, arguments.device)
        else:
            result = onnx_prediction(arguments.cache, shape, arguments.steps)
        print(json.dumps(result))
        return
    import torch

    results = {}
    for shape in arguments.shapes:
        print(f"{shape}: abduction ...", file=sys.stderr)
        figures = {"abduction": child("abduction", arguments.cache, shape, arguments.steps, arguments.device)}
        print(f"{shape}: prediction ...", file=sys.stderr)
        figures["prediction"] = child("prediction", arguments.cache, shape, arguments.steps, arguments.device)
        if shape in arguments.onnx:
            print(f"{shape}: export and ONNX Runtime ...", file=sys.stderr)
            figures["onnxruntime"] = child("onnxruntime", arguments.cache, shape, arguments.steps, "cpu")
        results[shape] = figures
    print(table(results, arguments.device))
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "device": arguments.device,
        },
        "steps": arguments.steps,
        "results": results,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
