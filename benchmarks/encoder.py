"""The e4e encoder on CPU: ONNX Runtime against the official formulation in PyTorch, and photo → edited PNG.

Synthetic weights in the official formats at full size: a 1024 px CF-CLIP checkpoint and CLIP weights
(`cfdeploy.demo`, as `cfdeploy bench --synthetic` writes them) and an e4e checkpoint for 1024 px
(`tests/synthetic_files.py`, the builder the tests use) whose generator is the CF-CLIP checkpoint's, as
when both come from the same FFHQ StyleGAN2 (no generator-mismatch check runs). They are exported into
one bundle with the encoder graph, kept in --cache between runs (the export of the 1 GB encoder graph
takes minutes).

(a) The encoder, aligned faces [B, 3, 256, 256] in [-1, 1] to W+ codes, at batch 1 and 8: the bundle's
    encoder graph on ONNX Runtime against the official formulation in PyTorch
    (`cfdeploy.models.reference.e4e` under `torch.no_grad`, as the official inference script runs it)
    and cfdeploy's torch model. Each runs in its own process (no runtime's thread pool competes with
    another's), driven in turn, the order rotating each round: medians of --runs rounds after
    --warmup, and ratios from the same run. Target: ONNX Runtime at least 1.5x faster than the official
    formulation at both batch sizes.
(b) Photo → edited PNG at 1024 px with ONNX Runtime: `cfdeploy edit --bundle B --images photo.jpg
    --landmarks points.json --text-embedding t.npy --out DIR` in a fresh process (wall time, median of
    --e2e-runs) at --png-compression 1 and 6, with the stage split its edit.json records; and the same
    library calls in one process whose sessions are loaded (a server's latency). Target: under 3 s.
The photo is a synthetic 1024 px JPEG whose face sits at `cfdeploy.bench.CENTRED_FACE`; (c) times the
alignment there and for a close-up whose crop leaves the photo (the blurred-padding path).

Run by hand (about 15 minutes on 2 cores, plus the export on the first run; --size 64 is a quick check):

    python benchmarks/encoder.py --cache /tmp/cfdeploy-encoder-bench
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cfdeploy.bench import CENTRED_FACE, prepare_sources, synthetic_photo
from cfdeploy.environment import machine_info

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 8)
OFFICIAL, TORCH, ONNXRUNTIME = (
    "official formulation (PyTorch)",
    "cfdeploy model (PyTorch)",
    "ONNX Runtime (bundle graph)",
)
CONTENDERS = (OFFICIAL, TORCH, ONNXRUNTIME)
COMPRESSIONS = (1, 6)
# A close-up: eyes 256 px apart, so the crop's square (4x that) leaves the photo and alignment pads it.
CLOSE_UP_FACE = np.array([[384.0, 440.0], [640.0, 440.0], [512.0, 568.0], [410.0, 670.0], [614.0, 670.0]])
E2E_STAGES = ("align", "encoder", "text_mapper", "latent_editor", "generator", "png")
ENCODER_TARGET, E2E_TARGET_S = 1.5, 3.0


@dataclass
class Files:
    checkpoint: Path
    clip_weights: Path
    encoder: Path
    bundle: Path


def prepare_files(cache: Path, size: int) -> Files:
    """The synthetic files and the bundle for ``size`` px, written into ``cache`` unless a previous run left them there."""
    directory = cache / f"{size}px"
    files = Files(
        directory / f"synthetic_{size}.pt",
        directory / "synthetic_clip_text.pt",
        directory / f"e4e_{size}.pt",
        directory / "bundle",
    )  # where prepare_sources exports it
    if (files.bundle / "manifest.json").is_file():
        print(f"reusing {directory}")
        return files
    import torch

    from cfdeploy.demo import save_synthetic_files
    from cfdeploy.samples import official as synthetic_files

    print(f"writing synthetic {size} px files into {directory}")
    save_synthetic_files(directory, size)
    e4e = synthetic_files.e4e_checkpoint(seed=0, size=size)
    generator = {
        key: value
        for key, value in torch.load(files.checkpoint, weights_only=True)["state_dict"].items()
        if key.startswith("decoder.")
    }
    assert generator.keys() == {key for key in e4e["state_dict"] if key.startswith("decoder.")}
    e4e["state_dict"].update(generator)
    torch.save(e4e, files.encoder)
    del e4e, generator
    prepare_sources(
        directory,
        checkpoint=files.checkpoint,
        clip_weights=files.clip_weights,
        encoder=files.encoder,
        on_progress=print,
    )
    return files


def official_encoder(files: Files) -> Callable[[np.ndarray], np.ndarray]:
    """The official computation on the file's ``encoder.*`` weights, plus ``latent_avg`` (``start_from_latent_avg``)."""
    import torch

    from cfdeploy.models import reference

    content = torch.load(files.encoder, weights_only=True)  # written by this script
    assert content["opts"]["start_from_latent_avg"]
    state = {
        key.removeprefix("encoder."): value
        for key, value in content["state_dict"].items()
        if key.startswith("encoder.")
    }
    latent_avg = content["latent_avg"]

    def encode(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return reference.e4e(state, torch.from_numpy(images), latent_avg).numpy()

    return encode


def open_contender(
    name: str, files: Files, threads: int | None
) -> tuple[Callable[[np.ndarray], np.ndarray], Any, dict]:
    """The contender's encode function, the backend behind it (None for the official one), and its thread counts."""
    if name == ONNXRUNTIME:
        from cfdeploy.backends import open_backend

        backend = open_backend("onnxruntime", files.bundle, providers=["CPUExecutionProvider"], threads=threads)
        return backend.encode, backend, {"onnxruntime_intra_op": backend.options.intra_op_num_threads}
    import torch

    if threads:
        torch.set_num_threads(threads)
    if name == OFFICIAL:
        return official_encoder(files), None, {"torch_intra_op": torch.get_num_threads()}
    from cfdeploy.photos.invert import E4EInverter

    inverter = E4EInverter(files.encoder)
    return inverter.encode, inverter, {"torch_intra_op": torch.get_num_threads()}


def photo_to_png(backend: Any, photo: Path, points: Path, features: np.ndarray, out: Path, compression: int) -> dict:
    """What `cfdeploy edit --images` runs once its backend is open: align, encode, edit, write; edit.json's content."""
    from cfdeploy.editing import EditJob, StageTimer, edit_to_directory
    from cfdeploy.outputs import StagedDirectory
    from cfdeploy.photos.invert import encode_faces, photo_faces

    timer = StageTimer()
    with timer.stage("align"):
        found = photo_faces([photo], landmarks=points).complete()
    with timer.stage("encoder"):
        codes = encode_faces(backend, found.crops, 1)
    with StagedDirectory(out, force=True) as staged:
        return edit_to_directory(
            backend,
            EditJob(codes, None, features, batch_size=1),
            staged,
            png_compression=compression,
            prior_timings=dict(timer.seconds),
        )


def serve(name: str, files: Files, threads: int | None, connection: Any) -> None:
    """A contender's process: times each request, answering ``(seconds, result)``, until it gets None."""
    encode, backend, thread_counts = open_contender(name, files, threads)
    connection.send(thread_counts)
    while (request := connection.recv()) is not None:
        kind, arguments = request
        started = time.perf_counter()
        result = encode(arguments) if kind == "encode" else photo_to_png(backend, *arguments)
        connection.send((time.perf_counter() - started, result))


class Contender:
    """One contender in its own spawned process."""

    def __init__(self, name: str, files: Files, threads: int | None) -> None:
        self.name = name
        self.connection, child = multiprocessing.get_context("spawn").Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=serve, args=(name, files, threads, child))
        self.process.start()
        self.threads = self.connection.recv()

    def time(self, kind: str, arguments: Any) -> tuple[float, Any]:
        self.connection.send((kind, arguments))
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def summary(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "samples_s": samples}


