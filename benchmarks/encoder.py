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
(d) Cold start: a 2 MP JPEG (1600x1200, one face, found through --landmarks points.json) → the edited photo
    (JPEG) in fresh `cfdeploy edit` processes, three modes in rotation for --e2e-runs rounds: the compiled-graph
    cache empty (`$CFDEPLOY_CACHE_DIR` a fresh empty directory each round: the run that fills it), the cache
    filled (a second process on the directory the first one filled) and no cache (`--no-session-cache`); wall
    times, the stage split edit.json records, and its `runtime.session_cache` checked (misses, hits, off).
    Target at 1024 px: the second process ≤ 4 s on 2 cores, the first no slower than without the cache.

Run by hand (about 15 minutes on 2 cores, plus the export on the first run; --size 64 is a quick check):

    python benchmarks/encoder.py --cache /tmp/cfdeploy-encoder-bench
    python benchmarks/encoder.py --cache /tmp/cfdeploy-encoder-bench --parts cold-start   # (d) alone
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
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

from cfdeploy.bench import CENTRED_FACE, PHOTO_SIZE, prepare_sources, synthetic_photo
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
# --parts: what each part is called on the command line, and its key in the JSON
PARTS = {"encoder": "encoder", "e2e": "photo_to_png", "cold-start": "cold_start", "align": "align"}
# the settings each part's figures depend on (a partial run must not change them under a part it keeps)
PART_SETTINGS = {
    "encoder": ("size", "batches", "runs", "warmup", "threads"),
    "e2e": ("size", "e2e_runs"),
    "align": ("runs",),
    "cold-start": (),  # its settings and machine are recorded inside its own part
}
# (d): a 2 MP photo; the bench face scaled to the photo's height and centred across its width, so its alignment
# square (938 px) lies inside the photo and is not shrunk: the same alignment path as at 1024 px.
COLD_START_PHOTO = (1600, 1200)
COLD_START_MODES = {
    "cache_empty": "cache empty (first run, fills it)",
    "cache_filled": "cache filled (a second process)",
    "no_cache": "no cache (`--no-session-cache`)",
}
COLD_START_EXPECTED = {"cache_empty": "miss", "cache_filled": "hit", "no_cache": "off"}
COLD_START_TARGET_SIZE, COLD_START_TARGET_S = 1024, 4.0


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


def fresh_edit(
    files: Files,
    photo: Path,
    points: Path,
    embedding: Path,
    out: Path,
    options: list[str],
    environment: dict[str, str] | None = None,
) -> tuple[float, dict]:
    """`cfdeploy edit --images photo` on the bundle in a fresh process: its wall time and its edit.json."""
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
        *options,
    ]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - started
    if completed.returncode != 0 or "warning" in completed.stderr.lower():
        raise SystemExit(f"{' '.join(command)}\n{completed.stderr}")
    return seconds, json.loads((out / "edit.json").read_text())


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
            seconds, edited = fresh_edit(files, photo, points, embedding, out, ["--png-compression", str(compression)])
            print(f"photo → PNG, fresh `cfdeploy edit`, --png-compression {compression}: {seconds:.2f} s")
            cold[compression].append((seconds, edited))
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


def cold_start_inputs(directory: Path) -> tuple[Path, Path, Path, list[list[float]]]:
    """The 2 MP JPEG (the synthetic scene at 1600 px, cropped to 1600x1200), its face's 5 points, a text embedding.

    The face is the 1024 px photo's (CENTRED_FACE) scaled to the photo's height and centred across its width."""
    width, height = COLD_START_PHOTO
    scale = height / PHOTO_SIZE
    top = (width - height) // 2
    face = CENTRED_FACE * scale + [(width - PHOTO_SIZE * scale) / 2, 0.0]
    photo, points, embedding = directory / "photo_2mp.jpg", directory / "points_2mp.json", directory / "t.npy"
    synthetic_photo(0, width).crop((0, top, width, top + height)).save(photo, quality=90)
    points.write_text(json.dumps([face.tolist()]))
    np.save(embedding, np.random.default_rng(0).standard_normal(512).astype(np.float32))
    return photo, points, embedding, face.tolist()


def session_cache_outcomes(edited: dict) -> dict[str, str] | str | None:
    """edit.json's ``runtime.session_cache``: network → hit, miss or refused; "off" without the cache."""
    return (edited.get("runtime") or {}).get("session_cache")


