"""Session-wide synthetic files in the official formats (built once; the 1024 px checkpoint is large)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import synthetic_files


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("official")


@pytest.fixture(scope="session")
def cfclip_256(files: Path) -> Path:
    path = files / "green_lipstick_256.pt"
    torch.save(synthetic_files.cfclip_checkpoint(256, seed=1), path)
    return path


@pytest.fixture(scope="session")
def cfclip_1024(files: Path) -> Path:
    path = files / "green_lipstick_1024.pt"
    torch.save(synthetic_files.cfclip_checkpoint(1024, seed=2), path)
    return path


@pytest.fixture(scope="session")
def clip_state_dict_file(files: Path) -> Path:
    path = files / "clip_text_open_clip.pt"
    torch.save(synthetic_files.clip_text_state(seed=3), path)
    return path


@pytest.fixture(scope="session")
def clip_torchscript_file(files: Path) -> Path:
    path = files / "ViT-B-32.pt"
    synthetic_files.save_torchscript_archive(synthetic_files.clip_text_state(seed=3, dtype=torch.float16), path)
    return path


@pytest.fixture(scope="session")
def latents_256(files: Path) -> Path:
    path = files / "latents_256.npy"
    np.save(path, np.random.default_rng(4).standard_normal((5, 14, 512)).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def embedding_file(files: Path) -> Path:
    path = files / "embedding.npy"
    np.save(path, np.random.default_rng(5).standard_normal(512).astype(np.float32))
    return path


@pytest.fixture
def cli():
    """Invoke ``cfdeploy`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from cfdeploy.cli import app

    runner = CliRunner()

    def invoke(*args: object):
        return runner.invoke(app, [str(arg) for arg in args])

    return invoke


@pytest.fixture(scope="session")
def bundle_256(tmp_path_factory: pytest.TempPathFactory, cfclip_256: Path, clip_state_dict_file: Path) -> Path:
    """An ONNX bundle exported through the CLI, with one precomputed prompt."""
    from typer.testing import CliRunner

    from cfdeploy.cli import app

    out = tmp_path_factory.mktemp("bundles") / "green_lipstick_256"
    result = CliRunner().invoke(app, ["export", "-c", str(cfclip_256), "--clip-weights", str(clip_state_dict_file),
                                      "--out", str(out), "--prompt", "green lipstick"])
    assert result.exit_code == 0, result.stderr
    return out
