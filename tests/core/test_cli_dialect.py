"""One CLI dialect (docs/cli.md): every command spells each concept the same way.

The rules are read off the commands themselves (Typer's click tree), so a new command or option with a
second spelling of a known concept fails here.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from cfdeploy.cli import app
from cfdeploy.cli.common import PRECISIONS
from conftest import messages

# concept (the parameter's name in code) → its one spelling, and its short form where it has one
SPELLINGS = {
    "text": ("--text", "-t"),
    "source_text": ("--source-text", None),
    "num": ("--num", None),
    "batch_size": ("--batch-size", "-b"),
    "device": ("--device", None),
    "precision": ("--precision", None),
    "bundle": ("--bundle", None),
    "run": ("--run", None),
    "checkpoint": ("--checkpoint", "-c"),
    "out": ("--out", "-o"),
    "force": ("--force", "-f"),
    "seed": ("--seed", None),
    "text_embedding": ("--text-embedding", None),
    "threads": ("--threads", None),
    "no_session_cache": ("--no-session-cache", None),
    "identity_weights": ("--identity-weights", None),
    "verbose": ("--verbose", None),
}
# old spellings: hidden aliases that warn, never shown
RETIRED = ("--prompt", "--target", "--samples", "-p", "--id-weights")
TENSORRT_PROFILE = {"--min-batch", "--opt-batch", "--max-batch", "--static-batch"}
DATA_ARGUMENTS = {"invert": "photos", "embed": "prompts", "inspect": "file"}  # the only positional arguments


def commands() -> dict[str, Any]:
    found = {}

    def walk(command: Any, path: str) -> None:
        if hasattr(command, "commands"):  # a group (Typer ships its own click)
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}".strip())
        else:
            found[path] = command

    walk(typer.main.get_command(app), "")
    return found


def visible_options(command: Any) -> list[Any]:
    return [param for param in command.params if param.param_type_name == "option" and not param.hidden]


def spellings(option: Any) -> list[str]:
    return [*option.opts, *option.secondary_opts]


def test_every_command_is_found():
    assert {
        "edit",
        "demo",
        "bench",
        "export",
        "build-engines",
        "refit",
        "invert",
        "embed",
        "inspect",
        "serve",
        "batch",
        "train",
        "dac abduct",
        "dac edit",
        "dac export",
        "dac build-engines",
    } <= set(commands())


@pytest.mark.parametrize("name", sorted(commands()))
def test_each_known_concept_has_one_spelling(name):
    for option in visible_options(commands()[name]):
        if option.name in SPELLINGS:
            long, short = SPELLINGS[option.name]
            assert sorted(spellings(option)) == sorted(filter(None, (long, short))), (name, option.name, option.opts)


@pytest.mark.parametrize("name", sorted(commands()))
def test_short_flags_and_retired_names_mean_one_thing(name):
    shorts = {short: concept for concept, (_, short) in SPELLINGS.items() if short}
    for option in visible_options(commands()[name]):
        for spelling in spellings(option):
            assert spelling not in RETIRED, (name, spelling)
            if spelling in shorts:
                assert option.name == shorts[spelling], f"{name}: {spelling} is {option.name}, not {shorts[spelling]}"


@pytest.mark.parametrize("name", sorted(commands()))
def test_artifacts_are_options_and_positional_arguments_are_data(name):
    arguments = [param.name for param in commands()[name].params if param.param_type_name == "argument"]
    assert arguments == ([DATA_ARGUMENTS[name]] if name in DATA_ARGUMENTS else []), (name, arguments)


@pytest.mark.parametrize("name", sorted(commands()))
def test_precision_has_one_vocabulary_and_batch_limits_two_names(name):
    options = {spelling: option for option in visible_options(commands()[name]) for spelling in spellings(option)}
    if "--precision" in options:
        assert tuple(options["--precision"].type.choices) == PRECISIONS == ("fp32", "fp16", "bf16", "mixed")
    profile = TENSORRT_PROFILE & set(options)
    assert not profile or {"--min-batch", "--max-batch"} <= profile, (name, profile)  # --max-batch: a TensorRT profile
    if "--device" in options:
        assert options["--device"].metavar == "DEVICE"
    if "--backend" in options:
        assert options["--backend"].metavar == "NAME"


@pytest.mark.parametrize("columns", [80, 100])
@pytest.mark.parametrize("name", sorted(commands()))
def test_help_wraps_to_the_terminal_without_breaking_a_sentence_or_a_choice(name, columns):
    result = CliRunner().invoke(app, [*name.split(), "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    usage = next(number for number, line in enumerate(lines) if line.strip().startswith("Usage:"))
    options = next(number for number, line in enumerate(lines) if line.startswith("╭"))
    description = [line.strip() for line in lines[usage + 1 : options]]
    assert any(description)
    for line, following in itertools.pairwise(description):
        if line and following:  # a line break inside a paragraph: only where the next word did not fit
            assert len(line) + 1 + len(following.split()[0]) > columns - 2, (line, following)
    for option in visible_options(commands()[name]):
        choices = getattr(option.type, "choices", None)
        shown = option.metavar or (f"[{'|'.join(map(str, choices))}]" if choices else None)
        assert shown is None or shown in result.stdout, (option.name, shown)


def test_a_retired_spelling_still_works_with_a_warning_and_never_beside_its_new_name(cli, tmp_path):
    missing = tmp_path / "missing"
    result = cli("build-engines", missing)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "warning: a positional BUNDLE is now --bundle; the old name will be removed",
        f"error: {missing}: no such bundle directory",
    ]
    result = cli(
        "export", "-c", missing, "--clip-weights", missing, "--prompt", "a", "--text", "b", "-o", tmp_path / "out"
    )
    assert result.exit_code == 2
    assert messages(result.stderr) == "error: --prompt is the old name of --text: give --text only"


def test_version_names_cfdeploy_and_every_runtime_it_can_use(cli):
    from importlib.metadata import PackageNotFoundError, version

    result = cli("--version")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"cfdeploy {version('cfdeploy')}"
    listed = dict(line.split(maxsplit=1) for line in lines[1:])
    assert listed["onnxruntime"] == version("onnxruntime") and listed["torch"] == version("torch")
    try:
        assert listed["tensorrt"] == version("tensorrt")
    except PackageNotFoundError:
        assert listed["tensorrt"] == "not installed"
