"""A core install (no extras) runs a bundle: a fresh virtual environment without torch or open_clip."""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import numpy as np
import open_clip
import pytest
from PIL import Image

from conftest import (
    TOKENIZER_PROMPTS,
    TOLERANCE,
    early_result,
    early_run,
    messages,
    official_edit,
    open_clip_features,
    prepare_early,
    rel_l2,
)

REPO = Path(__file__).resolve().parents[2]


def core_install(env_dir: Path) -> Path:
    """Python of a fresh venv with ``pip install <repo>`` and nothing else."""
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    early_run([python, "-m", "pip", "install", "-q", str(REPO)], check=True)
    return python


prepare_early("core venv", core_install)  # pip's downloads and unpacking overlap with the tests before these


@pytest.fixture(scope="module")
def core_python(shared: Path) -> Path:
    python = early_result("core venv", shared)
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "the core install must not bring torch"
    return python


def run_core(python: Path, *args: object) -> subprocess.CompletedProcess:
    code = "import sys; from cfdeploy.cli import main; sys.argv[0] = 'cfdeploy'; main()"
    return subprocess.run([python, "-c", code, *map(str, args)], capture_output=True, text=True)


def test_core_install_tokenizes_like_open_clip(core_python, bundle_64):
    code = (
        "import json, sys; from pathlib import Path; from cfdeploy.tokenizer import ClipTokenizer;"
        "tok = ClipTokenizer(Path(sys.argv[1]) / 'tokenizer' / 'bpe_simple_vocab_16e6.txt.gz');"
        "print(json.dumps(tok(json.loads(sys.argv[2])).tolist()))"
    )
    process = subprocess.run(
        [core_python, "-c", code, str(bundle_64), json.dumps(TOKENIZER_PROMPTS)], capture_output=True, text=True
    )
    assert process.returncode == 0, process.stderr
    assert np.array_equal(
        np.array(json.loads(process.stdout)), open_clip.get_tokenizer("ViT-B-32")(TOKENIZER_PROMPTS).numpy()
    )


@pytest.mark.parametrize("text_source", ["text", "embedding"])
def test_core_install_edits_a_bundle(
    core_python, tmp_path, bundle_64, cfclip_64, latents_64, embedding_file, text_source
):
    if text_source == "text":
        source, features = ("--text", "rosy cheeks"), open_clip_features(["rosy cheeks"])
    else:
        source, features = ("--text-embedding", embedding_file), np.load(embedding_file)[None]
    out = tmp_path / "out"
    process = run_core(core_python, "edit", "--bundle", bundle_64, "-l", latents_64, *source, "-o", out, "--save-raw")
    assert process.returncode == 0, process.stderr
    assert "torch" not in json.loads((out / "edit.json").read_text())["versions"]
    _, image = official_edit(cfclip_64, np.load(latents_64), features)
    assert rel_l2(np.load(out / "images.npy"), image) <= TOLERANCE


def test_core_install_samples_a_dac_bundle_like_torch(core_python, tmp_path, dac_bundle, dac_run, cli):
    """The DAC runtime is torch-free too: ONNX Runtime and numpy's PLMS give the PyTorch edit's pixels."""
    out, reference = tmp_path / "out", tmp_path / "reference"
    process = run_core(core_python, "dac", "edit", "--bundle", dac_bundle, "-o", out, "--num", 1, "--steps", 4)
    assert process.returncode == 0, process.stderr
    assert "torch" not in json.loads((out / "edit.json").read_text())["versions"]
    assert cli("dac", "edit", "--run", dac_run, "-o", reference, "--num", 1, "--steps", 4).exit_code == 0
    ours, theirs = (np.asarray(Image.open(path / "seed_0029.png")).astype(int) for path in (out, reference))
    assert np.abs(ours - theirs).max() <= 1


def test_core_install_refuses_refinement_in_one_line(core_python, tmp_path, bundle_64, latents_64, embedding_file):
    out = tmp_path / "out"
    process = run_core(
        core_python,
        "edit",
        "--bundle",
        bundle_64,
        "-l",
        latents_64,
        "--text-embedding",
        embedding_file,
        "-o",
        out,
        "--refine-steps",
        3,
    )
    assert process.returncode == 2
    assert messages(process.stderr) == (
        'error: refinement (--refine-steps) needs torch, which this install lacks: pip install "cfdeploy[export]"'
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "command, needed_for, extra",
    [
        (
            ("edit", "--checkpoint", "{checkpoint}", "--text-embedding", "{embedding}", "--seed", 1, "-o", "{out}"),
            "the torch backend",
            "export",
        ),
        (("demo", "-o", "{out}"), "cfdeploy demo", "export"),
        (("embed", "blue dog", "--clip-weights", "{checkpoint}", "-o", "{out}.npy"), "cfdeploy embed", "export"),
        (("bench", "--synthetic", 8, "--backends", "torch"), "cfdeploy bench", "bench"),
        (
            (
                "dac",
                "abduct",
                "-i",
                "{checkpoint}",
                "--source-text",
                "A cat.",
                "-t",
                "A dog.",
                "--base-model",
                "{out}",
                "-o",
                "{out}",
            ),
            "cfdeploy dac abduct",
            "dac",
        ),
    ],
)
def test_core_install_names_the_extra_a_command_needs(
    core_python, tmp_path, cfclip_64, embedding_file, command, needed_for, extra
):
    out = tmp_path / "out"
    values = {"checkpoint": cfclip_64, "embedding": embedding_file, "out": out}
    process = run_core(core_python, *(str(part).format(**values) for part in command))
    assert process.returncode == 2, process.stderr
    assert messages(process.stderr) == (
        f'error: {needed_for} needs torch, which this install lacks: pip install "cfdeploy[{extra}]"'
    )
    assert "Traceback" not in process.stderr and not out.exists()