def check_cache_use(mode: str, round_label: str, edited: dict) -> None:
    """Stop the run unless edit.json says the mode used the cache as it should: every network a miss (the cache
    empty), a hit (the cache filled), or the cache off (--no-session-cache)."""
    outcomes, expected = session_cache_outcomes(edited), COLD_START_EXPECTED[mode]
    if expected == "off":
        ok = outcomes == "off"
    else:
        ok = isinstance(outcomes, dict) and bool(outcomes) and set(outcomes.values()) == {expected}
    if not ok:
        wanted = "the cache off" if expected == "off" else f"every network a {expected}"
        raise SystemExit(
            f"cold start, {COLD_START_MODES[mode]}, {round_label}: edit.json's runtime.session_cache is "
            f"{outcomes!r}, expected {wanted}"
        )


def stage_names(summaries: list[dict]) -> list[str]:
    """The stages edit.json's ``timings_s`` names, in the order they first appear."""
    return list(dict.fromkeys(stage for summary in summaries for stage in summary["timings_s"]))


def measure_cold_start(files: Files, directory: Path, runs: int, size: int) -> dict:
    """Part (d): fresh `cfdeploy edit` processes on a 2 MP JPEG, cache empty / cache filled / no cache in rotation.

    One unrecorded --no-session-cache run first reads the bundle into the page cache, as the later runs find it."""
    from cfdeploy.graph_cache import CACHE_DIR_ENV

    directory = directory / "cold_start"
    directory.mkdir()
    photo, points, embedding, face = cold_start_inputs(directory)
    no_cache_root = directory / "no_cache_root"  # --no-session-cache: nothing is to be read or written here
    measured: dict[str, list[tuple[float, dict]]] = {mode: [] for mode in COLD_START_MODES}

    def edit(mode: str, cache_root: Path, round_label: str) -> tuple[float, dict]:
        out = directory / f"out_{mode}"
        options = ["--no-session-cache"] if mode == "no_cache" else []
        environment = {**os.environ, CACHE_DIR_ENV: str(cache_root)}
        seconds, edited = fresh_edit(files, photo, points, embedding, out, options, environment)
        check_cache_use(mode, round_label, edited)
        written = out / photo.name
        if not written.is_file() or written.read_bytes()[:3] != b"\xff\xd8\xff":
            raise SystemExit(f"cold start, {COLD_START_MODES[mode]}: no JPEG photo at {written}")
        print(f"cold start, 2 MP JPEG → edited JPEG, {COLD_START_MODES[mode]}, {round_label}: {seconds:.2f} s")
        return seconds, edited

    edit("no_cache", no_cache_root, "warm-up")
    for round_number in range(runs):
        cache_root = directory / f"cache_{round_number}"
        cache_root.mkdir()  # empty: this round's first run fills it, its second reads it
        order = [("cache_empty", cache_root), ("cache_filled", cache_root)]
        order = (
            order + [("no_cache", no_cache_root)] if round_number % 2 == 0 else [("no_cache", no_cache_root), *order]
        )
        for mode, root in order:
            measured[mode].append(edit(mode, root, f"run {round_number + 1}/{runs}"))
        shutil.rmtree(cache_root)  # at 1024 px an entry holds the encoder's re-laid-out GB
    if (no_cache_root / "graphs").exists():
        raise SystemExit(f"cold start: --no-session-cache wrote compiled graphs into {no_cache_root / 'graphs'}")
    summaries = [edited for runs_of_mode in measured.values() for _, edited in runs_of_mode]
    stages = stage_names(summaries)
    modes = {}
    for mode, results in measured.items():
        edits = [edited for _, edited in results]
        modes[mode] = {
            **summary([seconds for seconds, _ in results]),
            "stages_median_s": {
                stage: statistics.median(edited["timings_s"].get(stage, 0.0) for edited in edits) for stage in stages
            },
            "session_cache": [session_cache_outcomes(edited) for edited in edits],
        }
    filled, empty, none = (modes[mode]["median_s"] for mode in ("cache_filled", "cache_empty", "no_cache"))
    return {
        "machine": machine_info(),
        "size": size,
        "runs": runs,
        "photo": {
            "width": COLD_START_PHOTO[0],
            "height": COLD_START_PHOTO[1],
            "format": "JPEG",
            "jpeg_quality": 90,
            "faces": 1,
            "landmarks": face,
        },
        "output": "JPEG (the photo, the face edited and pasted back)",
        "backend": sorted({edited["backend"] for edited in summaries}),
        "stages": stages,
        "modes": modes,
        "target": {
            "size": COLD_START_TARGET_SIZE,
            "cache_filled_max_s": COLD_START_TARGET_S,
            "cache_filled_met": filled <= COLD_START_TARGET_S,
            "cache_empty_over_no_cache": empty / none,
            "cache_empty_met": empty <= none,
        },
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


def render_encoder(report: dict) -> list[str]:
    encoder, size, runs = report["encoder"], report["settings"]["size"], report["settings"]["runs"]
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
    return lines


def render_e2e(report: dict) -> list[str]:
    e2e, size, e2e_runs = report["photo_to_png"], report["settings"]["size"], report["settings"]["e2e_runs"]
    lines = [
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
    return lines


def render_align(report: dict) -> list[str]:
    return [
        f"**align_face, 1024 px photo**, median of {report['settings']['runs']}: "
        + "; ".join(f"{name} {1000 * result['median_s']:.0f} ms" for name, result in report["align"].items()),
    ]


def met(condition: bool) -> str:
    return "**met**" if condition else "**not met**"


def render_cold_start(report: dict) -> str:
    """Part (d)'s table, or a line saying it has not been measured yet."""
    part = report.get("cold_start")
    if part is None:
        return (
            "**Photo cold start: not measured yet** (`python benchmarks/encoder.py --parts cold-start --cache DIR` "
            "adds it to `benchmarks/results/encoder.json`)."
        )
    modes, stages, target = part["modes"], part["stages"], part["target"]
    photo, machine = part["photo"], part["machine"]
    cpus = f"{machine['logical_cpus']} CPU cores" if machine.get("logical_cpus") else "CPU cores not recorded"
    size, target_size = part["size"], target["size"]
    ratio = modes["cache_empty"]["median_s"] / modes["no_cache"]["median_s"]
    limit = target["cache_filled_max_s"]
    verdicts = {
        "cache_empty": f"no slower than no cache: {ratio:.2f}x, {met(ratio <= 1)}",
        "cache_filled": f"≤ {limit:.0f} s: {met(modes['cache_filled']['median_s'] <= limit)}",
        "no_cache": "",
    }
    lines = [
        f"**Photo cold start: a {photo['width'] * photo['height'] / 1e6:.1f} MP JPEG ({photo['width']}×{photo['height']}, "
        f"{photo['faces']} face) → the edited photo (JPEG), {size} px, {', '.join(part['backend'])}, {cpus}**, "
        f"fresh `cfdeploy edit` processes: wall time, median of {part['runs']} round{'s' * (part['runs'] != 1)}, "
        "and the stages edit.json records "
        "(each network's session is created, or loaded from the compiled-graph cache, in the first stage that runs "
        "it). Target at "
        f"{target_size} px: the second process ≤ {target['cache_filled_max_s']:.0f} s on 2 cores, the first "
        "(cache-filling) one no slower than without the cache"
        + ("." if size == target_size else f"; this run is at {size} px, so its verdicts only indicate."),
        "",
        "| process | graph cache (edit.json) | wall (s) | " + " | ".join(stages) + " | outside the stages | target |",
        "| --- | --- | ---: |" + " ---: |" * (len(stages) + 1) + " --- |",
    ]
    for mode, label in COLD_START_MODES.items():
        result = modes[mode]
        split = result["stages_median_s"]
        outcomes = sorted(
            {
                value
                for record in result["session_cache"]
                for value in (record.values() if isinstance(record, dict) else [record])
            }
        )
        lines.append(
            f"| {label} | {', '.join(outcomes)} | {result['median_s']:.2f} | "
            + " | ".join(f"{split.get(stage, 0.0):.2f}" for stage in stages)
            + f" | {result['median_s'] - sum(split.values()):.2f} | {verdicts[mode]} |"
        )
    return "\n".join(lines)


def render(report: dict, cold_start: bool = True) -> str:
    """The tables of the parts the report holds; ``cold_start=False`` leaves part (d) out (the docs show it apart)."""
    blocks = [
        renderer(report)
        for key, renderer in (("encoder", render_encoder), ("photo_to_png", render_e2e), ("align", render_align))
        if key in report
    ]
    if cold_start:
        blocks.append(render_cold_start(report).splitlines())
    return "\n\n".join("\n".join(block) for block in blocks)


def parse_parts(value: str) -> list[str]:
    parts = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or value!r}; known: {', '.join(PARTS)}")
    return parts


def check_kept_parts(previous: dict, parts: list[str], settings: dict, json_file: Path) -> None:
    """Refuse a partial run that would change, under a part the file keeps, the top-level settings or machine that
    part was measured with (the encoder, e2e and align parts share them; the cold-start part records its own)."""
    kept = [part for part in PARTS if part not in parts and PARTS[part] in previous]
    ran = [part for part in parts if part != "cold-start"]
    if not kept or not ran:
        return
    overwritten = {key for part in ran for key in PART_SETTINGS[part]}
    before = previous.get("settings", {})
    for part in kept:
        changed = [
            key for key in PART_SETTINGS[part] if key in overwritten and key in before and before[key] != settings[key]
        ]
        if changed:
            raise SystemExit(
                f"{json_file} keeps the {part} part, measured with "
                + ", ".join(f"--{key.replace('_', '-')} {before[key]}" for key in changed)
                + ": run it too (--parts), use the same settings, or write another file (--json)"
            )
    machine, measured_on = machine_info(), previous.get("machine", {})
    if any(machine.get(key) != measured_on.get(key) for key in ("cpu", "logical_cpus")):
        raise SystemExit(
            f"{json_file} keeps the {', '.join(kept)} part(s), measured on another machine ({measured_on.get('cpu')}, "
            f"{measured_on.get('logical_cpus')} CPUs): run them too (--parts) or write another file (--json)"
        )


def merged_report(previous: dict, parts: list[str], measured: dict, settings: dict) -> dict:
    """This run's parts, and from ``previous`` (the --json file's content) every part this run did not measure;
    the top-level machine and settings are this run's where it ran the encoder, e2e or align part."""
    report = {key: value for key, value in previous.items() if key not in {PARTS[part] for part in parts}}
    ran = [part for part in parts if part != "cold-start"]
    if ran:
        report["machine"] = machine_info()
        report["settings"] = {
            **previous.get("settings", {}),
            **{key: value for key, value in settings.items() if any(key in PART_SETTINGS[part] for part in ran)},
        }
    report.update({PARTS[part]: measured[PARTS[part]] for part in parts})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="keep the synthetic files and the bundle here between runs")
    parser.add_argument("--size", type=int, default=1024, help="generator size (1024: the official e4e)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds of the encoders (each batch size)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--e2e-runs",
        type=int,
        default=3,
        help="photo → PNG runs per --png-compression and mode; cold-start rounds (each runs the three modes)",
    )
    parser.add_argument("--threads", type=int, help="intra-op threads for every runtime (default: each runtime's own)")
    parser.add_argument(
        "--parts",
        type=parse_parts,
        default=list(PARTS),
        help=f"the parts to run, comma-separated (default: all, {','.join(PARTS)}). When the --json file exists, the "
        "parts not run keep their values from it, so a partial run does not erase committed figures (a partial run "
        "that would change the settings or the machine of a part it keeps is refused)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "encoder.json")
    args = parser.parse_args()
    parts = [part for part in PARTS if part in args.parts]
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    settings = {
        "size": args.size,
        "batches": list(BATCHES),
        "runs": args.runs,
        "warmup": args.warmup,
        "e2e_runs": args.e2e_runs,
        "threads": args.threads,
    }
    check_kept_parts(previous, parts, settings, args.json)  # before minutes of measuring
    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cfdeploy-encoder-bench-") as scratch:
        cache = args.cache or Path(scratch) / "files"
        cache.mkdir(parents=True, exist_ok=True)
        files = prepare_files(cache, args.size) if set(parts) - {"align"} else None
        if "align" in parts:
            measured["align"] = measure_alignment(args.runs)
        onnxruntime = None
        if "encoder" in parts:
            assert files is not None
            measured["encoder"], onnxruntime = measure_encoders(files, args.threads, args.warmup, args.runs)
        if "e2e" in parts:
            assert files is not None
            if onnxruntime is None:
                print(f"opening {ONNXRUNTIME}")
                onnxruntime = Contender(ONNXRUNTIME, files, args.threads)
            measured["photo_to_png"] = measure_e2e(files, onnxruntime, Path(scratch), args.e2e_runs)
        elif onnxruntime is not None:
            onnxruntime.close()
        if "cold-start" in parts:
            assert files is not None
            measured["cold_start"] = measure_cold_start(files, Path(scratch), args.e2e_runs, args.size)
    report = merged_report(previous, parts, measured, settings)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
