"""A ``cfdeploy batch`` rerun skips a shard only when the outputs its completion record names are on disk,
unchanged; deleted, corrupted or forged outputs are redone (planned without Ray: the plan is where this is decided)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfdeploy.backends import open_backend
from cfdeploy.serving.batch import BatchSettings, edit_shard, plan_batch


@pytest.fixture(scope="module")
def batch_out(tmp_path_factory, bundle_64):
    """Two shards of one code each, the first edited (as a worker would) and recorded done."""
    root = tmp_path_factory.mktemp("batch_records")
    shards = root / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    for name in ("first", "second"):
        np.save(shards / f"{name}.npy", rng.standard_normal((1, 10, 512)).astype(np.float32) * 0.1)
    settings = BatchSettings(bundle_64, str(shards), "blue dog", root / "out", None, 1.0, "onnxruntime", 1, 1, 1.0, 0.0)
    plan = plan_batch(settings)
    edit_shard(open_backend("onnxruntime", plan.settings.bundle), plan.settings, shards / "first.npy")
    return settings


def pending(settings) -> tuple[list[str], dict[str, str]]:
    plan = plan_batch(settings)
    return sorted(shard.stem for shard in plan.pending), plan.redone


def test_a_shard_whose_recorded_outputs_are_intact_is_skipped(batch_out):
    assert pending(batch_out) == (["second"], {})


def test_a_shard_whose_recorded_png_was_deleted_or_changed_is_redone(batch_out):
    png = batch_out.out / "first" / "000000.png"
    content = png.read_bytes()
    try:
        png.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
        assert pending(batch_out) == (["first", "second"], {"first": "000000.png changed since it was recorded"})
        png.unlink()
        assert pending(batch_out) == (["first", "second"], {"first": "000000.png is recorded but missing"})
    finally:
        png.write_bytes(content)
    assert pending(batch_out) == (["second"], {})


def test_a_forged_or_damaged_record_does_not_make_a_shard_done(batch_out):
    record = batch_out.out / "_done" / "second.json"
    source = json.loads((batch_out.out / "_done" / "first.json").read_text())
    try:
        record.write_text(json.dumps({**source, "shard": "second"}))  # another shard's content: the sha256 differs
        assert pending(batch_out)[1] == {"second": "the shard changed since it was edited"}
        record.write_text("{not json")
        assert pending(batch_out)[1] == {"second": "its completion record is damaged"}
    finally:
        record.unlink()