def aligned_inputs(batch: int) -> np.ndarray:
    """``batch`` aligned faces (one synthetic photo each, face at CENTRED_FACE) as encoder inputs."""
    from cfdeploy.photos import align_face, batch_inputs

    return batch_inputs([align_face(synthetic_photo(seed), CENTRED_FACE).image for seed in range(batch)])


def measure_encoders(files: Files, threads: int | None, warmup: int, runs: int) -> tuple[dict, Contender]:
    """Part (a); returns the ONNX Runtime contender still running, for part (b)'s warm runs."""
    inputs = {batch: aligned_inputs(batch) for batch in BATCHES}
    contenders = []
    for name in CONTENDERS:  # one at a time: loading 1 GB of weights is no part of the race
        print(f"opening {name}")
        contenders.append(Contender(name, files, threads))
    samples: dict[int, dict[str, list[float]]] = {batch: {name: [] for name in CONTENDERS} for batch in BATCHES}
    codes: dict[int, dict[str, np.ndarray]] = {batch: {} for batch in BATCHES}
    for round_number in range(warmup + runs):
        order = contenders[round_number % len(contenders) :] + contenders[: round_number % len(contenders)]
        for batch in BATCHES:
            for contender in order:
                seconds, codes[batch][contender.name] = contender.time("encode", inputs[batch])
                label = "warm-up" if round_number < warmup else f"run {round_number - warmup + 1}/{runs}"
                print(f"encoder, batch {batch}, {label}: {contender.name} {seconds:.2f} s")
                if round_number >= warmup:
                    samples[batch][contender.name].append(seconds)
    results = {}
    for batch in BATCHES:
        timings = {name: summary(samples[batch][name]) for name in CONTENDERS}
        official = timings[OFFICIAL]["median_s"]
        results[str(batch)] = {
            "timings": timings,
            "speedup_vs_official": {name: official / timings[name]["median_s"] for name in CONTENDERS},
            "codes_rel_l2_vs_official": {
                name: rel_l2(codes[batch][name], codes[batch][OFFICIAL]) for name in CONTENDERS
            },
        }
    threads_used = {contender.name: contender.threads for contender in contenders}
    for contender in contenders[:-1]:
        contender.close()
    return {"batches": results, "threads": threads_used}, contenders[-1]


