"""``cfdeploy samples``: the files every README journey needs, written into one folder with the commands that use
them."""

from __future__ import annotations

from pathlib import Path

import typer

from cfdeploy.cli.common import app, console, plain, say, user_errors
from cfdeploy.errors import CfdeployError


@app.command("samples")
@user_errors
def samples_command(
    out: Path = typer.Option(
        ..., "--out", "-o", metavar="DIR", help="Folder to write (new, or empty; --force replaces it)."
    ),
    size: int = typer.Option(
        256, "--size", metavar="PX", help="Resolution of the CF-CLIP checkpoints, the e4e generator and the codes."
    ),
    only: list[str] | None = typer.Option(
        None,
        "--only",
        metavar="GROUP",
        help="Write only this group (repeatable): cfclip (checkpoints, CLIP, codes), photos (e4e, ArcFace, photos, "
        "landmarks), dac (tiny Stable Diffusion, image) \\[default: all].",
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Replace a non-empty DIR."),
) -> None:
    """Write sample files for every command: CF-CLIP checkpoints, CLIP, e4e and ArcFace weights in the official
    formats (seeded random weights), W+ codes and shards, photos with landmarks, a tiny Stable Diffusion folder and an
    image for DAC; then DIR/COMMANDS.md, one ready-to-run command per README journey, printed too.

    The pictures mean nothing; the files load, export, train, serve and edit as the official ones do. About 1.8 GB
    at 256 px (the e4e encoder is half of it), more at 1024 px. Needs the export extra (torch); the dac group also the
    dac extra.
    """
    from cfdeploy.outputs import StagedDirectory
    from cfdeploy.samples import GROUPS, SIZES, Sample, write_samples

    if size not in SIZES:
        raise CfdeployError(f"--size must be one of {', '.join(map(str, SIZES))}, got {size}")
    unknown = [group for group in only or [] if group not in GROUPS]
    if unknown:
        raise CfdeployError(f"--only {unknown[0]!r}: not a group; the groups are {', '.join(GROUPS)}")
    groups = tuple(group for group in GROUPS if not only or group in only)

    def wrote(sample: Sample, path: Path, seconds: float) -> None:
        files = [path] if path.is_file() else [entry for entry in path.rglob("*") if entry.is_file()]
        megabytes = sum(entry.stat().st_size for entry in files) / 1e6
        say(f"  {sample.name}: {sample.what} ({megabytes:,.1f} MB, {seconds:.1f} s)")

    with StagedDirectory(out, force) as staged, console.status("writing") as status:
        at = f" ({size} px CF-CLIP and e4e)" if set(groups) - {"dac"} else ""
        say(f"writing {', '.join(groups)} samples{at} into {plain(out)}")
        journeys = write_samples(
            staged.path,
            size,
            groups,
            final=staged.out,
            on_start=lambda sample: status.update(f"writing {sample.name}"),
            on_file=wrote,
        )
    for journey, commands in journeys:
        typer.echo(f"\n# {journey}")
        for command in commands:
            typer.echo(command)
    console.print(f"\nthe commands are in {plain(staged.out / 'COMMANDS.md')} too", markup=False)
