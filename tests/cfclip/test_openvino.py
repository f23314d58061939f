"""The OpenVINO backend: the same bundles as ONNX Runtime, fp32 within rel-L2 1e-5 of it, bf16 where the CPU has it.

bf16 needs a CPU with AMX or AVX-512 BF16: its fidelity test runs there and is skipped, saying why, elsewhere; its
refusal is tested with an injected feature set (OpenVINO's inference itself is never replaced).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cfdeploy.backends import BACKENDS, PRESETS, default_bundle_backend, open_backend
from cfdeploy.backends.openvino_backend import OpenVinoBackend
from cfdeploy.bundle import Bundle
from cfdeploy.environment import bf16_missing, cpu_features
from cfdeploy.errors import CfdeployError
from cfdeploy.openvino_graphs import network_precision, openvino_device
from conftest import messages, rel_l2

NO_BF16 = frozenset({"sse4_2", "avx2", "fma"})  # an AVX2 CPU: neither AMX nor AVX-512 BF16
BF16_MISSING = bf16_missing(cpu_features())


def sample_inputs(backend, network: str, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    w_plus = (batch, backend.n_latent, backend.style_dim)
    return {
        "clip_text": {"tokens": backend.tokenize(["green lipstick", "a blue dog", "red hair"][:batch])},
        "text_mapper": {"text_features": rng.standard_normal((batch, 512)).astype(np.float32)},
        "latent_editor": {
            "w": rng.standard_normal(w_plus).astype(np.float32),
            "text_latents": rng.standard_normal(w_plus).astype(np.float32),
            "strength": np.array([1.0], np.float32),
        },
        "mapping": {"z": rng.standard_normal((batch, 512)).astype(np.float32)},
        "generator": {"latents": (0.5 * rng.standard_normal(w_plus)).astype(np.float32)},
        "encoder": {"images": rng.uniform(-1, 1, (batch, 3, 256, 256)).astype(np.float32)},
    }[network]


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Image-space PSNR with both images clipped to [-1, 1] (a peak-to-peak of 2)."""
    error = np.mean((np.clip(image, -1, 1) - np.clip(reference, -1, 1)) ** 2)
    return float(10 * np.log10(4.0 / error)) if error > 0 else float("inf")


def test_openvino_fp32_matches_onnx_runtime_on_the_clip_text_graph_and_the_generator(bundle_64):
    openvino, onnxruntime = open_backend("openvino", bundle_64), open_backend("onnxruntime", bundle_64)
    for network in ("clip_text", "generator"):
        inputs = sample_inputs(openvino, network, 1)
        assert rel_l2(openvino.run(network, **inputs), onnxruntime.run(network, **inputs)) <= 1e-5, network


@pytest.mark.skipif(BF16_MISSING is not None, reason=f"no bf16 here: {BF16_MISSING}")
def test_bf16_images_stay_within_40_db_of_fp32_at_256_px(bundle_256):
    bf16, fp32 = open_backend("openvino", bundle_256, precision="bf16"), open_backend("openvino", bundle_256)
    latents = sample_inputs(fp32, "generator", 2)["latents"]
    assert psnr(bf16.synthesize(latents), fp32.synthesize(latents)) >= 40.0
    assert bf16.describe()["networks"] == {"generator": "bf16: as asked"}


def test_openvino_fp32_matches_onnx_runtime_on_every_network_of_a_64_px_bundle_at_batch_1_and_3(
    bundle_with_encoder,
):
    """Each runtime holds the 600 MB encoder: ONNX Runtime's outputs are taken and its backend closed before
    OpenVINO's opens, so the two are never in memory together."""
    _, bundle, _ = bundle_with_encoder
    onnxruntime = open_backend("onnxruntime", bundle)
    networks = [name for name in onnxruntime.bundle.contracts if onnxruntime.bundle.has_network(name)]
    assert {"encoder", "text_mapper", "latent_editor", "generator", "mapping"} <= set(networks)
    cases = [
        (network, batch, sample_inputs(onnxruntime, network, batch))
        for batch in (1, 3)
        for network in networks
        if network != "encoder"
        or batch == 1  # the slowest graph by far: its batch is the same Conv batch as the generator's
    ]
    expected = [onnxruntime.run(network, **inputs) for network, _, inputs in cases]
    del onnxruntime
    gc.collect()
    openvino = open_backend("openvino", bundle)
    for (network, batch, inputs), wanted in zip(cases, expected, strict=True):
        found = openvino.run(network, **inputs)
        assert found.shape == wanted.shape and found.dtype == np.float32, (network, batch)
        assert rel_l2(found, wanted) <= 1e-5, (network, batch)
    assert openvino.describe()["networks"] == dict.fromkeys(networks, "fp32: as asked")


