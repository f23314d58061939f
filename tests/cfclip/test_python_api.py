"""The README's Python API example runs as written and computes what `cfdeploy edit` writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def python_api_example() -> str:
    section = README.read_text().split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_python_api_example_matches_the_cli(
    tmp_path, monkeypatch, cli, cfclip_64, clip_state_dict_file, latents_64
):
    for name, target in (
        ("green_lipstick.pt", cfclip_64),
        ("ViT-B-32.pt", clip_state_dict_file),
        ("test_faces.npy", latents_64),
    ):
        (tmp_path / name).symlink_to(target)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_api_example(), "README.md", "exec"), namespace)
    result = namespace["result"]
    count = np.load(latents_64).shape[0]
    assert result.w_hat.shape == (count, 10, 512) and result.images.shape == (count, 3, 64, 64)
    assert {"clip_text", "text_mapper", "latent_editor", "generator"} <= set(result.timings)

    out = tmp_path / "edits"
    ran = cli(
        "edit",
        "-c",
        cfclip_64,
        "--clip-weights",
        clip_state_dict_file,
        "--text",
        "green lipstick",
        "--latents",
        latents_64,
        "--out",
        out,
        "--save-latents",
        "--save-raw",
    )
    assert ran.exit_code == 0, ran.stderr
    np.testing.assert_array_equal(np.load(out / "latents.npy"), result.w_hat)
    np.testing.assert_array_equal(np.load(out / "images.npy"), result.images)
