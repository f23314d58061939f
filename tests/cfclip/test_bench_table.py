"""What `cfdeploy bench` shows: a table that fits 100 columns (per stage with --wide), progress when
piped, skip reasons from the backend registry, a plot whose legend covers no bar, and the align and
encoder stages of runs that start from photos (--encoder)."""

from __future__ import annotations

import copy
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from cfdeploy.backends import PRESETS
from cfdeploy.bench import BenchSettings, Sources, check_backend_names, measure_backend, plot_figure, prepare_sources
from cfdeploy.cli.bench import bench_tables
from cfdeploy.errors import CfdeployError

STAGES_RUN = ["tokenize", "clip_text", "text_mapper", "latent_editor", "generator", "png"]  # no refine, no sources


@pytest.fixture(scope="module")
def piped_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    """`cfdeploy bench` as a user pipes it (stdout and stderr not terminals), and the report it wrote."""
    report_path = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [
        sys.executable,
        "-m",
        "cfdeploy",
        "bench",
        "--synthetic",
        "16",
        "--backends",
        "torch-reference,torch",
        "--warmup",
        "1",
        "--runs",
        "1",
        "--json",
        str(report_path),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    return completed, json.loads(report_path.read_text())


@pytest.fixture
def gpu_report(piped_bench: tuple[subprocess.CompletedProcess, dict]) -> dict:
    """The real report plus a copy of one entry under the longest backend name, with GPU fields:
    the widest compact table bench prints."""
    report = copy.deepcopy(piped_bench[1])
    widest = copy.deepcopy(report["backends"][0])
    widest.update(backend=max(PRESETS, key=len), gpu_memory_mb=81559.4)
    for result in widest["results"]:
        result["device_ms_per_run"] = {"clip_text": 1234.5, "generator": 98765.4}
    report["backends"].append(widest)
    return report


def rendered(table) -> list[str]:
    screen = Console(width=100, record=True, file=io.StringIO())
    screen.print(table)
    return screen.export_text().splitlines()


def headings(table) -> list[str]:
    return [str(column.header) for column in table.columns]


def test_piped_progress_is_plain_lines_with_run_counts(piped_bench):
    completed, _ = piped_bench
    assert "\x1b" not in completed.stderr  # no spinner, no colour codes in a pipe
    lines = [re.sub(r"in \d+\.\d\d s$", "in S s", line) for line in completed.stderr.splitlines()]
    expected = ["writing synthetic 16 px files"]  # and no export: only torch backends were asked for
    for index, name in enumerate(("torch-reference", "torch"), 1):
        expected += [
            f"{name}: opening (backend {index}/2)",
            f"{name}: batch 1, warm-up 1/1 in S s",
            f"{name}: batch 1, run 1/1 in S s",
        ]
    assert lines[:-1] == expected and lines[-1].startswith("wrote ")


def test_piped_table_fits_100_columns_without_cpu_gpu_columns(piped_bench):
    completed, report = piped_bench
    table_lines = completed.stdout.splitlines()
    assert max(len(line) for line in table_lines) <= 100 and "…" not in completed.stdout
    (table,) = bench_tables(report)
    assert headings(table) == ["backend", "batch", "total ms", "p90 ms", "img/s", "RSS MB", "PSNR dB"]
    body = [line for line in table_lines if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in body] == ["torch-reference", "torch"]
    assert body[1].split("│")[-2].strip() == "inf"  # torch against itself
    assert report["backends"][0]["results"][0]["parity"]["psnr_db"] > 80  # the official formulation against torch


def test_compact_table_fits_100_columns_with_gpu_columns(gpu_report):
    (table,) = bench_tables(gpu_report)
    assert headings(table) == [
        "backend",
        "batch",
        "total ms",
        "p90 ms",
        "img/s",
        "RSS MB",
        "GPU ms",
        "GPU MB",
        "PSNR dB",
    ]
    lines = rendered(table)
    assert max(len(line) for line in lines) <= 100 and not any("…" in line for line in lines)
    widest = next(line for line in lines if max(PRESETS, key=len) in line)
    assert "99999.9" in widest and "81559" in widest  # GPU ms summed over networks, GPU MB, both whole


def test_wide_table_shows_the_stages_that_ran(piped_bench):
    (table,) = bench_tables(piped_bench[1], wide=True)
    assert headings(table) == [
        "backend",
        "batch",
        *STAGES_RUN,
        "total",
        "p90",
        "p99",
        "img/s",
        "RSS MB",
        "max abs err",
        "PSNR dB",
    ]
    assert table.row_count == 2


def test_plot_legend_beside_the_bars_lists_stages_that_ran(piped_bench):
    figure = plot_figure(piped_bench[1])
    figure.draw_without_rendering()  # lay it out as savefig does
    legend, axis = figure.legends[0], figure.axes[0]
    assert [text.get_text() for text in legend.get_texts()] == STAGES_RUN[::-1]  # read top down, as stacked
    box = legend.get_window_extent()
    bars = [bar for container in axis.containers for bar in container]
    assert len(bars) == 2 * len(STAGES_RUN)
    assert box.x0 >= axis.get_window_extent().x1
    assert not any(box.overlaps(bar.get_window_extent()) for bar in bars)


def test_encoder_runs_time_align_and_encoder_and_the_wide_table_shows_them(cfclip_64, e4e_64):
    sources = Sources(checkpoint=cfclip_64, encoder=e4e_64)
    report = measure_backend("torch", sources, BenchSettings(["torch"], warmup=0, runs=1))
    (result,) = report["results"]
    assert list(result["stages_s"]) == ["align", "encoder", "text_mapper", "latent_editor", "generator", "png", "total"]
    (table,) = bench_tables({"backends": [report]}, wide=True)
    assert headings(table)[:9] == [
        "backend",
        "batch",
        "align",
        "encoder",
        "text_mapper",
        "latent_editor",
        "generator",
        "png",
        "total",
    ]


@pytest.mark.parametrize(
    ("name", "sources", "reason"),
    [
        ("torch", Sources(), "needs --checkpoint (or --synthetic)"),
        ("tensorrt", Sources(), "needs --bundle (or --checkpoint with --clip-weights, or --synthetic, to export one)"),
    ],
)
def test_backend_without_its_source_is_skipped_with_the_reason(name, sources, reason):
    assert measure_backend(name, sources, BenchSettings([name])) == {"backend": name, "skipped": reason}


def test_backend_the_registry_cannot_open_is_skipped_with_its_error(tmp_path):
    missing = tmp_path / "missing.pt"
    report = measure_backend("torch-reference", Sources(checkpoint=missing), BenchSettings(["torch-reference"]))
    assert report["backend"] == "torch-reference" and report["skipped"].startswith(f"{missing}: ")


def test_torch_backend_on_a_core_install_is_skipped_naming_the_extra(tmp_path):
    script = (
        "import sys; sys.modules['torch'] = None  # a core install: importing torch fails\n"
        "from pathlib import Path\n"
        "from cfdeploy.bench import BenchSettings, Sources, measure_backend\n"
        "print(measure_backend('torch', Sources(checkpoint=Path(sys.argv[1])), BenchSettings(['torch']))['skipped'])"
    )
    completed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "any.pt")], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert (
        completed.stdout == 'the torch backend needs torch, which this install lacks: pip install "cfdeploy[export]"\n'
    )