def test_bf16_is_refused_in_one_line_on_a_cpu_without_amx_or_avx512_bf16(bundle_with_encoder):
    _, bundle, _ = bundle_with_encoder
    with pytest.raises(CfdeployError) as refused:
        OpenVinoBackend(Bundle(bundle), precision="bf16", features=NO_BF16)
    assert str(refused.value) == (
        "--precision bf16: this CPU has neither AMX (amx_bf16) nor AVX-512 BF16 (avx512_bf16), so bf16 would run "
        "slower than fp32; use fp32"
    )


def test_bf16_runs_the_convolution_networks_only_and_says_why_the_others_stay_fp32():
    assert network_precision("generator", "bf16") == ("bf16", "bf16: as asked")
    assert network_precision("encoder", "bf16") == ("bf16", "bf16: as asked")
    for network in ("clip_text", "text_mapper", "latent_editor", "mapping"):
        assert network_precision(network, "bf16") == ("fp32", "fp32: small or run once per prompt, kept exact")
    assert network_precision("generator", "fp32") == ("fp32", "fp32: as asked")


def test_devices_are_openvinos_and_an_absent_one_is_refused_naming_what_there_is():
    assert openvino_device("cpu", ["CPU", "GPU.0", "GPU.1"]) == "CPU"
    assert openvino_device("gpu", ["CPU", "GPU.0", "GPU.1"]) == "GPU"
    assert openvino_device("gpu.1", ["CPU", "GPU.0", "GPU.1"]) == "GPU.1"
    with pytest.raises(CfdeployError, match=r"^--device cuda: the openvino backend runs on OpenVINO's devices; this "):
        openvino_device("cuda", ["CPU"])