def e2e_inputs(directory: Path) -> tuple[Path, Path, Path]:
    """A 1024 px JPEG, its face's 5 points (one entry per photo) and a text embedding."""
    photo, points, embedding = directory / "photo.jpg", directory / "points.json", directory / "t.npy"
    synthetic_photo(0).save(photo, quality=90)
    points.write_text(json.dumps([CENTRED_FACE.tolist()]))
    np.save(embedding, np.random.default_rng(0).standard_normal(512).astype(np.float32))
    return photo, points, embedding


def stage_split(summaries: list[dict]) -> dict:
    return {stage: statistics.median(s["timings_s"].get(stage, 0.0) for s in summaries) for stage in E2E_STAGES}


def measure_e2e(files: Files, onnxruntime: Contender, directory: Path, runs: int) -> dict:
    """Part (b): warm in the contender's process (one warm-up first), then each run in a fresh `cfdeploy edit`."""
    photo, points, embedding = e2e_inputs(directory)
    features = np.load(embedding)[None]
    warm: dict[int, list[tuple[float, dict]]] = {compression: [] for compression in COMPRESSIONS}
    for round_number in range(1 + runs):
        for compression in COMPRESSIONS:
            seconds, edited = onnxruntime.time("e2e", (photo, points, features, directory / "warm", compression))
            print(f"photo → PNG in process, --png-compression {compression}: {seconds:.2f} s")
            if round_number:
                warm[compression].append((seconds, edited))
    onnxruntime.close()
    cold: dict[int, list[tuple[float, dict]]] = {compression: [] for compression in COMPRESSIONS}
    for _ in range(runs):
        for compression in COMPRESSIONS:
            out = directory / f"cold_{compression}"
            command = [
                sys.executable,
                "-m",
                "cfdeploy",
                "edit",
                "--bundle",
                str(files.bundle),
                "--images",
                str(photo),
                "--landmarks",
                str(points),
                "--text-embedding",
                str(embedding),
                "--out",
                str(out),
                "--force",
                "--png-compression",
                str(compression),
            ]
            started = time.perf_counter()
            completed = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if completed.returncode != 0 or "warning" in completed.stderr.lower():
                raise SystemExit(f"{' '.join(command)}\n{completed.stderr}")
            print(f"photo → PNG, fresh `cfdeploy edit`, --png-compression {compression}: {seconds:.2f} s")
            cold[compression].append((seconds, json.loads((out / "edit.json").read_text())))
    return {
        mode: {
            str(compression): {
                **summary([seconds for seconds, _ in measured[compression]]),
                "stages_median_s": stage_split([edited for _, edited in measured[compression]]),
            }
            for compression in COMPRESSIONS
        }
        for mode, measured in (("fresh_process", cold), ("warm_process", warm))
    }


