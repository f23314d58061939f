"""``cfdeploy``: thin Typer commands over the library, one module per command group.

Heavy imports (torch, onnx) happen inside commands, so a core install runs the bundle commands.
Importing a command module registers its commands; the order here is the order of ``--help``.
"""

from __future__ import annotations

from cfdeploy.cli import (
    bench,  # noqa: F401  (bench)
    bundles,  # noqa: F401  (export, build-engines, refit)
    dac,  # noqa: F401  (dac abduct, dac edit, dac export)
    edit,  # noqa: F401  (edit, demo)
    photos,  # noqa: F401  (invert)
    samples,  # noqa: F401  (samples)
    serving,  # noqa: F401  (serve, batch)
    tools,  # noqa: F401  (embed, inspect)
    train,  # noqa: F401  (train)
)
from cfdeploy.cli.common import app, flow_help

__all__ = ["app", "main"]

flow_help(app)


def main() -> None:
    app(prog_name="cfdeploy")
