"""The TensorRT logic that needs no GPU: profiles, precision plans, the engine cache key, locks and CLI refusals."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from cfdeploy.contracts import network_contracts
from cfdeploy.errors import CfdeployError
from cfdeploy.trt.plan import (
    BatchProfile,
    EngineKey,
    batch_chunks,
    batch_profile,
    check_engine,
    engine_paths,
    keeps_fp32,
    key_mismatches,
    network_precision,
    parse_bytes,
)

KEY = EngineKey("generator", "ab" * 32, "10.3.0", "Orin", "8.7", "mixed", (1, 4, 8), False)


def test_batch_profiles_follow_the_options_and_refuse_bad_ones():
    assert batch_profile(1, None, 8) == BatchProfile(1, 8, 8)
    assert batch_profile(2, 4, 16) == BatchProfile(2, 4, 16) and not batch_profile(2, 4, 16).static
    assert batch_profile(static_batch=4) == BatchProfile(4, 4, 4) and batch_profile(static_batch=4).static
    with pytest.raises(CfdeployError, match=r"1 <= --min-batch <= --opt-batch <= --max-batch, got 4, 2, 8"):
        batch_profile(4, 2, 8)
    with pytest.raises(CfdeployError, match="--static-batch must be 1 or more, got 0"):
        batch_profile(static_batch=0)


@pytest.mark.parametrize(
    "batch,profile,chunks",
    [
        (5, BatchProfile(1, 4, 4), [(0, 4, 4), (4, 5, 1)]),
        (3, BatchProfile(4, 4, 4), [(0, 3, 4)]),
        (9, BatchProfile(4, 4, 4), [(0, 4, 4), (4, 8, 4), (8, 9, 4)]),
        (1, BatchProfile(2, 4, 8), [(0, 1, 2)]),
        (8, BatchProfile(1, 8, 8), [(0, 8, 8)]),
    ],
)
def test_batches_are_cut_to_the_profile_maximum_and_padded_to_its_minimum(batch, profile, chunks):
    assert batch_chunks(batch, profile) == chunks


def test_precision_plan_follows_contracts_and_keeps_mappers_fp32():
    contracts = network_contracts(256, 14)
    defaults = {name: network_precision(contract, None) for name, contract in contracts.items()}
    assert defaults == {
        "clip_text": "fp16",
        "text_mapper": "fp32",
        "latent_editor": "fp32",
        "generator": "mixed",
        "mapping": "fp32",
    }
    forced = {name: network_precision(contract, "fp16") for name, contract in contracts.items()}
    assert forced == {**defaults, "clip_text": "fp16", "generator": "fp16"}
    assert {name: network_precision(c, "fp32") for name, c in contracts.items()} == dict.fromkeys(contracts, "fp32")
    assert [name for name, c in contracts.items() if c.refittable] == ["text_mapper", "latent_editor"]
    with pytest.raises(CfdeployError, match="unknown precision 'int8'"):
        network_precision(contracts["generator"], "int8")


@pytest.mark.parametrize(
    "precision,kind,channels,pinned",
    [
        ("mixed", "CONVOLUTION", 512, False),  # the main modulated convolutions: fp16
        ("mixed", "DECONVOLUTION", 512, False),  # upsampling convolutions: fp16
        ("mixed", "CONVOLUTION", 3, True),  # ToRGB
        ("mixed", "DECONVOLUTION", 3, True),  # the RGB skip's upsampling
        ("mixed", "REDUCE", 512, True),  # demodulation sums
        ("mixed", "ELEMENTWISE", 512, True),  # style scaling, noise, bias
        ("mixed", "NORMALIZATION", None, True),
        ("fp16", "REDUCE", 512, False),
        ("fp32", "ELEMENTWISE", 512, False),
    ],
)
def test_mixed_precision_pins_everything_but_heavy_non_rgb_layers(precision, kind, channels, pinned):
    assert keeps_fp32(precision, kind, channels) is pinned


@pytest.mark.parametrize(
    "text,expected", [("2GiB", 2 << 30), ("512M", 512 << 20), ("1.5g", 3 << 29), ("1048576", 1 << 20)]
)
def test_workspace_sizes_are_parsed_with_binary_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1G", "1k", ""])
def test_bad_workspace_sizes_are_refused(text):
    with pytest.raises(CfdeployError, match=r"--workspace"):
        parse_bytes(text)


def store(engine_dir, key: EngineKey) -> None:
    engine_path, key_path = engine_paths(engine_dir, key.network)
    engine_path.write_bytes(b"plan")
    key_path.write_text(json.dumps(key.as_dict()))


def test_matching_engine_is_accepted(tmp_path):
    store(tmp_path, KEY)
    assert check_engine(tmp_path, KEY) == tmp_path / "generator.engine"
    assert EngineKey.from_dict(KEY.as_dict(), tmp_path) == KEY


@pytest.mark.parametrize(
    "change,message",
    [
        ({"onnx_sha256": "cd" * 32}, "ONNX graph sha256: engine has abababababab…, wanted cdcdcdcdcdcd…"),
        ({"tensorrt_version": "10.13.0"}, "TensorRT version: engine has 10.3.0, wanted 10.13.0"),
        ({"gpu_name": "NVIDIA H100"}, "GPU: engine has Orin, wanted NVIDIA H100"),
        ({"compute_capability": "9.0"}, "compute capability: engine has 8.7, wanted 9.0"),
        ({"precision": "fp32"}, "precision: engine has mixed, wanted fp32"),
        ({"profile": (4, 4, 4)}, "batch profile (min, opt, max): engine has (1, 4, 8), wanted (4, 4, 4)"),
        ({"refittable": True}, "refittable: engine has False, wanted True"),
    ],
)
def test_each_kind_of_mismatch_is_refused_by_name(tmp_path, change, message):
    store(tmp_path, KEY)
    wanted = replace(KEY, **change)
    assert key_mismatches(KEY, wanted) == [message]
    with pytest.raises(CfdeployError) as refused:
        check_engine(tmp_path, wanted)
    assert (
        str(refused.value)
        == f"{tmp_path / 'generator.engine'}: built for something else: {message} (rebuild with --rebuild)"
    )


def test_missing_engine_key_or_damaged_key_is_refused(tmp_path):
    with pytest.raises(
        CfdeployError, match=r"generator.engine: no engine for generator \(build it with cfdeploy build-engines\)"
    ):
        check_engine(tmp_path, KEY)
    (tmp_path / "generator.engine").write_bytes(b"plan")
    with pytest.raises(CfdeployError, match=r"generator.key.json: missing, so generator.engine cannot be checked"):
        check_engine(tmp_path, KEY)
    (tmp_path / "generator.key.json").write_text('{"format": "cfdeploy-engine-key/1", "network": "generator"}')
    with pytest.raises(CfdeployError, match=r"generator.key.json: engine key is incomplete \(KeyError"):
        check_engine(tmp_path, KEY)


def test_second_writer_waits_then_gives_up_with_a_clear_message(tmp_path):
    from cfdeploy.outputs import DirectoryLock

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with DirectoryLock(bundle):
        message = (
            rf"{bundle}: another cfdeploy run is writing this directory \(pid {os.getpid()} on .*\); gave up after 0.3s"
        )
        with pytest.raises(CfdeployError, match=message):
            with DirectoryLock(bundle, timeout=0.3):
                pass
    with DirectoryLock(bundle, timeout=0.3):
        pass  # released on exit


def test_refit_matches_weights_by_name_and_shape_and_lists_the_changed():
    from cfdeploy.refit import WeightInfo, match_weights

    old = {"a": WeightInfo((2, 3), "x"), "b": WeightInfo((4,), "y")}
    assert match_weights("text_mapper", old, {"a": WeightInfo((2, 3), "x"), "b": WeightInfo((4,), "z")}) == ["b"]
    with pytest.raises(
        CfdeployError, match=r"text_mapper: cannot place the checkpoint's weight c \[4\]: .* \(and 1 more\)"
    ):
        match_weights("text_mapper", old, {"a": WeightInfo((2, 3), "x"), "c": WeightInfo((4,), "y")})
    with pytest.raises(CfdeployError, match=r"weight a \[3, 2\]: the bundle's is \[2, 3\]"):
        match_weights("text_mapper", old, {"a": WeightInfo((3, 2), "x"), "b": WeightInfo((4,), "y")})


def test_generator_hash_depends_on_values_not_on_key_order():
    from cfdeploy.torchfiles import weights_sha256

    state = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    same = {"a": state["a"].clone(), "b": state["b"].t().contiguous().t()}
    assert weights_sha256(state) == weights_sha256(same)
    changed = {**state, "b": state["b"] + 1e-6}
    assert weights_sha256(changed) != weights_sha256(state)
    assert weights_sha256({**state, "a": state["a"].float()}) != weights_sha256(state)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["build-engines", "--bundle", "{bundle}", "--workspace", "lots"],
            "--workspace 'lots': expected a size such as 512MiB or 2GiB",
        ),
        (
            ["build-engines", "--bundle", "{bundle}", "--min-batch", "4", "--max-batch", "2"],
            "1 <= --min-batch <= --opt-batch <= --max-batch",
        ),
        (["build-engines", "--bundle", "{tmp}/missing"], "no such bundle directory"),
    ],
)
def test_build_engines_refuses_bad_options_before_touching_tensorrt(tmp_path, cli, args, message):
    result = cli(*(arg.format(bundle=tmp_path, tmp=tmp_path) for arg in args))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_onnxruntime_gpu_provider_options_follow_the_network_precision(tmp_path):
    from cfdeploy.devices import onnxruntime_providers
    from cfdeploy.sessions import provider_options

    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen, on_gpu = onnxruntime_providers("cuda:1", providers)
    assert chosen == providers and on_gpu == [{"device_id": "1"}, {"device_id": "1"}, {}]
    generator = provider_options(chosen, on_gpu, "mixed", tmp_path)
    assert generator[0] == {
        "device_id": "1",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(tmp_path),
        "trt_fp16_enable": "True",
    }
    assert generator[1]["cudnn_conv_algo_search"] == "EXHAUSTIVE" and generator[1]["device_id"] == "1"
    assert generator[2] == {}
    assert provider_options(chosen, on_gpu, "fp32", tmp_path)[0]["trt_fp16_enable"] == "False"
    assert provider_options(["CPUExecutionProvider"], [{}], "fp16", tmp_path) == [{}]
    assert onnxruntime_providers("cpu", providers) == (["CPUExecutionProvider"], [{}])


def test_engine_help_shows_defaults_and_shared_profile_options(cli):
    for command in ("build-engines", "export"):
        text = " ".join(cli(command, "--help").stdout.replace("│", " ").split())
        assert "--static-batch" in text and "--workspace" in text and "[default: --max-batch]" in text, text
    assert "[default: BUNDLE/tensorrt]" in " ".join(cli("build-engines", "--help").stdout.replace("│", " ").split())


def test_short_batches_are_padded_with_their_last_row():
    import numpy as np

    from cfdeploy.trt.plan import pad_batch

    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    padded = pad_batch(rows, 4)
    assert padded.shape == (4, 3) and np.array_equal(padded[:2], rows) and np.array_equal(padded[2:], rows[[1, 1]])
    assert pad_batch(rows, 2) is rows and pad_batch(rows, 1) is rows


def test_build_plan_keeps_builds_refuses_and_rebuilds(tmp_path):
    from cfdeploy.trt.plan import plan_builds

    mapper = replace(KEY, network="text_mapper", precision="fp32", refittable=True)
    store(tmp_path, KEY)
    store(tmp_path, mapper)
    assert plan_builds(tmp_path, [KEY, mapper], rebuild=False) == []
    new_clip = replace(KEY, network="clip_text", precision="fp16")
    assert plan_builds(tmp_path, [KEY, new_clip], rebuild=False) == [new_clip]
    other_gpu = replace(mapper, gpu_name="NVIDIA H100", compute_capability="9.0")
    with pytest.raises(CfdeployError) as refused:
        plan_builds(tmp_path, [KEY, new_clip, other_gpu], rebuild=False)  # refused before anything is built
    assert str(refused.value) == (
        f"{tmp_path}: engines exist for something else: text_mapper.engine: GPU: engine has "
        "Orin, wanted NVIDIA H100; compute capability: engine has 8.7, wanted 9.0 (use --rebuild)"
    )
    assert plan_builds(tmp_path, [KEY, other_gpu], rebuild=True) == [other_gpu]
    (tmp_path / "generator.key.json").write_text("{not json")
    with pytest.raises(CfdeployError, match=r"generator\.key\.json: not valid JSON"):
        plan_builds(tmp_path, [KEY], rebuild=False)
    assert plan_builds(tmp_path, [KEY], rebuild=True) == [KEY]


def test_runtime_accepts_any_precision_and_profile_but_not_another_gpu_or_graph(tmp_path):
    from cfdeploy.trt.plan import check_runnable

    store(tmp_path, KEY)
    assert check_runnable(tmp_path, "generator", KEY.onnx_sha256, "10.3.0", ("Orin", "8.7")) == KEY
    with pytest.raises(
        CfdeployError, match=r"GPU: engine has Orin, wanted NVIDIA H100; compute capability: engine has 8.7, wanted 9.0"
    ):
        check_runnable(tmp_path, "generator", KEY.onnx_sha256, "10.3.0", ("NVIDIA H100", "9.0"))
    with pytest.raises(CfdeployError, match=r"ONNX graph sha256: engine has abababababab…, wanted 000000000000…"):
        check_runnable(tmp_path, "generator", "0" * 64, "10.3.0", ("Orin", "8.7"))
    with pytest.raises(CfdeployError, match=r"mapping.engine: no engine \(with its key\) for mapping"):
        check_runnable(tmp_path, "mapping", KEY.onnx_sha256, "10.3.0", ("Orin", "8.7"))


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from cfdeploy.outputs import write_atomic

    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "generator.engine", b"plan")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "generator.engine").stat().st_mode) == 0o644
    assert (tmp_path / "generator.engine").read_bytes() == b"plan" and len(list(tmp_path.iterdir())) == 1
