"""``python -m cfdeploy`` runs the CLI."""

from cfdeploy.cli import main

main()