def measure_alignment(runs: int) -> dict:
    """Part (c): align_face on the 1024 px photo, its common path against a close-up's padding path."""
    from cfdeploy.photos import align_face

    photo = synthetic_photo(0)
    faces = {"centred face (bench)": CENTRED_FACE, "close-up (padded)": CLOSE_UP_FACE}
    samples: dict[str, list[float]] = {name: [] for name in faces}
    for _ in range(runs):
        for name, points in faces.items():
            started = time.perf_counter()
            align_face(photo, points)
            samples[name].append(time.perf_counter() - started)
    return {name: summary(values) for name, values in samples.items()}


def render(report: dict) -> str:
    encoder, e2e, align = report["encoder"], report["photo_to_png"], report["align"]
    size, runs, e2e_runs = report["settings"]["size"], report["settings"]["runs"], report["settings"]["e2e_runs"]
    lines = [
        f"**e4e encoder for {size} px, fp32 CPU**: seconds per batch, median of {runs} alternating rounds; intra-op "
        "threads "
        + ", ".join(
            f"{runtime} {count}"
            for runtime, count in sorted({item for counts in encoder["threads"].values() for item in counts.items()})
        ),
        "",
        "| batch | "
        + " | ".join(f"{name} (s)" for name in CONTENDERS)
        + f" | ONNX Runtime vs official (target ≥ {ENCODER_TARGET}x) | cfdeploy torch vs official"
        + " | codes rel L2 vs official (ORT) |",
        "| ---: |" + " ---: |" * (len(CONTENDERS) + 3),
    ]
    for batch, result in encoder["batches"].items():
        timings, speedup = result["timings"], result["speedup_vs_official"]
        lines.append(
            f"| {batch} | "
            + " | ".join(f"{timings[name]['median_s']:.2f}" for name in CONTENDERS)
            + f" | {speedup[ONNXRUNTIME]:.2f}x | {speedup[TORCH]:.2f}x"
            + f" | {result['codes_rel_l2_vs_official'][ONNXRUNTIME]:.1e} |"
        )
    lines += [
        "",
        f"**Photo → edited PNG, {size} px, ONNX Runtime, {report['machine']['logical_cpus']} CPU cores** "
        f"(target < {E2E_TARGET_S:.0f} s): median of {e2e_runs}; stages from edit.json "
        "(a fresh process's first runs include creating the ONNX Runtime sessions)",
        "",
        "| run | --png-compression | wall (s) | " + " | ".join(E2E_STAGES) + " | outside the stages |",
        "| --- | ---: | ---: |" + " ---: |" * (len(E2E_STAGES) + 1),
    ]
    modes = (("fresh_process", "fresh `cfdeploy edit` process"), ("warm_process", "in a process with sessions loaded"))
    for mode, label in modes:
        for compression, result in e2e[mode].items():
            stages = result["stages_median_s"]
            lines.append(
                f"| {label} | {compression} | {result['median_s']:.2f} | "
                + " | ".join(f"{stages[stage]:.2f}" for stage in E2E_STAGES)
                + f" | {result['median_s'] - sum(stages.values()):.2f} |"
            )
    lines += [
        "",
        f"**align_face, 1024 px photo**, median of {runs}: "
        + "; ".join(f"{name} {1000 * result['median_s']:.0f} ms" for name, result in align.items()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="keep the synthetic files and the bundle here between runs")
    parser.add_argument("--size", type=int, default=1024, help="generator size (1024: the official e4e)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds of the encoders (each batch size)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--e2e-runs", type=int, default=3, help="photo → PNG runs per --png-compression and mode")
    parser.add_argument("--threads", type=int, help="intra-op threads for every runtime (default: each runtime's own)")
    parser.add_argument("--json", type=Path, default=RESULTS / "encoder.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cfdeploy-encoder-bench-") as scratch:
        cache = args.cache or Path(scratch) / "files"
        cache.mkdir(parents=True, exist_ok=True)
        files = prepare_files(cache, args.size)
        align = measure_alignment(args.runs)
        encoder, onnxruntime = measure_encoders(files, args.threads, args.warmup, args.runs)
        e2e = measure_e2e(files, onnxruntime, Path(scratch), args.e2e_runs)
    settings = {
        "size": args.size,
        "batches": list(BATCHES),
        "runs": args.runs,
        "warmup": args.warmup,
        "e2e_runs": args.e2e_runs,
        "threads": args.threads,
    }
    report = {"machine": machine_info(), "settings": settings, "encoder": encoder, "photo_to_png": e2e, "align": align}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