def test_unknown_backend_names_listed_with_the_known_ones():
    with pytest.raises(CfdeployError) as error:
        check_backend_names(["torch", "cuda-magic", "trt"])
    assert str(error.value) == f"unknown backends cuda-magic, trt (known: {', '.join(PRESETS)})"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"synthetic": 48}, "--synthetic must be a power of two of at least 8, got 48"),
        ({"synthetic": 4}, "--synthetic must be a power of two of at least 8, got 4"),
        ({}, "give exactly one of --checkpoint, --bundle or --synthetic SIZE"),
        ({"synthetic": 16, "bundle": Path("b")}, "give exactly one of --checkpoint, --bundle or --synthetic SIZE"),
    ],
)
def test_prepare_sources_refuses_bad_choices_and_writes_nothing(tmp_path, given, message):
    with pytest.raises(CfdeployError) as error:
        prepare_sources(tmp_path, **given)
    assert str(error.value) == message and list(tmp_path.iterdir()) == []


def test_prepare_sources_exports_nothing_without_clip_weights(tmp_path):
    checkpoint = tmp_path / "given.pt"  # not read: only a bundle export would read it
    assert prepare_sources(tmp_path / "scratch", checkpoint=checkpoint) == Sources(checkpoint)
    assert not (tmp_path / "scratch").exists()


def every_stage_report(backends: tuple[str, ...] = (max(PRESETS, key=len),)) -> dict:
    """A report as bench writes it, with a value in every column of the wide table, each as wide as it gets."""
    from cfdeploy.bench import STAGES

    timing = {"median": 98.7654, "p90": 98.7654, "p99": 98.7654, "mean": 98.7654}
    result = {
        "batch": 128,
        "device_ms_per_run": {"generator": 98765.4},
        "stages_s": {**dict.fromkeys(STAGES, timing), "refine_per_step": timing},
        "images_per_s": 1234.56,
        "per_image_s": 0.1,
        "images": np.zeros((1, 3, 8, 8), np.float32),
        "parity": {"reference": "torch", "max_abs": 0.123456, "psnr_db": 48.2},
    }
    entry = {"peak_rss_mb": 12345.6, "gpu_memory_mb": 81559.4, "results": [result]}
    return {"backends": [{"backend": name, **copy.deepcopy(entry)} for name in backends]}


def test_the_wide_table_in_100_columns_is_split_into_tables_that_cut_no_value():
    from cfdeploy.bench import WIDE_COLUMNS

    tables = bench_tables(every_stage_report(), wide=True, width=100)
    assert len(tables) > 1
    for number, table in enumerate(tables, 1):
        lines = rendered(table)
        assert max(len(line) for line in lines) <= 100 and not any("…" in line for line in lines)
        assert headings(table)[:2] == ["backend", "batch"] and f"({number} of {len(tables)})" in str(table.title)
    measures = [heading for table in tables for heading in headings(table)[2:]]
    assert measures == [column.heading for column in WIDE_COLUMNS[2:]]


def test_an_interrupted_bench_keeps_the_backends_measured_before_it(cli, monkeypatch, tmp_path):
    import cfdeploy.bench

    measured = every_stage_report(("torch-reference",))["backends"][0]

    def measure_in_process(name, sources, settings, on_progress):
        if name == "torch":
            raise KeyboardInterrupt
        return copy.deepcopy(measured)

    monkeypatch.setattr(cfdeploy.bench, "prepare_sources", lambda scratch, **given: Sources())
    monkeypatch.setattr(cfdeploy.bench, "measure_in_process", measure_in_process)
    report_path = tmp_path / "bench.json"
    result = cli("bench", "--synthetic", 16, "--backends", "torch-reference,torch,onnxruntime", "--json", report_path)
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == (
        f"error: interrupted; kept the backends measured before torch (in {report_path})"
    )
    report = json.loads(report_path.read_text())
    assert report["interrupted_at"] == "torch"
    assert [backend["backend"] for backend in report["backends"]] == ["torch-reference"]
    body = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in body] == ["torch-reference"]
