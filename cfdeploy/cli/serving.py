"""``cfdeploy serve`` and ``cfdeploy batch``: bundles behind HTTP, and datasets of latents, on Ray (the ``serve`` extra)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from cfdeploy.cli.common import (
    POSITIONAL_ARTIFACT,
    PRECISION_CHOICES,
    Precision,
    app,
    artifact,
    fail,
    no_session_cache_option,
    phase,
    positional,
    precision_among,
    progress_bar,
    retired,
    say,
    session_cache_option,
    user_errors,
    warn,
)
from cfdeploy.editing import DEFAULT_BATCH_SIZE

CLUSTER, BATCHING, RESOURCES = "Cluster", "Batching and limits", "Resources per replica or worker"
DEFAULT_SERVED_BATCH = 8


class ServedBackend(str, Enum):
    onnxruntime = "onnxruntime"
    openvino = "openvino"
    tensorrt = "tensorrt"


RAY_ADDRESS = typer.Option(
    None,
    "--ray-address",
    metavar="ADDRESS",
    rich_help_panel=CLUSTER,
    help="Join a running Ray cluster (`auto`, or host:port). \\[default: start a local one]",
)
BACKEND = typer.Option(
    ServedBackend.onnxruntime,
    "--backend",
    metavar="NAME",
    rich_help_panel=RESOURCES,
    help="Runtime in each replica or worker: onnxruntime, openvino or tensorrt (tensorrt needs --gpus-per-replica / "
    "--gpus-per-worker).",
)
PRECISION = typer.Option(
    None,
    "--precision",
    metavar=PRECISION_CHOICES,
    rich_help_panel=RESOURCES,
    help="openvino: bf16 for the generator and encoder, on CPUs with AMX or AVX-512 BF16. \\[default: fp32]",
)


def served_precision(backend: ServedBackend, precision: Precision | None) -> str | None:
    from cfdeploy.backends import backend_info

    return precision_among(precision, backend_info(backend.value).precisions, f"the {backend.value} backend")


@app.command("serve", context_settings=POSITIONAL_ARTIFACT)
@user_errors
def serve_command(
    context: typer.Context,
    bundle: list[Path] | None = typer.Option(
        None,
        "--bundle",
        metavar="DIR",
        help="A bundle from `cfdeploy export` (repeatable); each is served under its directory's name.",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", metavar="ADDRESS", help="Address to listen on (0.0.0.0: every interface)."
    ),
    port: int = typer.Option(8000, "--port", metavar="PORT", help="HTTP port."),
    replicas: int = typer.Option(1, "--replicas", metavar="N", rich_help_panel=RESOURCES, help="Replicas per bundle."),
    backend: ServedBackend = BACKEND,
    precision: Precision | None = PRECISION,
    no_session_cache: bool = no_session_cache_option(RESOURCES),
    cpus_per_replica: float = typer.Option(
        1.0,
        "--cpus-per-replica",
        metavar="F",
        rich_help_panel=RESOURCES,
        help="CPUs Ray reserves per replica (ONNX Runtime and OpenVINO use as many threads).",
    ),
    gpus_per_replica: float = typer.Option(
        0.0,
        "--gpus-per-replica",
        metavar="F",
        rich_help_panel=RESOURCES,
        help="GPUs per replica; fractions share one (0.5: two replicas per GPU).",
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        "-b",
        metavar="B",
        rich_help_panel=BATCHING,
        help="Most images per generator call, gathered across concurrent requests. \\[default: 8]",
    ),
    old_batch_size: int | None = typer.Option(None, "--max-batch", hidden=True),
    batch_wait_ms: float = typer.Option(
        10.0,
        "--batch-wait-ms",
        metavar="MS",
        rich_help_panel=BATCHING,
        help="How long a generator call waits for more images to join it.",
    ),
    max_ongoing: int = typer.Option(
        32,
        "--max-ongoing",
        metavar="N",
        rich_help_panel=BATCHING,
        help="Requests a replica works on at once; as many again per replica may wait, past that 503.",
    ),
    landmarks_model: Path | None = typer.Option(
        None,
        "--landmarks-model",
        metavar="FILE",
        help="dlib's shape_predictor_68_face_landmarks.dat: replicas find the faces in photos sent with "
        "return photo (the 'photos' extra). Its training data's licence excludes commercial use.",
    ),
    grace_s: float = typer.Option(
        20.0,
        "--grace-s",
        metavar="S",
        help="On Ctrl-C or SIGTERM, how long edits in flight may take to finish before the server stops.",
    ),
    verbose: bool = typer.Option(
        False, "--verbose", help="Ray's log lines on the console too. \\[default: only in Ray's log directory]"
    ),
    ray_address: str | None = RAY_ADDRESS,
) -> None:
    """Serve bundles over HTTP with dynamic batching and replicas on Ray Serve, until Ctrl-C or SIGTERM.

    POST /v1/edits (JSON: bundle, prompt or text_embedding, seed/num/truncation, latents or image, strength,
    return; with return photo, any photo comes back edited, its faces pasted back), GET /v1/bundles,
    GET /healthz. Images are the same PNG bytes `cfdeploy edit` writes.

    Example: cfdeploy serve --bundle engines/green_lipstick --replicas 2 --port 8000
    """
    from cfdeploy.errors import CfdeployError
    from cfdeploy.serving.server import Server, ServeSettings

    bundles = retired("a positional BUNDLE", positional(context), "--bundle", bundle)
    if not bundles:
        raise CfdeployError("give --bundle DIR (once per bundle to serve)")
    max_batch = retired("--max-batch", old_batch_size, "--batch-size", batch_size) or DEFAULT_SERVED_BATCH
    settings = ServeSettings(
        tuple(bundles),
        backend.value,
        replicas,
        max_batch,
        batch_wait_ms,
        max_ongoing,
        cpus_per_replica,
        gpus_per_replica,
        host,
        port,
        served_precision(backend, precision),
        session_cache_option(no_session_cache),
        landmarks_model,
        grace_s,
    )
    with terminate_as_interrupt():
        with phase("starting Ray Serve and loading the bundles"):
            server = Server(settings, ray_address, verbose=verbose)
        try:
            if server.ray_logs is not None and not verbose:
                say(f"Ray's logs: {server.ray_logs}")
            say(
                f"serving {', '.join(path.resolve().name for path in bundles)} at {server.url} "
                f"({replicas} replica(s) each, {backend.value}); Ctrl-C or SIGTERM stops"
            )
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            say(f"stopping: edits in flight have {grace_s:g} s to finish (Ctrl-C again: stop now)")
        stop_serving(server)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, Docker, Kubernetes) stops a command as Ctrl-C does, by KeyboardInterrupt in the main thread."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_serving(server: Any) -> None:
    """Drain and stop ``server``. A signal is how a server is stopped, so another one is no error either: while the
    edits in flight finish it stops at once, while Ray shuts down it leaves the rest to the reaper."""
    try:
        try:
            left = server.drain()
        except KeyboardInterrupt:
            left = None
        if left:
            warn(f"{left} edit(s) still in flight were cut off")
        server.stop(grace_s=0)
    except KeyboardInterrupt:
        say("stopped before Ray finished shutting down")
        raise typer.Exit(130) from None
    say("stopped")


@app.command("batch", context_settings=POSITIONAL_ARTIFACT)
@user_errors
def batch_command(
    context: typer.Context,
    bundle: Path | None = typer.Option(None, "--bundle", metavar="DIR", help="Bundle from `cfdeploy export`."),
    latents: str = typer.Option(
        ..., "--latents", "-l", metavar="SHARDS", help="A directory of .npy shards, or a glob ('shards/*.npy')."
    ),
    text: str | None = typer.Option(None, "--text", "-t", metavar="PROMPT", help="Prompt to edit toward."),
    text_embedding: Path | None = typer.Option(
        None,
        "--text-embedding",
        metavar="FILE",
        help=".npy of unnormalised CLIP text features [512] for every code; bypasses CLIP.",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", metavar="DIR", help="OUT/<shard>/000000.png …, latents.npy; OUT/_done/<shard>.json."
    ),
    strength: float = typer.Option(1.0, "--strength", "-s", metavar="S", help="Edit strength (1 = official)."),
    workers: int = typer.Option(
        2, "--workers", metavar="N", rich_help_panel=RESOURCES, help="Actors, each with the bundle loaded once."
    ),
    batch_size: int = typer.Option(
        DEFAULT_BATCH_SIZE,
        "--batch-size",
        "-b",
        metavar="B",
        rich_help_panel=RESOURCES,
        help="Codes per generator call.",
    ),
    backend: ServedBackend = BACKEND,
    precision: Precision | None = PRECISION,
    no_session_cache: bool = no_session_cache_option(RESOURCES),
    cpus_per_worker: float = typer.Option(
        1.0,
        "--cpus-per-worker",
        metavar="F",
        rich_help_panel=RESOURCES,
        help="CPUs Ray reserves per worker (ONNX Runtime and OpenVINO use as many threads).",
    ),
    gpus_per_worker: float = typer.Option(
        0.0, "--gpus-per-worker", metavar="F", rich_help_panel=RESOURCES, help="GPUs per worker; fractions share one."
    ),
    force: bool = typer.Option(
        False, "--force", "-f", help="Write into a DIR from another run or of other files, redoing every shard."
    ),
    ray_address: str | None = RAY_ADDRESS,
) -> None:
    """Edit every latent of a dataset of .npy shards on a Ray cluster, each image exactly once.

    Rerun the same command after an interruption: shards with a completion record are skipped,
    partial ones are redone. Each shard's images equal `cfdeploy edit` on that shard.

    Example: cfdeploy batch --bundle engines/green_lipstick --latents 'ffhq_codes/*.npy' -t "green lipstick" -o edits/
    --ray-address auto
    """
    from cfdeploy.serving.batch import BatchSettings, plan_batch, run_batch

    bundle = artifact("--bundle", bundle, context)
    settings = BatchSettings(
        bundle,
        latents,
        text,
        out,
        text_embedding,
        strength,
        backend.value,
        workers,
        batch_size,
        cpus_per_worker,
        gpus_per_worker,
        precision=served_precision(backend, precision),
        session_cache=session_cache_option(no_session_cache),
    )
    plan = plan_batch(settings, force)
    for line in plan.skipped:
        warn(line)
    for shard, reason in plan.redone.items():
        warn(f"redoing shard {shard}: {reason}")
    skipped = len(plan.shards) - len(plan.pending)
    if skipped:
        say(f"skipping {skipped} shard(s) already done")
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("shards", total=len(plan.pending))
        done = {"images": 0}

        def landed(name: str, images: int) -> None:
            done["images"] += images
            rate = done["images"] / (time.perf_counter() - started)
            progress.update(task, advance=1, description=f"shards ({done['images']} images, {rate:.1f} images/s)")

        try:
            with terminate_as_interrupt():
                summary = run_batch(plan, ray_address=ray_address, on_shard=landed)
        except KeyboardInterrupt:
            raise fail(
                f"interrupted; finished shards are recorded in {out}/_done: rerun the same command to resume", 130
            ) from None
    say(
        f"{summary.edited} shard(s) edited ({summary.images} images), {summary.skipped} already done, of "
        f"{summary.shards}, in {summary.seconds:.1f}s; completion records in {out}/_done"
    )
