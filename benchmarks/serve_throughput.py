"""`cfdeploy serve` throughput and latency at 1, 4 and 16 concurrent clients, against a sequential loop.

The loop is the same edits (one code, the bundle's prompt, PNG bytes out) run one after another in one
process on the same backend, as a script calling the Python API would; it is measured first, then the
server (a local Ray with every core) is started and driven over HTTP by client threads. Medians and
ratios are from this one run; results go to benchmarks/results/serve_throughput.json.

    python benchmarks/serve_throughput.py --cache /tmp/serve-bench          # synthetic 256 px bundle, CPU
    python benchmarks/serve_throughput.py --bundle B --backend tensorrt --gpus-per-replica 0.5   # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cfdeploy.backends import open_backend
from cfdeploy.bench import prepare_sources, write_json
from cfdeploy.client import Client
from cfdeploy.editing import DEFAULT_PNG_COMPRESSION, EditJob, edit
from cfdeploy.outputs import png_bytes, to_uint8
from cfdeploy.serving.server import Server, ServeSettings

RESULTS = Path(__file__).parent / "results"
PROMPT = "green lipstick"


def summary(latencies: list[float], wall: float) -> dict[str, float]:
    return {
        "requests_per_s": len(latencies) / wall,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


def sequential_loop(bundle: Path, backend: str, codes: np.ndarray) -> dict[str, float]:
    options = {"providers": ["CPUExecutionProvider"]} if backend == "onnxruntime" else {}
    editor = open_backend(backend, bundle, **options)
    edit(editor, EditJob(codes[:1], PROMPT))  # warm-up: sessions, prompt cache
    latencies = []
    started = time.perf_counter()
    for code in codes:
        begun = time.perf_counter()
        result = edit(editor, EditJob(code[None], PROMPT))
        png_bytes(to_uint8(result.images)[0], DEFAULT_PNG_COMPRESSION)
        latencies.append(time.perf_counter() - begun)
    return summary(latencies, time.perf_counter() - started)


def generator_per_image(bundle: Path, backend: str, codes: np.ndarray, batch: int, threads: int) -> float:
    """Median seconds per image of the generator at ``batch`` with a replica's thread count: what batching can gain."""
    options = {"providers": ["CPUExecutionProvider"], "threads": threads} if backend == "onnxruntime" else {}
    editor = open_backend(backend, bundle, **options)
    editor.synthesize(codes[:batch])
    times = []
    for _ in range(3):
        begun = time.perf_counter()
        editor.synthesize(codes[:batch])
        times.append((time.perf_counter() - begun) / batch)
    return float(np.median(times))


def drive(client: Client, codes: np.ndarray, clients: int) -> dict[str, float]:
    def one(code: np.ndarray) -> tuple[float, list[int]]:
        begun = time.perf_counter()
        reply = client.edit(prompt=PROMPT, latents=code[None])
        return time.perf_counter() - begun, reply.generator_batches

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, codes[:clients]))  # warm-up
        started = time.perf_counter()
        results = list(pool.map(one, codes))
    wall = time.perf_counter() - started
    return {
        **summary([latency for latency, _ in results], wall),
        "mean_generator_batch": float(np.mean([batch for _, batches in results for batch in batches])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle to serve (default: a synthetic 256 px one in --cache)")
    parser.add_argument(
        "--cache", type=Path, default=Path("/tmp/cfdeploy-serve-bench"), help="where the synthetic bundle is kept"
    )
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=8, help="most images per generator call (serve --batch-size)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_throughput.json")
    args = parser.parse_args()

    bundle = args.bundle
    if bundle is None:
        bundle = args.cache / "bundle"
        if not bundle.exists():
            args.cache.mkdir(parents=True, exist_ok=True)
            bundle = prepare_sources(args.cache, synthetic=256, on_progress=print).bundle
    assert bundle is not None
    dims = open_backend("onnxruntime", bundle, providers=["CPUExecutionProvider"])
    codes = np.random.default_rng(0).standard_normal((args.requests, dims.n_latent, dims.style_dim)).astype(np.float32)
    del dims

    threads = max(1, round(args.cpus_per_replica))
    per_image = {
        batch: generator_per_image(bundle, args.backend, codes, batch, threads) for batch in (1, args.batch_size)
    }
    print("sequential loop ...")
    loop = sequential_loop(bundle, args.backend, codes)
    rows = {"sequential loop (batch 1, one process)": loop}
    settings = ServeSettings(
        (bundle,),
        args.backend,
        args.replicas,
        args.batch_size,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        max_ongoing=32,
        port=8765,
    )
    with Server(settings) as server:
        client = Client(server.url)
        for clients in (1, 4, 16):
            print(f"serve, {clients} client(s) ...")
            rows[f"serve, {clients} concurrent client(s)"] = drive(client, codes, clients)

    print(
        f"\n{dims_line(bundle)}; {args.requests} requests each; {args.replicas} replica(s) x {args.cpus_per_replica} CPU, "
        f"backend {args.backend}, max batch {args.batch_size}\n"
    )
    print("| run | requests/s | vs loop | p50 (ms) | p99 (ms) | p99/p50 | mean generator batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        row["vs_loop"] = row["requests_per_s"] / loop["requests_per_s"]
        batch = row.get("mean_generator_batch")
        print(
            f"| {name} | {row['requests_per_s']:.2f} | {row['vs_loop']:.2f}x | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} "
            f"| {row['p99_ms'] / row['p50_ms']:.2f} | {'' if batch is None else f'{batch:.2f}'} |"
        )
    print(
        f"\ngenerator alone, {threads} thread(s): {1000 * per_image[1]:.0f} ms per image at batch 1, "
        f"{1000 * per_image[args.batch_size]:.0f} ms at batch {args.batch_size} "
        f"(batching gains {per_image[1] / per_image[args.batch_size]:.2f}x)"
    )
    write_json(
        {
            "bundle": str(bundle),
            "generator_s_per_image": {str(key): value for key, value in per_image.items()},
            "settings": {key: str(value) for key, value in vars(args).items()},
            "machine": {"node": platform.node(), "processor": platform.processor()},
            "results": rows,
        },
        args.out,
    )


def dims_line(bundle: Path) -> str:
    from cfdeploy.bundle import Bundle

    opened = Bundle(bundle)
    return f"{opened.size} px bundle ({bundle})"


if __name__ == "__main__":
    main()
