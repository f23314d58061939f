"""``cfdeploy batch`` on a local Ray with 2 CPUs: exactly once through a killed worker, equal to ``cfdeploy edit``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from conftest import assert_refused, own_ray, ray_is_connected

PROMPT = "green lipstick"  # precomputed in bundle_64


SHARDS, IMAGES = 6, 4  # two workers, one killed after its first shard: work is left for Ray to retry


def test_batch_survives_a_killed_worker_and_writes_every_image_once(bundle_64: Path, cli, tmp_path: Path) -> None:
    shards, out = tmp_path / "shards", tmp_path / "edits"
    shards.mkdir()
    for index in range(SHARDS):
        np.save(
            shards / f"part{index}.npy",
            np.random.default_rng(100 + index).standard_normal((IMAGES, 10, 512)).astype(np.float32),
        )
    np.save(shards / "wrong.npy", np.zeros((2, 14, 512), np.float32))  # refused by its worker; the others go on
    command = [
        sys.executable,
        "-m",
        "cfdeploy",
        "batch",
        "--bundle",
        str(bundle_64),
        "--latents",
        str(shards),
        "--text",
        PROMPT,
        "--out",
        str(out),
        "--workers",
        "2",
    ]
    refusal = (
        "error: 1 shard(s) refused, the others are done (rerun after fixing them): "
        f"{shards.resolve() / 'wrong.npy'}: latents have 14 levels"
    )
    with own_ray() as our_ray:  # the command's Ray, started by the child, which inherits RAY_TMPDIR
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while not list((out / "_done").glob("*.json")) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        [first] = list((out / "_done").glob("*.json"))[:1]
        victim = json.loads(first.read_text())["worker"]["pid"]
        os.kill(victim, signal.SIGKILL)  # mid-run: it has taken its next shard
        _, stderr = run.communicate(timeout=300)
        assert refusal in stderr and "Traceback" not in stderr, stderr  # Ray retried the killed worker's shard
        assert run.returncode == 2
        our_ray.assert_none_left()
    assert not (out / "_done" / "wrong.json").exists() and not (out / "wrong").exists()
    (shards / "wrong.npy").unlink()

    with own_ray() as our_ray:
        again = subprocess.run(command, capture_output=True, text=True, timeout=120)
        our_ray.assert_none_left()
    assert again.returncode == 0, again.stderr
    assert f"0 shard(s) edited (0 images), {SHARDS} already done, of {SHARDS}" in " ".join(again.stderr.split())
    for index in range(SHARDS):
        shard = out / f"part{index}"
        record = json.loads((out / "_done" / f"part{index}.json").read_text())
        assert sorted(path.name for path in shard.iterdir()) == [f"{i:06d}.png" for i in range(IMAGES)] + [
            "edit.json",
            "latents.npy",
        ]
        assert record["count"] == IMAGES
        for name, digest in record["files"].items():
            assert digest == hashlib.sha256((shard / name).read_bytes()).hexdigest()
    assert not [path for path in out.rglob("*") if path.name.endswith((".partial", ".old", ".lock"))]
    for index in (SHARDS - 1,):  # the last shard, edited after the kill; every shard runs the same code
        reference = tmp_path / f"reference{index}"
        assert (
            cli(
                "edit",
                "--bundle",
                bundle_64,
                "--backend",
                "onnxruntime",
                "--latents",
                shards / f"part{index}.npy",
                "--text",
                PROMPT,
                "--save-latents",
                "--out",
                reference,
            ).exit_code
            == 0
        )
        for image in range(IMAGES):
            assert (out / f"part{index}" / f"{image:06d}.png").read_bytes() == (
                reference / f"{image:06d}.png"
            ).read_bytes()
        assert np.array_equal(np.load(out / f"part{index}" / "latents.npy"), np.load(reference / "latents.npy"))


def test_batch_refuses_another_runs_output_and_bad_shards(
    bundle_64: Path, bundle_with_encoder, cli, tmp_path: Path
) -> None:
    with own_ray() as our_ray:
        out = tmp_path / "edits"
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        shards = tmp_path / "shards"
        shards.mkdir()
        np.save(shards / "a.npy", np.zeros((1, 10, 512), np.float32))
        assert_refused(
            cli("batch", "--bundle", bundle_64, "--latents", shards, "--text", PROMPT, "--out", out),
            None,
            f"{out}: is not empty and is not a cfdeploy batch output; pass --force to write into it",
        )
        assert_refused(
            cli(
                "batch",
                "--bundle",
                bundle_64,
                "--latents",
                tmp_path / "none",
                "--text",
                PROMPT,
                "--out",
                tmp_path / "o",
            ),
            tmp_path / "o",
            "no .npy shards found",
        )
        (shards / "b").mkdir()
        np.save(shards / "b" / "a.npy", np.zeros((1, 10, 512), np.float32))
        assert_refused(
            cli(
                "batch",
                "--bundle",
                bundle_64,
                "--latents",
                f"{shards}/**/a.npy",
                "--text",
                PROMPT,
                "--out",
                tmp_path / "o",
            ),
            tmp_path / "o",
            "two shards are named 'a'",
        )
        assert_refused(
            cli(
                "batch",
                "--bundle",
                bundle_64,
                "--latents",
                shards,
                "--text",
                PROMPT,
                "--out",
                tmp_path / "o",
                "--workers",
                0,
            ),
            tmp_path / "o",
            "--workers must be 1 or more, got 0",
        )
        _, without_clip, _ = bundle_with_encoder
        assert_refused(
            cli("batch", "--bundle", without_clip, "--latents", shards, "--text", "blue dog", "--out", tmp_path / "o"),
            tmp_path / "o",
            "exported --without-clip, so it edits only the prompts precomputed at export (none) or --text-embedding features",
        )
        assert_refused(
            cli("batch", "--bundle", bundle_64, "--latents", shards, "--out", tmp_path / "o"),
            tmp_path / "o",
            "give exactly one of --text or --text-embedding",
        )
        assert (out / "mine.txt").read_text() == "keep"
        assert not ray_is_connected() and not our_ray.processes()
