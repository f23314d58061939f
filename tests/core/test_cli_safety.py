"""The command line as a careless or hostile user meets it: bad numbers, odd paths, text that would
drive the terminal. Each refusal is one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import synthetic_files
from conftest import messages

ESCAPES = "\x1b]8;;https://example.invalid\x1b\\link\x1b]8;;\x1b\\\x1b[31m[/bold][red]"


def assert_refused(result, out: Path, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert messages(result.stderr) == f"error: {message}"
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--strength", "nan", "--strength must be a finite number within float32's range, got nan"),
        ("--strength", "inf", "--strength must be a finite number within float32's range, got inf"),
        ("--refine-lr", "nan", "--refine-lr must be a finite number within float32's range, got nan"),
    ],
)
def test_non_finite_settings_are_refused_before_any_work(
    cli, tmp_path, cfclip_64, latents_64, embedding_file, option, value, message
):
    out = tmp_path / "out"
    result = cli(
        "edit", "-c", cfclip_64, "-l", latents_64, "--text-embedding", embedding_file, "-o", out, option, value
    )
    assert_refused(result, out, message)


@pytest.mark.parametrize(
    "options, message",
    [
        (("--truncation", "inf"), "--truncation must be a finite number within float32's range, got inf"),
        (("--num", "1000000"), "--num must be between 1 and 100,000, got 1000000"),
        (("--seed", "-1"), "--seed must be from 0 to 2^63-1, got -1"),
    ],
)
def test_sampling_settings_are_refused_before_any_work(cli, tmp_path, cfclip_64, embedding_file, options, message):
    out = tmp_path / "out"
    result = cli("edit", "-c", cfclip_64, "--seed", 1, "--text-embedding", embedding_file, "-o", out, *options)
    assert_refused(result, out, message)


@pytest.mark.parametrize("prompt", ["", "   \t "])
def test_empty_prompt_is_refused(cli, tmp_path, cfclip_64, latents_64, clip_state_dict_file, prompt):
    out = tmp_path / "out"
    result = cli(
        "edit", "-c", cfclip_64, "-l", latents_64, "--clip-weights", clip_state_dict_file, "--text", prompt, "-o", out
    )
    assert result.exit_code == 2 and "prompt" in result.stderr and "empty" in result.stderr, result.stderr
    assert len(messages(result.stderr).splitlines()) == 1 and not out.exists()


def test_force_never_replaces_a_directory_holding_an_input(cli, tmp_path, cfclip_64, embedding_file):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    latents = inputs / "codes.npy"
    np.save(latents, np.zeros((1, 14, 512), np.float32))
    result = cli("edit", "-c", cfclip_64, "-l", latents, "--text-embedding", embedding_file, "-o", inputs, "--force")
    assert result.exit_code == 2
    assert messages(result.stderr) == f"error: {inputs}: contains the input {latents}; choose another output"
    assert sorted(path.name for path in inputs.iterdir()) == ["codes.npy"]


def test_inspect_of_an_unknown_file_names_what_it_expected(cli, tmp_path):
    table = tmp_path / "b.csv"
    table.write_text("a,b\n1,2\n")
    result = cli("inspect", table)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: {table}: not a file cfdeploy knows (expected a bundle directory")


@pytest.fixture(scope="module")
def hostile_description_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "described.pt"
    torch.save(synthetic_files.cfclip_checkpoint(64, seed=7, description=ESCAPES, source_text="[bold]face"), path)
    return path


def test_inspect_shows_markup_and_escapes_from_a_checkpoint_literally(cli, hostile_description_checkpoint):
    result = cli("inspect", hostile_description_checkpoint)
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "[/bold][red]" in result.stdout and "[bold]face" in result.stdout
    assert "\\x1b]8;;https://example.invalid" in result.stdout


def test_warnings_and_reports_never_pass_escape_sequences(
    cli, tmp_path, hostile_description_checkpoint, latents_64, clip_state_dict_file
):
    out = tmp_path / "out"
    one_code = tmp_path / "one.npy"
    np.save(one_code, np.load(latents_64)[:1])
    result = cli(
        "edit",
        "-c",
        hostile_description_checkpoint,
        "-l",
        one_code,
        "--clip-weights",
        clip_state_dict_file,
        "--text",
        "blue dog \x1b[2J",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stderr
    assert "trained for" in result.stderr and "[/bold][red]" in result.stderr and "\\x1b[2J" in result.stderr


def test_png_compression_changes_size_not_pixels(cli, tmp_path, cfclip_64, latents_64, embedding_file):
    from PIL import Image

    one_code = tmp_path / "one.npy"
    np.save(one_code, np.load(latents_64)[:1])
    sizes, pixels = [], []
    for level in (0, 9):
        out = tmp_path / f"level{level}"
        result = cli(
            "edit",
            "-c",
            cfclip_64,
            "-l",
            one_code,
            "--text-embedding",
            embedding_file,
            "-o",
            out,
            "--png-compression",
            level,
        )
        assert result.exit_code == 0, result.stderr
        sizes.append((out / "000000.png").stat().st_size)
        pixels.append(np.asarray(Image.open(out / "000000.png")))
    assert sizes[0] > sizes[1]
    np.testing.assert_array_equal(pixels[0], pixels[1])


@pytest.mark.parametrize(
    "options, message",
    [
        (["--without-clip", "--text", "blue dog"], "--text needs --clip-weights"),
        ([], "the CLIP text graph needs --clip-weights"),
    ],
)
def test_export_asks_for_clip_weights_only_when_it_uses_them(cli, tmp_path, cfclip_64, options, message):
    out = tmp_path / "bundle"
    result = cli("export", "-c", cfclip_64, *options, "-o", out)
    assert result.exit_code == 2 and not out.exists()
    assert messages(result.stderr) == (
        f"error: {message} (a bundle with --without-clip and no --text edits only with --text-embedding)"
    )


def test_without_clip_and_no_prompt_exports_a_bundle_for_text_embeddings(
    cli, tmp_path, bundle_64_without_clip, embedding_file
):
    manifest = json.loads((bundle_64_without_clip / "manifest.json").read_text())
    assert manifest["source"]["clip_weights"] is None and manifest["prompts"] == {}
    assert "clip_text" not in manifest["networks"] and not (bundle_64_without_clip / "clip_text.onnx").exists()
    out = tmp_path / "edits"
    result = cli("edit", "--bundle", bundle_64_without_clip, "--seed", 1, "--text-embedding", embedding_file, "-o", out)
    assert result.exit_code == 0, result.stderr


def test_a_bundle_64_without_clip_says_which_prompts_it_can_edit(cli, tmp_path, bundle_64_without_clip):
    out = tmp_path / "out"
    result = cli("edit", "--bundle", bundle_64_without_clip, "--text", "blue dog", "--seed", 1, "-o", out)
    assert result.exit_code == 2 and not out.exists()
    assert messages(result.stderr) == (
        f"error: {bundle_64_without_clip}: exported --without-clip, so it edits only the prompts precomputed at export "
        "(none) or --text-embedding features"
    )


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["edit", "--out", "o", "--batch-size", "abc"],
            "error: cfdeploy edit: invalid value for '--batch-size' / '-b': 'abc' is not a valid integer; "
            "see cfdeploy edit --help",
        ),
        (["edit"], "error: cfdeploy edit: missing option '--out' / '-o'; see cfdeploy edit --help"),
        (
            ["dac", "edit", "--nonsense"],
            "error: cfdeploy dac edit: no such option: --nonsense (Possible options: --noise, --seed); "
            "see cfdeploy dac edit --help",
        ),
        (["nosuchcommand"], "error: cfdeploy: no such command 'nosuchcommand'; see cfdeploy --help"),
    ],
)
def test_a_malformed_command_line_is_one_line_naming_the_command_and_its_help(cli, tmp_path, args, line):
    result = cli(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.strip() == line
    assert result.stdout == ""


def test_an_option_without_its_value_is_one_line_from_a_shell_too(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "cfdeploy", "edit", "--out", tmp_path / "o", "--strength"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "60"},
    )
    assert process.returncode == 2
    assert process.stderr.splitlines() == ["error: option '--strength' requires an argument"]
    assert not (tmp_path / "o").exists()
