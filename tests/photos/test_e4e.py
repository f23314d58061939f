"""The e4e encoder: its ONNX graph in a bundle, strict loading of the official checkpoint layout, and codes
against the official formulation (:func:`cfdeploy.models.reference.e4e`).

The bundle tests come first: exporting needs the most memory, and the 1024 px file (1.2 GB) is made only
after them, for this module alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import synthetic_files
from cfdeploy.bundle import Bundle
from cfdeploy.checkpoints import E4ECheckpoint, load_e4e
from cfdeploy.contracts import encoder_contract
from cfdeploy.errors import CfdeployError
from cfdeploy.exporter import export_bundle, photo_like
from cfdeploy.files import sha256_file
from cfdeploy.models import reference
from cfdeploy.torchfiles import weights_sha256
from conftest import TOLERANCE, in_child, rel_l2, save_e4e_checkpoint

N_LATENT_1024 = 18
N_LATENT_64 = 10


def faces(batch: int, seed: int) -> torch.Tensor:
    """Photo-like inputs in [-1, 1] (smooth colour fields), as the aligned faces the encoder reads."""
    return torch.from_numpy(photo_like((batch, 3, 256, 256), np.random.default_rng(seed)))


def part(content: dict, prefix: str) -> dict[str, torch.Tensor]:
    """A checkpoint's ``encoder.*`` or ``decoder.*`` tensors under their own names."""
    return {key.removeprefix(prefix): value for key, value in content["state_dict"].items() if key.startswith(prefix)}


def decoder_sha256(content: dict) -> str:
    """The weights hash of a file's ``decoder.*`` generator, computed from the file's tensors directly."""
    return weights_sha256(part(content, "decoder."))


def test_bundle_records_the_encoder_and_its_generator(bundle_with_encoder, cfclip_64):
    encoder, out, manifest = bundle_with_encoder
    entry = dict(manifest["networks"]["encoder"])
    parity = entry.pop("parity")
    assert entry == encoder_contract(N_LATENT_64).as_dict()
    assert entry["inputs"] == [{"name": "images", "shape": ["batch", 3, 256, 256], "dtype": "float32"}]
    assert set(parity) == {"batch_1", "batch_3"}
    assert all(result["rel_l2"] <= encoder_contract(N_LATENT_64).parity_rel_l2 == 1e-5 for result in parity.values())
    assert manifest["source"]["encoder"] == str(encoder)
    assert manifest["source"]["encoder_sha256"] == sha256_file(encoder)
    encoder_generator = decoder_sha256(torch.load(encoder, weights_only=True))
    assert manifest["weights"]["encoder_generator_sha256"] == encoder_generator
    assert manifest["weights"]["generator_sha256"] == decoder_sha256(torch.load(cfclip_64, weights_only=True))
    assert encoder_generator != manifest["weights"]["generator_sha256"]  # synthetic files from different seeds

    bundle = Bundle(out)
    assert bundle.has_network("encoder") and not bundle.has_network("clip_text")
    assert bundle.contracts["encoder"] == encoder_contract(N_LATENT_64)
    assert bundle.network("encoder").path == out / "encoder.onnx"


def test_exported_encoder_convolutions_have_no_run_time_bias(bundle_with_encoder):
    _, out, _ = bundle_with_encoder
    graph = onnx.load_from_string(Bundle(out).network("encoder").content).graph
    initializers = {tensor.name for tensor in graph.initializer}
    convolutions = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convolutions) >= 100
    assert {node.input[2] for node in convolutions if len(node.input) == 3} <= initializers
    assert not {"CastLike", "Expand"} & {node.op_type for node in graph.node}


def test_exported_encoder_matches_the_official_formulation(bundle_with_encoder):
    encoder, out, _ = bundle_with_encoder
    session = onnxruntime.InferenceSession(Bundle(out).network("encoder").content, providers=["CPUExecutionProvider"])
    content = torch.load(encoder, weights_only=True)
    images = faces(2, seed=22)  # a batch above 1 (export checked batches 1 and 3 against cfdeploy's own encoder)
    got = session.run(None, {"images": images.numpy()})[0]
    assert got.shape == (2, N_LATENT_64, 512)
    with torch.no_grad():
        expected = reference.e4e(part(content, "encoder."), images, content["latent_avg"])
    assert rel_l2(got, expected) <= TOLERANCE


