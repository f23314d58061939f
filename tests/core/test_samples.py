"""`cfdeploy samples DIR`: the files every README journey needs, and the commands of COMMANDS.md run on them.

The set is written once (64 px); every listed command is parsed by the CLI against the files it names, and the
cheap ones run: inspect, invert and DAC's tiny path (abduct, edit). The others run in their own modules on files
from the same makers (edit, export, refit: tests/cfclip; edit --images: tests/photos; serve, batch: tests/serving;
train: tests/training; dac export, edit --bundle: tests/dac), and take minutes on a CPU here.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pytest
import torch
import typer.main

from cfdeploy.checkpoints import load_cfclip, load_clip, load_e4e
from cfdeploy.cli import app
from cfdeploy.samples import GROUPS, sample_files
from conftest import assert_refused, run_cli

RUN = ("cfdeploy inspect", "cfdeploy invert", "cfdeploy dac abduct", "cfdeploy dac edit --run")  # the rest: parsed


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("samples") / "files"
    result = run_cli("samples", "-o", out, "--size", 64)
    assert result.exit_code == 0, result.stderr
    return out, result.stdout


def journeys(stdout: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("# "):
            found[line[2:]] = []
        elif line.strip():
            found[list(found)[-1]].append(line)
    return found


def parsed(line: str) -> tuple[str, dict]:
    """The command line's command name and its options, as the CLI parses them (an unknown option raises)."""
    command = group = typer.main.get_command(app)
    context = group.make_context("cfdeploy", shlex.split(line)[1:])
    name = "cfdeploy"
    while hasattr(command, "resolve_command"):
        name, command, rest = command.resolve_command(context, [*context._protected_args, *context.args])
        context = command.make_context(name, rest, parent=context)
    return name, context.params


def test_every_file_is_written_in_its_official_format(samples):
    out, stdout = samples
    names = {sample.name for sample in sample_files(64)}
    assert {entry.name for entry in out.iterdir()} == names | {"points.json", "COMMANDS.md"}
    for name in names:
        assert f"  {name}: " in stdout or name in stdout
    checkpoint, other = load_cfclip(out / "green_lipstick.pt"), load_cfclip(out / "blue_dog.pt")
    assert (checkpoint.opts["description"], other.opts["description"]) == ("green lipstick", "blue dog")
    assert checkpoint.opts["stylegan_size"] == 64
    generator, other_generator = checkpoint.generator.state_dict(), other.generator.state_dict()
    assert all(torch.equal(generator[key], other_generator[key]) for key in generator)  # refit needs one generator
    assert load_clip(out / "clip_vit_b32.pt").has_visual_weights  # train reads the image tower
    e4e = load_e4e(out / "e4e_ffhq_encode.pt")
    assert all(torch.equal(e4e.generator.state_dict()[key], value) for key, value in generator.items())
    assert sorted(path.name for path in (out / "photos").iterdir()) == ["a.jpg", "b.png"]
    assert len(list((out / "shards").glob("*.npy"))) == 3
    assert (out / "tiny-sd" / "unet" / "config.json").is_file()


def test_commands_md_holds_the_printed_commands_one_per_journey(samples):
    out, stdout = samples
    found = journeys(stdout)
    assert len(found) == 6
    for keyword in ("edit", "export", "refit", "invert", "--images", "serve", "batch", "train", "dac abduct"):
        assert any(keyword in command for commands in found.values() for command in commands), keyword
    markdown = (out / "COMMANDS.md").read_text()
    for commands in found.values():
        for command in commands:
            assert command in markdown


def test_every_listed_command_parses_and_names_files_that_exist(samples):
    out, stdout = samples
    outputs = out / "out"
    for commands in journeys(stdout).values():
        for line in commands:
            if not line.startswith("cfdeploy "):
                continue
            name, options = parsed(line)
            assert name, line
            for value in options.values():
                for path in value if isinstance(value, tuple) else [value]:
                    if isinstance(path, str) and path.startswith(str(out)) and not path.startswith(str(outputs)):
                        assert list(out.parent.glob(str(Path(path).relative_to(out.parent)))), (line, path)


def test_the_cheap_journeys_run_as_listed(samples):
    """inspect, invert, and DAC's tiny path (abduct, edit) in under a minute."""
    _, stdout = samples
    listed = [command for commands in journeys(stdout).values() for command in commands]
    ran = [command for command in listed if command.startswith(RUN)]
    assert len(ran) == 4
    for command in ran:
        started = time.perf_counter()
        result = run_cli(*shlex.split(command)[1:])
        assert result.exit_code == 0, (command, result.stderr)
        if command.startswith("cfdeploy dac abduct"):
            assert time.perf_counter() - started < 60
            assert "a step takes about" in result.stderr


def test_a_non_empty_folder_needs_force_and_bad_options_are_refused(tmp_path):
    (tmp_path / "kept.txt").write_text("mine")
    result = run_cli("samples", "-o", tmp_path, "--only", "dac")
    assert_refused(result, None, str(tmp_path), "not empty", "--force")
    assert [entry.name for entry in tmp_path.iterdir()] == ["kept.txt"]
    assert_refused(
        run_cli("samples", "-o", tmp_path / "new", "--size", 128), tmp_path / "new", "--size", "64, 256, 1024"
    )
    assert_refused(run_cli("samples", "-o", tmp_path / "new", "--only", "cats"), tmp_path / "new", "'cats'", *GROUPS)


def test_only_writes_the_groups_asked_and_lists_only_their_commands(tmp_path):
    out = tmp_path / "dac"
    result = run_cli("samples", "-o", out, "--only", "dac")
    assert result.exit_code == 0, result.stderr
    assert sorted(entry.name for entry in out.iterdir()) == ["COMMANDS.md", "cat.png", "tiny-sd"]
    assert list(journeys(result.stdout)) == [next(iter(journeys(result.stdout)))]
    assert all(line.startswith("cfdeploy dac") for line in journeys(result.stdout)[next(iter(journeys(result.stdout)))])
    assert not [entry for entry in tmp_path.iterdir() if entry.name.endswith(".partial")]