def test_a_graph_changed_after_hashing_is_refused(bundle_with_encoder, cli, tmp_path, embedding_file):
    _, bundle, _ = bundle_with_encoder
    changed = tmp_path / "changed"
    shutil.copytree(bundle, changed, copy_function=os.link)  # hard links: a copy made in no time
    mapping = changed / "mapping.onnx"
    content = bytearray(mapping.read_bytes())
    content[-1] ^= 1
    mapping.unlink()  # the link, not the original bundle's file
    mapping.write_bytes(bytes(content))
    result = cli(
        "edit", "--bundle", changed, "--backend", "openvino", "--seed", "1", "--text-embedding", embedding_file,
        "--no-session-cache", "-o", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 2
    refusal = messages(result.stderr)
    assert refusal.count("\n") == 0
    assert refusal.startswith(f"error: {mapping}: sha256 ")
    assert refusal.endswith("(file changed or damaged)")


def test_edit_runs_on_openvino_and_records_how_in_edit_json(bundle_with_encoder, cli, tmp_path, embedding_file):
    import json

    _, bundle, _ = bundle_with_encoder
    for run in ("first", "second"):
        result = cli(
            "edit", "--bundle", bundle, "--backend", "openvino", "--threads", "1", "--seed", "1",
            "--text-embedding", embedding_file, "-o", tmp_path / run,
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert "with openvino in" in result.stderr
    runtime = json.loads((tmp_path / "second" / "edit.json").read_text())["runtime"]
    assert (runtime["backend"], runtime["device"], runtime["threads"], runtime["precision"]) == (
        "openvino",
        "CPU",
        1,
        "fp32",
    )
    assert runtime["session_cache"] == dict.fromkeys(("mapping", "text_mapper", "latent_editor", "generator"), "hit")


def test_the_registry_lists_openvino_with_its_capabilities_and_bench_presets():
    info = BACKENDS["openvino"]
    assert (info.source, info.requires, info.precisions) == ("bundle", "openvino", ("fp32", "bf16"))
    assert info.devices == ("cpu", "gpu", "npu")
    assert {"device", "threads", "precision", "session_cache", "cache_max", "expect_manifest"} == set(info.options)
    assert PRESETS["openvino"].options == {"device": "cpu"}
    assert PRESETS["openvino-bf16"].options == {"device": "cpu", "precision": "bf16"}


def test_without_openvino_the_backend_names_the_extra_in_one_line(
    bundle_with_encoder, cli, tmp_path, embedding_file, monkeypatch
):
    _, bundle, _ = bundle_with_encoder
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails, as in a core install
    result = cli(
        "edit", "--bundle", bundle, "--backend", "openvino", "--seed", "1", "--text-embedding", embedding_file,
        "-o", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr == (
        'error: the openvino backend needs openvino, which this install lacks: pip install "cfdeploy[openvino]"\n'
    )
    assert default_bundle_backend(frozenset({"avx512f"}), None) == "onnxruntime"


def test_the_default_bundle_backend_is_openvino_only_where_it_is_faster_and_installed():
    def everything(package: str) -> bool:
        return True

    assert default_bundle_backend(frozenset({"avx512f", "avx2"}), None, everything) == "openvino"
    assert default_bundle_backend(frozenset({"amx_tile"}), "cpu", everything) == "openvino"
    assert default_bundle_backend(frozenset({"avx2", "fma"}), None, everything) == "onnxruntime"
    assert default_bundle_backend(frozenset({"avx512f"}), "cuda", everything) == "onnxruntime"
    assert default_bundle_backend(frozenset({"avx512f"}), None, lambda package: False) == "onnxruntime"


def test_external_weights_are_read_from_the_verified_bytes_never_from_the_working_directory(tmp_path, monkeypatch):
    import onnx
    from onnx import helper, numpy_helper

    from cfdeploy.bundle_files import VerifiedGraph
    from cfdeploy.openvino_graphs import CompiledGraphs

    weights = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "weights")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weights"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    content, data = (tmp_path / "m.onnx").read_bytes(), (tmp_path / "m.onnx.data").read_bytes()
    monkeypatch.chdir(tmp_path)  # where OpenVINO would look for m.onnx.data if it read the graph from memory
    (tmp_path / "m.onnx.data").write_bytes(np.full(6, 7.0, np.float32).tobytes())  # not the verified weights
    verified = {"given": VerifiedGraph(Path("m.onnx"), content, {"m.onnx.data": data})}
    verified["hostile"] = VerifiedGraph(Path("m.onnx"), content)  # names external weights the manifest lacks
    graphs = CompiledGraphs(verified.__getitem__, lambda name: name, lambda name: None, threads=1)
    x = np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(graphs("given", x=x), [[3.0, 5.0, 7.0]])
    with pytest.raises(CfdeployError, match=r"^m.onnx: OpenVINO cannot load this graph: "):
        graphs("hostile", x=x)


def test_inspect_system_reports_the_cpu_features_that_decide_bf16_and_the_default_backend(cli):
    result = cli("inspect", "--system", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    flags = next(
        set(line.partition(":")[2].split())
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.partition(":")[0].strip() in ("flags", "Features")
    )
    has_bf16 = bool({"amx_bf16", "avx512_bf16"} & flags)
    assert report["bf16"].startswith("native") == has_bf16
    assert ("openvino" if {"avx512f", "amx_tile"} & flags else "onnxruntime") == report["edit --bundle runs on"]
    assert set(report["cpu features"].split()) <= flags and ("avx2" in flags) == ("avx2" in report["cpu features"])
    assert "openvino " in report["runtimes"] and "CPU" in report["openvino devices"]