def test_export_refuses_an_encoder_for_another_generator_before_exporting(
    tmp_path, e4e_64, cfclip_256, clip_state_dict_file
):
    out = tmp_path / "bundle"
    with pytest.raises(CfdeployError) as refused:
        export_bundle(cfclip_256, clip_state_dict_file, out, encoder=e4e_64)
    assert str(refused.value) == (
        f"{e4e_64}: the encoder makes W+ codes of {N_LATENT_64} levels x 512, the CF-CLIP generator of "
        f"{cfclip_256} takes 14 x 512"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def e4e_1024(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An e4e checkpoint in the layout of ``e4e_ffhq_encode.pt`` (1.2 GB), deleted when this module is done."""
    path = tmp_path_factory.mktemp("official_e4e") / "e4e_ffhq_encode.pt"
    in_child(save_e4e_checkpoint, path, seed=11, size=1024)
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def official_content(e4e_1024: Path) -> dict:
    """The 1024 px file as torch reads it, for the independent reference."""
    return torch.load(e4e_1024, weights_only=True)


@pytest.fixture(scope="module")
def loaded(e4e_1024: Path) -> E4ECheckpoint:
    return load_e4e(e4e_1024)


def test_loads_the_official_layout_strictly(loaded, official_content):
    state = official_content["state_dict"]
    encoder_state = loaded.encoder.encoder.state_dict()
    assert list(encoder_state) == list(part(official_content, "encoder."))
    assert len(encoder_state) == 621
    assert all(torch.equal(value, state[f"encoder.{key}"]) for key, value in encoder_state.items())
    assert encoder_state["body.0.res_layer.0.num_batches_tracked"].dtype == torch.int64
    generator_state = loaded.generator.state_dict()
    assert sorted(generator_state) == sorted(part(official_content, "decoder."))
    assert loaded.generator_sha256() == decoder_sha256(official_content)
    assert torch.equal(loaded.latent_avg, official_content["latent_avg"])
    assert torch.equal(loaded.encoder.latent_avg, official_content["latent_avg"])
    assert (loaded.n_latent, loaded.style_dim, loaded.generator.config.size) == (N_LATENT_1024, 512, 1024)
    assert loaded.opts == official_content["opts"]


def test_codes_match_the_official_formulation(loaded, official_content):
    batch = 2
    images = faces(batch, seed=30)
    latent_avg = official_content["latent_avg"]
    with torch.no_grad():
        got = loaded.encoder(images)
        expected = reference.e4e(part(official_content, "encoder."), images, latent_avg)
    assert got.shape == (batch, N_LATENT_1024, 512)
    assert rel_l2(got, expected) <= TOLERANCE
    # The codes alone too, so that the mean W cannot hide an error; and codes a wrong formulation would change:
    # of a realistic size, every level offset from the first.
    codes, expected_codes = got - latent_avg, expected - latent_avg
    assert rel_l2(codes, expected_codes) <= TOLERANCE
    assert 0.1 < float(codes.std()) < 10
    assert float((codes[:, 1:] - codes[:, :1]).abs().amax(dim=2).min()) > 0.01


@pytest.mark.parametrize("shape", [(1, 3, 128, 128), (1, 3, 256, 255), (2, 1, 256, 256), (3, 256, 256)])
def test_refuses_images_that_are_not_256_px_rgb(loaded, shape):
    with pytest.raises(CfdeployError) as refused:
        loaded.encoder(torch.zeros(shape))
    assert str(refused.value) == (
        f"the e4e encoder takes images [batch, 3, 256, 256], got {list(shape)} (resize aligned faces to 256x256 first)"
    )


def compact_checkpoint() -> dict:
    """The official layout with every float tensor a view of one shared storage: a 10 MB file, for refusals,
    which depend on keys, shapes and single values only."""
    keys = synthetic_files.manifest("e4e_manifest.json")["keys"]
    storage = torch.zeros(max(math.prod(shape) for _, shape, _ in keys))
    state = {
        key: storage[: math.prod(shape)].view(shape) if dtype == "float32" else torch.tensor(0, dtype=torch.int64)
        for key, shape, dtype in keys
    }
    opts = synthetic_files.manifest("e4e_manifest.json")["checkpoint_opts"]
    return {"state_dict": state, "latent_avg": torch.zeros(N_LATENT_1024, 512), "opts": dict(opts)}


def with_nan(tensor: torch.Tensor) -> torch.Tensor:
    changed = tensor.clone()
    changed.view(-1)[7] = math.nan
    return changed


def _missing(content):
    del content["state_dict"]["encoder.body.5.res_layer.1.weight"]


def _unexpected(content):
    content["state_dict"]["encoder.styles.18.linear.weight"] = torch.zeros(512, 512)


def _wrong_shape(content):
    content["state_dict"]["encoder.styles.17.linear.weight"] = torch.zeros(512, 256)


def _nan(content):
    key = "encoder.body.3.res_layer.1.weight"
    content["state_dict"][key] = with_nan(content["state_dict"][key])


def _latent_avg_shape(content):
    content["latent_avg"] = torch.zeros(512)


def _latent_avg_inf(content):
    content["latent_avg"][4, 100] = math.inf


def _no_latent_avg(content):
    del content["latent_avg"]


def _psp_encoder(content):
    content["opts"]["encoder_type"] = "GradualStyleEncoder"


@pytest.mark.parametrize(
    "change,problem",
    [
        (_missing, "missing keys encoder.body.5.res_layer.1.weight"),
        (_unexpected, "unexpected keys encoder.styles.18.linear.weight"),
        (_wrong_shape, "wrong shapes encoder.styles.17.linear.weight [512, 256] (expected [512, 512])"),
        (_nan, "encoder.body.3.res_layer.1.weight has 1 NaN/inf values"),
        (_latent_avg_shape, "latent_avg is [512], expected [18, 512]"),
        (_latent_avg_inf, "latent_avg has 1 NaN/inf values"),
        (
            _no_latent_avg,
            "opts.start_from_latent_avg is set but the file has no latent_avg "
            "(the official code would sample a random one)",
        ),
        (_psp_encoder, "expected opts.encoder_type 'Encoder4Editing', found 'GradualStyleEncoder'"),
    ],
)
def test_refuses_a_damaged_checkpoint_in_one_line_naming_file_and_key(tmp_path, change, problem):
    content = compact_checkpoint()
    change(content)
    path = tmp_path / "e4e_ffhq_encode.pt"
    torch.save(content, path)
    with pytest.raises(CfdeployError) as refused:
        load_e4e(path)
    message = str(refused.value)
    del refused  # its traceback holds the loader's frames, this frame holds it: a GB-sized cycle until collected
    assert message == f"{path}: {problem}"


def test_inspect_identifies_an_e4e_checkpoint(cli, tmp_path):
    path = tmp_path / "e4e_ffhq_encode.pt"
    torch.save(compact_checkpoint(), path)
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    parameters = {"encoder": 0, "decoder": 0}  # the weights, biases and constant input; not BatchNorm's or blur buffers
    for key, shape, _ in synthetic_files.manifest("e4e_manifest.json")["keys"]:
        if key.rsplit(".", 1)[1] in ("weight", "bias", "input"):
            parameters[key.split(".", 1)[0]] += math.prod(shape)
    assert json.loads(result.stdout) == {
        "kind": "e4e encoder checkpoint",
        "resolution": 1024,
        "n_latent": N_LATENT_1024,
        "dataset_type": "ffhq_encode",
        "start_from_latent_avg": True,
        "parameters": {"encoder": parameters["encoder"], "generator": parameters["decoder"]},
    }


def test_codes_are_not_shifted_when_the_file_was_trained_without_the_mean(tmp_path):
    """``start_from_latent_avg`` off: the official inference adds nothing, and such files store no latent_avg."""
    content = compact_checkpoint()
    del content["latent_avg"]
    content["opts"]["start_from_latent_avg"] = False
    path = tmp_path / "e4e_without_mean.pt"
    torch.save(content, path)
    loaded = load_e4e(path)
    assert torch.equal(loaded.latent_avg, torch.zeros(N_LATENT_1024, 512))
    assert torch.equal(loaded.encoder.latent_avg, torch.zeros(N_LATENT_1024, 512))
