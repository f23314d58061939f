"""What ``cfdeploy batch`` reads and where it writes: its own outputs are never shards, non-files among the shards are
skipped with a line each, an ``--out`` that is, holds or lies inside an input is refused even with ``--force``, and a
second run into one ``--out`` is told which run holds it. Planned without Ray: no shard here is left to edit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cfdeploy.backends import open_backend
from cfdeploy.errors import CfdeployError
from cfdeploy.serving.batch import RUN_RECORD, BatchSettings, edit_shard, plan_batch
from conftest import assert_refused

PROMPT = "green lipstick"  # precomputed in bundle_64


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """One shard, and a FIFO and a dangling link named like shards."""
    data = tmp_path.resolve() / "data"
    data.mkdir()
    np.save(data / "codes.npy", np.random.default_rng(0).standard_normal((1, 10, 512)).astype(np.float32) * 0.1)
    os.mkfifo(data / "pipe.npy")
    (data / "gone.npy").symlink_to(tmp_path / "nowhere.npy")
    return data


def test_a_rerun_with_a_recursive_glob_over_its_output_skips_its_results_non_files_and_clears_debris(
    bundle_64: Path, cli, data: Path
):
    out = data / "edits"
    settings = BatchSettings(bundle_64, f"{data}/**/*.npy", PROMPT, out, None, 1.0, "onnxruntime", 1, 1, 1.0, 0.0)
    skipped = [
        f"{data / 'gone.npy'}: a dangling symbolic link (to {data.parent / 'nowhere.npy'}); skipped",
        f"{data / 'pipe.npy'}: a FIFO, not a regular file; skipped",
    ]
    plan = plan_batch(settings)
    assert (plan.shards, plan.skipped) == ([data / "codes.npy"], skipped)
    edit_shard(open_backend("onnxruntime", plan.settings.bundle), plan.settings, data / "codes.npy")
    assert (out / "codes" / "latents.npy").is_file()  # matched by the glob: a shard named "latents" to the old code

    killed = [out / "_done" / f".codes.json.{os.getpid()}.0badf00d.partial", out / "._batch.json.7.12345678.partial"]
    for debris in killed:  # a run killed while writing a record: its workers were on other hosts, perhaps
        debris.write_text("{")
    result = cli("batch", "--bundle", bundle_64, "--latents", f"{data}/**/*.npy", "--text", PROMPT, "--out", out)
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line.removeprefix("warning: ") for line in lines if line.startswith("warning: ")] == skipped, lines
    assert "0 shard(s) edited (0 images), 1 already done, of 1" in result.stderr, lines
    assert sorted(path.name for path in out.iterdir()) == ["_batch.json", "_done", "codes"]
    assert [path.name for path in (out / "_done").iterdir()] == ["codes.json"]


def test_an_output_that_is_holds_or_lies_in_an_input_is_refused_even_with_force(
    bundle_64: Path, cli, data: Path, tmp_path: Path
):
    bundle = bundle_64.resolve()  # the run reads the bundle's real path, so messages name it

    def refused(out: Path, latents: Path | str, *extra: object) -> str:
        result = cli("batch", "--bundle", bundle, "--latents", latents, "--out", out, "--force", *extra)
        assert_refused(result, None)
        return result.stderr.strip().removeprefix("error: ")

    assert refused(bundle / "edits", data, "-t", PROMPT) == (
        f"{bundle / 'edits'}: lies inside the input {bundle}; choose an output outside it"
    )
    assert not (bundle / "edits").exists()
    assert refused(bundle.parent, data, "-t", PROMPT) == (
        f"{bundle.parent}: contains the input {bundle}; choose another output"
    )
    assert refused(data, f"{data}/codes.npy", "-t", PROMPT) == (
        f"{data}: contains the input {data / 'codes.npy'}; choose another output"
    )
    shards = tmp_path / "shards"
    shards.mkdir()
    (data / "codes.npy").rename(shards / "codes.npy")
    np.save(data / "embedding.npy", np.ones(512, np.float32))
    assert refused(data, shards, "--text-embedding", data / "embedding.npy") == (
        f"{data}: contains the input {data / 'embedding.npy'}; choose another output"
    )
    assert sorted(path.name for path in data.iterdir()) == ["embedding.npy", "gone.npy", "pipe.npy"]
    assert not (bundle.parent / "_batch.json").exists() and not (bundle.parent / "_done").exists()


HOLDER = """
import sys, time
from pathlib import Path
from cfdeploy.outputs import DirectoryLock

with DirectoryLock(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_second_run_into_one_output_is_told_which_run_holds_it(bundle_64: Path, data: Path, tmp_path: Path):
    out = tmp_path / "edits"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        settings = BatchSettings(bundle_64, str(data), PROMPT, out, None, 1.0, "onnxruntime", 1, 1, 1.0, 0.0)
        with pytest.raises(CfdeployError) as refused:
            plan_batch(settings)
        message = str(refused.value)
        assert message.startswith(
            f"{out.resolve()}: another cfdeploy run is writing this directory (pid {holder.pid} on "
        )
        assert message.endswith(f": -c {out})"), message
        assert not (out / RUN_RECORD).exists()
    finally:
        holder.kill()
        holder.wait()
    assert plan_batch(settings).pending == [data / "codes.npy"]
