"""File tools: ``cfdeploy embed`` (prompts to CLIP features) and ``cfdeploy inspect`` (what a file is)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cfdeploy.cli.common import app, phase, plain, say, user_errors
from cfdeploy.errors import CfdeployError


@app.command("embed")
@user_errors
def embed_command(
    prompts: list[str] = typer.Argument(..., metavar="PROMPT...", help="One or more prompts."),
    clip_weights: Path = typer.Option(..., "--clip-weights", metavar="FILE", help="CLIP ViT-B/32 weights file."),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="Output .npy: float32 [N,512], unnormalised."),
    device: str = typer.Option("cpu", "--device", metavar="DEVICE", help="cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing --out file."),
) -> None:
    """Encode prompts with CLIP's text tower (the features CF-CLIP's text mapper reads; for --text-embedding)."""
    from cfdeploy.outputs import check_output_file, write_npy_atomic

    check_output_file(out, force, [clip_weights])
    with phase("loading CLIP and encoding"):
        from cfdeploy.embedding import encode_prompts

        features = encode_prompts(prompts, clip_weights, device)
    write_npy_atomic(out, features, force)
    say(f"wrote {out}: {len(prompts)} embedding(s) [{features.shape[0]},{features.shape[1]}]")


def _cell(value: Any) -> Text:
    """One table cell from a report value (file-derived text shown literally, never as markup)."""
    if isinstance(value, dict) and all(isinstance(entry, str) for entry in value.values()):
        value = "\n".join(f"{name}: {entry}" for name, entry in value.items()) or "-"
    elif isinstance(value, dict):
        value = ", ".join(
            f"{name} {count:,}" if isinstance(count, int) else f"{name} {count}" for name, count in value.items()
        )
    elif isinstance(value, list):
        value = ", ".join(map(str, value)) or "-"
    return Text(plain(value))


@app.command("inspect")
@user_errors
def inspect_command(
    file: Path | None = typer.Argument(
        None,
        metavar="PATH",
        help="Checkpoint (CF-CLIP, StyleGAN2, e4e), CLIP weights, latents/embedding array, or bundle directory.",
    ),
    system: bool = typer.Option(
        False, "--system", help="Describe this machine instead: CPU features, runtimes, devices, the default backend."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Say what a file is: kind, resolution, levels, trained prompt, mapper groups, parameter counts; for a
    bundle also its manifest's sha256 (pin it with `cfdeploy edit --expect-manifest`) and its TensorRT engines.
    With --system: which runtimes, devices and CPU features this machine has, and so which backend to use."""
    from cfdeploy.inspection import inspect_file, system_report

    if (file is None) == (not system):
        raise CfdeployError("give exactly one of PATH or --system")
    if system:
        report = system_report()
        file = Path("this machine")
    else:
        assert file is not None
        with phase(f"reading {plain(file)}"):
            report = inspect_file(file)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=Text(plain(file)), show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in report.items():
        table.add_row(key, _cell(value))
    Console().print(table)
    if isinstance(report.get("manifest_sha256"), str):  # on a line of its own: a folded cell does not copy whole
        typer.echo(f"pin it: --expect-manifest {report['manifest_sha256']}")
