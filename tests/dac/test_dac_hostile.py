"""DAC runs and bundles refused as CF-CLIP's are: a refit map naming tensors the UNet graph lacks, run files that
are links out of the run, an adapter whose header claims more than the file holds, a guidance that takes the
sample out of float32. Each in one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from cfdeploy.dac.refit_map import graph_initializer_shapes
from cfdeploy.dac.run import EDIT_EMBEDDINGS, TEXT_LORA, UNET_LORA
from conftest import assert_refused


def copied(source: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(source, copy)
    return copy


def edited_refit_map(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    weights = manifest["unet"]["refit"]["weights"]
    change(weights, next(iter(weights)))
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_a_refit_map_the_unet_graph_does_not_match_is_refused_on_onnx_runtime(
    cli, dac_bundle: Path, dac_run: Path, tmp_path: Path
):
    """ONNX Runtime ignores an initializer override the graph lacks: the edit would sample the bundle's own U."""
    edits = tmp_path / "edits"

    def refit_edit(bundle: Path):
        return cli("dac", "edit", "--bundle", bundle, "--run", dac_run, "-o", edits, "--num", 1, "--steps", 1)

    missing = copied(dac_bundle, tmp_path, "missing")
    edited_refit_map(missing, lambda weights, key: weights[key].update(initializer="no.such.lora_A.weight"))
    assert_refused(
        refit_edit(missing),
        edits,
        f"{missing / 'manifest.json'}: its refit map names the initializer 'no.such.lora_A.weight', "
        "which unet.onnx does not hold",
    )

    shapes = graph_initializer_shapes((dac_bundle / "unet.onnx").read_bytes())
    mapped = {
        entry["initializer"]
        for entry in json.loads((dac_bundle / "manifest.json").read_text())["unet"]["refit"]["weights"].values()
    }
    other = next(name for name, shape in shapes.items() if name not in mapped and len(shape) == 4)
    reshaped = copied(dac_bundle, tmp_path, "reshaped")
    edited_refit_map(reshaped, lambda weights, key: weights[key].update(initializer=other))
    assert_refused(
        refit_edit(reshaped), edits, f"its refit map gives {other!r} the shape (", f"unet.onnx holds {shapes[other]}"
    )

    malformed = copied(dac_bundle, tmp_path, "malformed")
    edited_refit_map(malformed, lambda weights, key: weights.update({key: {"initializer": 3}}))
    assert_refused(refit_edit(malformed), edits, "unet.refit.weights[", "is {'initializer': 3}, expected")


def test_the_wire_reader_gives_the_initializers_onnx_gives(dac_bundle: Path):
    import onnx

    content = (dac_bundle / "unet.onnx").read_bytes()
    graph = onnx.load_from_string(content).graph
    assert graph_initializer_shapes(content) == {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    with pytest.raises(ValueError, match=r"runs past the end|truncated"):
        graph_initializer_shapes(content[: len(content) // 2])


def test_run_files_that_are_links_leading_out_of_the_run_are_refused(cli, dac_run: Path, tmp_path: Path):
    edits = tmp_path / "edits"
    run = copied(dac_run, tmp_path, "run")
    outside = tmp_path / "elsewhere.safetensors"
    (run / UNET_LORA).rename(outside)
    (run / UNET_LORA).symlink_to(outside)
    assert_refused(
        cli("dac", "edit", "--run", run, "-o", edits),
        edits,
        f"{run / UNET_LORA}: a symbolic link leading out of the DAC run (to {outside})",
    )
    assert_refused(
        cli("dac", "export", "--run", run, "-o", tmp_path / "bundle"),
        tmp_path / "bundle",
        "a symbolic link leading out of the DAC run",
    )
    (run / UNET_LORA).unlink()
    outside.rename(run / UNET_LORA)
    (run / "inside.safetensors").symlink_to(run / TEXT_LORA)  # a link inside the run is a file of the run
    (run / TEXT_LORA).rename(run / "inside.safetensors.real")
    (run / "inside.safetensors").unlink()
    (run / TEXT_LORA).symlink_to(run / "inside.safetensors.real")
    result = cli("dac", "edit", "--run", run, "-o", edits, "--num", 1, "--steps", 1)
    assert result.exit_code == 0, result.stderr


def test_an_adapter_whose_header_claims_more_than_the_file_holds_is_refused(cli, dac_run: Path, tmp_path: Path):
    edits = tmp_path / "edits"
    run = copied(dac_run, tmp_path, "run")
    content = (run / TEXT_LORA).read_bytes()
    (run / TEXT_LORA).write_bytes(struct.pack("<Q", 2**62) + content[8:])
    assert_refused(cli("dac", "edit", "--run", run, "-o", edits), edits, f"{run / TEXT_LORA}: not a safetensors file")
    (run / EDIT_EMBEDDINGS).write_bytes(struct.pack("<Q", 10**9) + b"{}")
    shutil.copy(dac_run / TEXT_LORA, run / TEXT_LORA)
    assert_refused(
        cli("dac", "edit", "--run", run, "-o", edits), edits, f"{run / EDIT_EMBEDDINGS}: not a safetensors file"
    )


@pytest.mark.parametrize("source", ["run", "bundle"])
def test_a_guidance_that_takes_the_sample_out_of_float32_is_refused_writing_nothing(
    cli, dac_run: Path, dac_bundle: Path, tmp_path: Path, source: str
):
    edits = tmp_path / "edits"
    option = ["--run", dac_run] if source == "run" else ["--bundle", dac_bundle]
    assert_refused(
        cli("dac", "edit", *option, "-o", edits, "--guidance", "1e39"),
        edits,
        "--guidance must be a finite number within float32's range, got 1e+39",
    )
    assert_refused(
        cli("dac", "edit", *option, "-o", edits, "--guidance", "3e38", "--num", 1, "--steps", 2),
        edits,
        "seed_0029.png: the sample holds NaN/inf values: the networks left float32's range (--guidance 3e+38",
    )
    assert np.isfinite(np.float32(3e38))  # finite as a setting: only the result shows it overflowed
