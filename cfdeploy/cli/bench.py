"""``cfdeploy bench``: latency, throughput, memory and parity of each backend, as a table."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from cfdeploy.backends import PRESETS
from cfdeploy.cli.common import (
    app,
    console,
    no_session_cache_option,
    phase,
    plain,
    require_range,
    retired,
    safe,
    say,
    session_cache_option,
    user_errors,
)
from cfdeploy.errors import CfdeployError

SCREEN_WIDTH = 100  # the compact table fits this; piped output is at least this wide


def _int_list(value: str, option: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise CfdeployError(f"{option} {value!r}: expected comma-separated integers") from None
    if not numbers or min(numbers) < 1:
        raise CfdeployError(f"{option} {value!r}: expected positive integers")
    return numbers


@contextmanager
def progress_lines() -> Iterator[Callable[[str], None]]:
    """One updating status line on a terminal; one plain line per message when stderr is piped."""
    if not console.is_terminal:
        yield say
        return
    with phase("starting") as status:
        yield lambda message: status.update(safe(message))


@app.command("bench")
@user_errors
def bench_command(
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", metavar="FILE", help="CF-CLIP checkpoint to benchmark."
    ),
    bundle: Path | None = typer.Option(None, "--bundle", metavar="DIR", help="Exported bundle to benchmark."),
    synthetic: int | None = typer.Option(
        None,
        "--synthetic",
        help="Benchmark the real architecture at this size with synthetic weights (no files needed).",
    ),
    clip_weights: Path | None = typer.Option(
        None, "--clip-weights", metavar="FILE", help="CLIP weights, to time the text stages on torch."
    ),
    encoder: Path | None = typer.Option(
        None,
        "--encoder",
        metavar="FILE",
        help="e4e checkpoint: each run aligns and encodes a synthetic 1024 px photo per image (the align and encoder "
        "stages), then edits its codes. Torch backends open it; the bundle exported for the others includes it.",
    ),
    identity_weights: Path | None = typer.Option(
        None,
        "--identity-weights",
        metavar="FILE",
        help="ArcFace IR-SE-50 (model_ir_se50.pth): each run scores its edits' identity, as edit does (the "
        "source_generator and identity stages). Torch backends open it; the exported bundle includes it.",
    ),
    backends: str = typer.Option(
        "torch-reference,torch,onnxruntime", "--backends", help=f"Comma-separated, of: {', '.join(PRESETS)}."
    ),
    batch_sizes: str = typer.Option("1", "--batch-sizes", help="Comma-separated batch sizes, e.g. 1,2,4,8."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs first."),
    runs: int = typer.Option(5, "--runs", help="Timed runs per backend and batch size."),
    text: str | None = typer.Option(
        None, "--text", "-t", metavar="PROMPT", help="Prompt for the text stages. \\[default: green lipstick]"
    ),
    old_text: str | None = typer.Option(None, "--prompt", hidden=True),
    refine_steps: int = typer.Option(
        0,
        "--refine-steps",
        metavar="K",
        help="Also time K CLIP-NCE refinement steps per batch (torch backends; needs CLIP visual weights).",
    ),
    no_session_cache: bool = no_session_cache_option(),
    wide: bool = typer.Option(
        False, "--wide", help="Show every stage's median, p99 and max abs error (the JSON and CSV always have them)."
    ),
    json_file: Path | None = typer.Option(None, "--json", help="Write the full report as JSON."),
    csv_file: Path | None = typer.Option(None, "--csv", help="Write one row per backend and batch size, every field."),
    plot_file: Path | None = typer.Option(None, "--plot", help="Write a PNG of latency per stage and backend."),
) -> None:
    """Latency, images/s, peak RSS and image parity of each backend.

    The table fits 100 columns; --wide adds each stage's median, in as many tables as the terminal's width takes.
    Each backend runs in its own process; parity is against the torch fp32 backend.
    Backends that cannot run here are listed as skipped, with the reason.
    With --encoder (or a bundle holding the encoder graph) runs start from photos; with --identity-weights (or a
    bundle holding the identity graph) they score identity.

    Example: cfdeploy bench --synthetic 256 --backends torch,onnxruntime
    """
    from cfdeploy.bench import (
        BenchSettings,
        check_backend_names,
        prepare_sources,
        reads_bundle,
        run_bench,
    )

    require_range(0, warmup=warmup, refine_steps=refine_steps)
    require_range(1, runs=runs)
    names = [name.strip() for name in backends.split(",") if name.strip()]
    check_backend_names(names)
    settings = BenchSettings(
        names,
        _int_list(batch_sizes, "--batch-sizes"),
        warmup,
        runs,
        retired("--prompt", old_text, "--text", text) or "green lipstick",
        refine_steps=refine_steps,
        session_cache=session_cache_option(no_session_cache),
    )
    with tempfile.TemporaryDirectory(prefix="cfdeploy-bench-") as scratch, progress_lines() as progress:
        sources = prepare_sources(
            Path(scratch),
            synthetic=synthetic,
            checkpoint=checkpoint,
            clip_weights=clip_weights,
            bundle=bundle,
            encoder=encoder,
            identity_weights=identity_weights,
            need_bundle=any(reads_bundle(name) for name in names),
            with_visual=refine_steps > 0,
            on_progress=progress,
        )
        report = run_bench(sources, settings, on_progress=progress)
    print_bench(report, wide)
    from cfdeploy.bench import write_csv, write_json, write_plot

    written = []
    for path, writer in ((json_file, write_json), (csv_file, write_csv), (plot_file, write_plot)):
        if path is not None:
            writer(report, path)
            say(f"wrote {path}")
            written.append(str(path))
    if "interrupted_at" in report:
        kept = f"kept the backends measured before {report['interrupted_at']}"
        raise KeyboardInterrupt(f"{kept} (in {', '.join(written)})" if written else kept)


def bench_tables(report: dict[str, Any], wide: bool = False, width: int | None = None) -> list[Table]:
    """The report as a table: compact (whole-edit latency, fits 100 columns) or wide (every stage); no empty columns.

    Given a ``width``, the columns that do not fit go to further tables, each led by the backend and batch, so that
    no value is cut short."""
    from cfdeploy.bench import NAME_COLUMNS, table_columns, table_rows

    rows = table_rows(report)
    parts: list[list[Any]] = [[*NAME_COLUMNS]]
    for column in table_columns(rows, wide):
        if column in NAME_COLUMNS:
            continue
        grown = [*parts[-1], column]
        if width is not None and len(parts[-1]) > len(NAME_COLUMNS) and _width(_table("", rows, grown)) > width:
            parts.append([*NAME_COLUMNS, column])
        else:
            parts[-1] = grown
    measured = "median ms per stage, per batch" if wide else "ms per batch (median, p90)"
    title = f"cfdeploy bench: {measured}; PSNR against torch fp32"
    if len(parts) == 1:
        return [_table(title, rows, parts[0])]
    return [_table(f"{title} ({number} of {len(parts)})", rows, part) for number, part in enumerate(parts, 1)]


def _table(title: str, rows: list[dict[str, Any]], columns: list[Any]) -> Table:
    from cfdeploy.bench import cell_text

    table = Table(title=title)
    for column in columns:
        table.add_column(column.heading, justify="left" if column.key == "backend" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(plain(cell_text(row[column.key], column)) for column in columns))
    return table


def _width(table: Table) -> int:
    """Columns ``table`` needs to show every value whole."""
    return Console(width=10_000).measure(table).maximum


def print_bench(report: dict[str, Any], wide: bool) -> None:
    """The tables on stdout (in a terminal, as many as its width takes; piped, one as wide as it needs), then the
    skipped backends and why."""
    terminal = sys.stdout.isatty()
    tables = bench_tables(report, wide, Console().width if terminal else None)
    widest = max([SCREEN_WIDTH, *map(_width, tables)])
    screen = Console(width=None if terminal else widest, highlight=False)
    for table in tables:
        if table.row_count:
            screen.print(table)
    for backend in report["backends"]:
        if "skipped" in backend:
            screen.print(plain(f"skipped {backend['backend']}: {backend['skipped']}"), markup=False, soft_wrap=True)
