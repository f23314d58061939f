"""Hostile or careless inputs around the edit: numbers finite in float64 but not in float32 (what the networks
compute in) are refused and a non-finite result is an error, never a black image; prompts too long to tokenise
quickly are refused before tokenising; messages quote a short prefix; a refusal is one line, whatever libraries warn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfdeploy.errors import CfdeployError, require_finite
from cfdeploy.inputs import load_latents
from cfdeploy.serving.protocol import BundleInfo, RequestError, parse_edit_request
from conftest import assert_refused


def test_latents_beyond_float32_in_a_float64_file_are_refused(tmp_path):
    latents = np.zeros((1, 14, 512))
    latents[0, 3, 7] = 1e300
    path = tmp_path / "huge.npy"
    np.save(path, latents)
    with pytest.raises(CfdeployError, match=r"huge\.npy: latents contain 1 NaN/inf values \(1 beyond float32's range"):
        load_latents(path, 14)


@pytest.mark.parametrize("value", [1e39, -1e39, float("nan"), float("inf")])
def test_settings_that_overflow_float32_are_refused(value):
    with pytest.raises(CfdeployError, match="--strength must be a finite number within float32's range"):
        require_finite(strength=value)
    require_finite(strength=3.0e38)


@pytest.mark.parametrize("field", ["strength", "truncation"])
def test_a_request_number_beyond_float32_is_a_400(field):
    served = {"b": BundleInfo("b", 64, 10, 512, (), None, "onnxruntime", has_clip=True, has_encoder=False)}
    body = json.dumps({"bundle": "b", "prompt": "blue dog", "seed": 1, field: 1e39}).encode()
    with pytest.raises(RequestError, match=f"{field} must be a finite number within float32's range") as refused:
        parse_edit_request(body, served)
    assert refused.value.status == 400


def test_edit_refuses_strength_and_truncation_that_overflow_float32(cli, bundle_64, tmp_path):
    out = tmp_path / "out"
    for option, value in (("--strength", "1e39"), ("--truncation", "1e39")):
        assert_refused(
            cli("edit", "--bundle", bundle_64, "--text", "blue dog", "--seed", 1, option, value, "-o", out),
            out,
            f"{option} must be a finite number within float32's range, got 1e+39",
        )


def test_an_edit_that_leaves_float32_is_refused_and_writes_nothing(cli, bundle_64, tmp_path):
    """Latents finite in float32 but so large that the networks overflow: refused, never a black PNG."""
    huge = tmp_path / "huge.npy"
    np.save(huge, np.full((1, 10, 512), 3e38, np.float32))
    out = tmp_path / "out"
    assert_refused(
        cli("edit", "--bundle", bundle_64, "--text", "blue dog", "--latents", huge, "-o", out),
        out,
        "hold NaN/inf values",
        "took the networks out of float32's range",
    )


def test_a_huge_one_word_prompt_is_refused_before_tokenising_in_milliseconds():
    import time

    from cfdeploy.tokenizer import ClipTokenizer

    tokenizer = ClipTokenizer()
    started = time.perf_counter()
    with pytest.raises(CfdeployError, match=r"is 100,000 characters; at most 2,000 are read"):
        tokenizer(["x" * 100_000])
    assert time.perf_counter() - started < 1.0  # the quadratic merge would take minutes: this is not a timing target


def test_an_error_quotes_a_short_prefix_of_what_it_refuses_not_all_of_it():
    served = {"b": BundleInfo("b", 64, 10, 512, (), None, "onnxruntime", has_clip=True, has_encoder=False)}
    body = json.dumps({"bundle": "b", "x" * 1_000_000: 1}).encode()
    with pytest.raises(RequestError) as refused:
        parse_edit_request(body, served)
    message = str(refused.value)
    assert message.startswith("unknown field(s) xxxx") and len(message) <= 500
    assert message.endswith(" characters in all)") and "(1,000," in message[-40:], message[-60:]


def test_a_library_warning_beside_a_refusal_is_dropped_and_shown_after_a_success(capsys):
    import warnings

    import typer

    from cfdeploy.cli.common import user_errors

    @user_errors
    def command(refuse: bool) -> str:
        warnings.warn("a library's aside", UserWarning, stacklevel=1)
        if refuse:
            raise CfdeployError("refused")
        return "done"

    with pytest.raises(typer.Exit):
        command(True)
    assert "a library's aside" not in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert command(False) == "done"
    assert [str(warning.message) for warning in shown] == ["a library's aside"]
