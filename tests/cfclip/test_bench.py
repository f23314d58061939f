"""`cfdeploy bench` end to end on a tiny synthetic model: every reported field, files, skips."""

from __future__ import annotations

import csv
import importlib.util
import json

import onnxruntime
import pytest
import torch

from cfdeploy.bench import STAGES, generator_gflop, summarize


def test_summary_statistics_are_median_p90_p99_and_mean():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats == {"median": 3.0, "p90": 5.0, "p99": 5.0, "mean": 3.0}
    assert summarize([float(i) for i in range(1, 101)])["p90"] == 90.0


def test_generator_gflop_matches_hand_count():
    # 4 px: conv1 + to_rgb1; 8 px: transposed conv on 4x4, conv and ToRGB at 8x8 (all 512 channels).
    expected = 2 * 9 * 512**2 * 16 + 2 * 512 * 3 * 16 + 2 * 9 * 512**2 * 16 + 2 * 9 * 512**2 * 64 + 2 * 512 * 3 * 64
    assert generator_gflop(8) == pytest.approx(expected / 1e9)
    assert 145 < generator_gflop(1024) < 152  # the spec's "about 151 GFLOP"


def test_bench_reports_every_field(cli, tmp_path, cfclip_64, clip_state_dict_file, bundle_64):
    """The checkpoint that ``bundle_64`` was exported from: the bundle bench exports for ONNX Runtime comes from the
    run's export cache (``--synthetic`` is timed in test_bench_table and below). Two runs, no warm-up: the fields
    are the point, not the figures."""
    paths = {suffix: tmp_path / f"bench.{suffix}" for suffix in ("json", "csv", "png")}
    gpu_backends = "torch-cuda-fp16,onnxruntime-cuda,tensorrt"
    result = cli(
        "bench",
        "--checkpoint",
        cfclip_64,
        "--clip-weights",
        clip_state_dict_file,
        "--backends",
        f"torch,onnxruntime,{gpu_backends}",  # torch-reference: the piped run in test_bench_table
        "--batch-sizes",
        "1,2",
        "--warmup",
        0,
        "--runs",
        2,
        "--json",
        paths["json"],
        "--csv",
        paths["csv"],
        "--plot",
        paths["png"],
    )
    assert result.exit_code == 0, result.stderr
    if not torch.cuda.is_available():
        assert "skipped torch-cuda-fp16: --device cuda: this torch sees no CUDA GPU" in result.stdout
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert (
            "skipped onnxruntime-cuda: ONNX Runtime providers CUDAExecutionProvider are not available" in result.stdout
        )
    if importlib.util.find_spec("tensorrt") is None:
        assert "skipped tensorrt: the tensorrt backend needs TensorRT, which is not installed here" in result.stdout
    report = json.loads(paths["json"].read_text())
    assert {"cpu", "logical_cpus", "versions"} <= set(report["machine"])
    by_name = {backend["backend"]: backend for backend in report["backends"]}
    if importlib.util.find_spec("tensorrt") is None:
        assert by_name["tensorrt"]["skipped"] == (
            "the tensorrt backend needs TensorRT, which is not installed here (No module named 'tensorrt'); "
            "on Jetson it comes with JetPack, elsewhere `pip install tensorrt`"
        )
    else:
        assert [r["batch"] for r in by_name["tensorrt"]["results"]] == [1, 2]
    for name in ("torch", "onnxruntime"):
        backend = by_name[name]
        assert backend["peak_rss_mb"] > 0 and backend["threads"] and backend["gpu_memory_mb"] is None
        assert [r["batch"] for r in backend["results"]] == [1, 2]
        for result_ in backend["results"]:
            assert set(result_["stages_s"]) == set(STAGES) - {
                "align",
                "encoder",
                "refine",
                "source_generator",
                "identity",
            }
            for stats in result_["stages_s"].values():
                assert set(stats) == {"median", "p90", "p99", "mean"} and stats["median"] > 0
            assert result_["images_per_s"] > 0
            assert result_["parity"]["reference"] == "torch"
    assert by_name["torch"]["results"][0]["parity"]["max_abs"] == 0.0
    assert by_name["onnxruntime"]["results"][1]["parity"]["psnr_db"] > 80
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4 and {row["backend"] for row in rows} == {"torch", "onnxruntime"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_unknown_backend(cli):
    result = cli("bench", "--synthetic", 32, "--backends", "torch,cuda-magic")
    assert result.exit_code == 2 and "unknown backends cuda-magic" in result.stderr


def test_bench_times_refinement_steps(cli, tmp_path, cfclip_64, clip_vit_b32_file):
    """On the run's shared files (``--synthetic`` with CLIP's visual tower is what the GPU run's dry run times)."""
    report_path = tmp_path / "bench.json"
    result = cli(
        "bench",
        "--checkpoint",
        cfclip_64,
        "--clip-weights",
        clip_vit_b32_file,
        "--backends",
        "torch",
        "--refine-steps",
        2,
        "--warmup",
        0,
        "--runs",
        1,
        "--json",
        report_path,
    )
    assert result.exit_code == 0, result.stderr
    stages = json.loads(report_path.read_text())["backends"][0]["results"][0]["stages_s"]
    assert stages["refine"]["median"] > 0
    assert stages["refine_per_step"]["median"] == pytest.approx(stages["refine"]["median"] / 2)
