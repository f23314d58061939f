"""Hostile and damaged bundles: a malformed manifest, paths leading out, a pinned manifest, a tampered prompt cache.

Each test builds its bundle from the session ``bundle_64`` by copying it (hard links, with every
file a test changes replaced rather than written through), so the fixture itself never changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cfdeploy.bundle import Bundle, TextLatentCache, check_manifest, write_manifest
from cfdeploy.errors import CfdeployError
from cfdeploy.outputs import npy_bytes
from conftest import messages


@pytest.fixture
def bundle(tmp_path: Path, bundle_64: Path) -> Path:
    """A copy of the session bundle that a test may damage (no prompt cache)."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_64, copy, copy_function=os.link, ignore=shutil.ignore_patterns("cache"))
    replace_file(copy / "manifest.json", (bundle_64 / "manifest.json").read_bytes())
    return copy


@pytest.fixture
def one_code(tmp_path: Path, latents_64: Path) -> Path:
    """A single W+ code, for edits whose images are not the point."""
    path = tmp_path / "one_code.npy"
    np.save(path, np.load(latents_64)[:1])
    return path


def replace_file(path: Path, content: bytes) -> None:
    """Give ``path`` new content as a new file, never through a hard link to the fixture."""
    path.unlink(missing_ok=True)
    path.write_bytes(content)


def read_manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def write_raw_manifest(bundle: Path, manifest: dict) -> None:
    replace_file(bundle / "manifest.json", json.dumps(manifest).encode())


def edit(cli, bundle: Path, out: Path, *options: object):
    return cli("edit", "--bundle", bundle, "--out", out, *options)


def assert_refused(result, out: Path | None, message: str) -> None:
    """Exit 2, exactly ``error: message`` on stderr, no traceback, nothing written."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert messages(result.stderr) == f"error: {message}"
    assert "Traceback" not in result.stdout
    if out is not None:
        assert not out.exists()
        assert not [path for path in out.parent.iterdir() if path.name.startswith(f".{out.name}")]


# --- the manifest's schema --------------------------------------------------------------------


def _drop(field: str):
    return lambda manifest: manifest.pop(field)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(manifest: dict) -> None:
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


MALFORMED = {
    "no files": (_drop("files"), "files is missing"),
    "no opts": (_drop("opts"), "opts is missing"),
    "no networks": (_drop("networks"), "networks is missing"),
    "files as a list": (_set("files", ["mean_w.npy"]), "files must be an object, found a list"),
    "numeric sha256": (_set("files", "mean_w.npy", 12), "files['mean_w.npy'] must be a sha256 string, found a number"),
    "short sha256": (
        _set("files", "mean_w.npy", "abc"),
        "files['mean_w.npy'] is not a sha256 (64 lowercase hex digits): 'abc'",
    ),
    "text size": (_set("opts", "size", "256"), "opts.size must be a whole number from 1 to 8192, found '256'"),
    "negative size": (_set("opts", "size", -256), "opts.size must be a whole number from 1 to 8192, found -256"),
    "fractional levels": (
        _set("opts", "n_latent", 14.5),
        "opts.n_latent must be a whole number from 1 to 64, found 14.5",
    ),
    "zero style_dim": (_set("opts", "style_dim", 0), "opts.style_dim must be a whole number from 1 to 4096, found 0"),
    "levels the graphs do not have": (
        _set("opts", "n_latent", 18),
        "networks.text_mapper.outputs is text_latents ['batch', 10, 512], which disagrees with opts "
        "(size, n_latent, style_dim): expected text_latents ['batch', 18, 512]",
    ),
    "unknown graph": (
        _set("networks", "decoder", {}),
        "networks has an unknown graph 'decoder' (format version 1 has none)",
    ),
    "future format": (_set("format_version", 2), "bundle format version 2, this cfdeploy reads version 1"),
    "boolean format version": (
        _set("format_version", True),
        "bundle format version True, this cfdeploy reads version 1",
    ),
    "unlisted mean W": (
        _set("mean_w", "prompts/other.npy"),
        "mean_w 'prompts/other.npy' is not listed in files, so it cannot be verified",
    ),
    "refits as text": (_set("refits", "many"), "refits must be a list, found a string"),
    "no mean W": (_drop("mean_w"), "mean_w is missing"),
    "NaN parity": (
        _set("networks", "generator", "parity", "batch_1", "rel_l2", float("nan")),
        "networks.generator.parity.batch_1.rel_l2 must be a finite number, found nan",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_manifest_is_one_line_naming_the_field(cli, bundle, case):
    change, problem = MALFORMED[case]
    manifest = read_manifest(bundle)
    change(manifest)
    write_raw_manifest(bundle, manifest)
    assert_refused(cli("inspect", bundle), None, f"{bundle / 'manifest.json'}: {problem}")


def test_malformed_manifest_refuses_an_edit_before_any_output(tmp_path, cli, bundle, latents_64, embedding_file):
    manifest = read_manifest(bundle)
    manifest["files"] = list(manifest["files"])
    write_raw_manifest(bundle, manifest)
    out = tmp_path / "out"
    assert_refused(
        edit(cli, bundle, out, "-l", latents_64, "--text-embedding", embedding_file),
        out,
        f"{bundle / 'manifest.json'}: files must be an object, found a list",
    )


def test_a_manifest_of_invalid_utf8_is_refused_naming_the_byte(cli, bundle):
    content = (bundle / "manifest.json").read_bytes()
    replace_file(bundle / "manifest.json", content.replace(b'"green lipstick"', b'"green \xff lipstick"', 1))
    offset = content.index(b'"green lipstick"') + len(b'"green ')
    assert_refused(cli("inspect", bundle), None, f"{bundle / 'manifest.json'}: not UTF-8 text (byte {offset})")


# --- every path stays inside the bundle -------------------------------------------------------

OUTSIDE = {
    "mean W up and out": (("mean_w",), "../../etc/passwd", "mean_w '../../etc/passwd'"),
    "mean W absolute": (("mean_w",), "/etc/passwd", "mean_w '/etc/passwd'"),
    "tokenizer": (("tokenizer", "vocab"), "../../etc/passwd", "tokenizer.vocab '../../etc/passwd'"),
    "graph": (("networks", "generator", "file"), "/etc/passwd", "networks.generator.file '/etc/passwd'"),
    "prompt": (
        ("prompts", "green lipstick"),
        "prompts/../../../etc/passwd",
        "prompts['green lipstick'] 'prompts/../../../etc/passwd'",
    ),
}


@pytest.mark.parametrize("case", OUTSIDE, ids=list(OUTSIDE))
def test_manifest_path_leading_out_is_refused_without_reading_it(tmp_path, cli, bundle, case):
    keys, target, field = OUTSIDE[case]
    manifest = read_manifest(bundle)
    _set(*keys, target)(manifest)
    manifest["files"][target] = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    write_raw_manifest(bundle, manifest)
    out = tmp_path / "out"
    result = edit(cli, bundle, out, "--text", "green lipstick", "--seed", 1, "--truncation", 0.5)
    assert manifest["files"][target][:8] not in result.stderr and "root:" not in result.stdout + result.stderr
    # the files entry is checked first: the refusal never gets as far as the field naming it
    assert_refused(
        result,
        out,
        f"{bundle / 'manifest.json'}: files entry {target!r} leads outside the bundle (absolute, empty or with '..')",
    )
    del manifest["files"][target]
    write_raw_manifest(bundle, manifest)
    result = edit(cli, bundle, out, "--text", "green lipstick", "--seed", 1, "--truncation", 0.5)
    assert_refused(
        result, out, f"{bundle / 'manifest.json'}: {field} leads outside the bundle (absolute, empty or with '..')"
    )


def test_symlinked_graph_leading_out_is_refused(tmp_path, cli, bundle, latents_64, embedding_file):
    outside = tmp_path / "elsewhere" / "generator.onnx"
    outside.parent.mkdir()
    shutil.copyfile(bundle / "generator.onnx", outside)  # the very same graph: only where it lies is wrong
    (bundle / "generator.onnx").unlink()
    (bundle / "generator.onnx").symlink_to(outside)
    out = tmp_path / "out"
    assert_refused(
        edit(cli, bundle, out, "-l", latents_64, "--text-embedding", embedding_file),
        out,
        f"{bundle / 'manifest.json'}: files entry 'generator.onnx' is a symlink leading outside the bundle",
    )


def test_symlinked_manifest_leading_out_is_refused_without_its_hash(tmp_path, cli, bundle):
    outside = tmp_path / "manifest.json"
    shutil.copyfile(bundle / "manifest.json", outside)
    (bundle / "manifest.json").unlink()
    (bundle / "manifest.json").symlink_to(outside)
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    result = cli(
        "edit",
        "--bundle",
        bundle,
        "--seed",
        1,
        "--text",
        "green lipstick",
        "--out",
        tmp_path / "out",
        "--expect-manifest",
        "0" * 64,
    )
    assert_refused(result, tmp_path / "out", f"{bundle / 'manifest.json'}: is a symlink leading outside the bundle")
    assert digest[:8] not in result.stderr


def test_symlink_inside_the_bundle_is_followed(cli, bundle):
    (bundle / "data").mkdir()
    os.replace(bundle / "mean_w.npy", bundle / "data" / "mean_w.npy")
    (bundle / "mean_w.npy").symlink_to(Path("data") / "mean_w.npy")
    opened = Bundle(bundle)
    assert opened.mean_w().shape == (512,)
    assert json.loads(cli("inspect", bundle, "--json").stdout)["kind"] == "cfdeploy bundle"


def test_write_manifest_refuses_what_the_reader_would(tmp_path, bundle):
    manifest = read_manifest(bundle)
    manifest["mean_w"] = "../mean_w.npy"
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(CfdeployError, match=r"mean_w '\.\./mean_w\.npy' leads outside the bundle"):
        write_manifest(bundle, manifest)
    assert (bundle / "manifest.json").read_bytes() == before
    assert check_manifest(read_manifest(bundle), bundle) == Bundle(bundle).contracts


def test_refit_of_a_bundle_without_clip_refuses_before_any_work(cli, bundle, cfclip_64):
    manifest = read_manifest(bundle)
    del manifest["networks"]["clip_text"], manifest["files"]["clip_text.onnx"]
    write_raw_manifest(bundle, manifest)
    before = (bundle / "manifest.json").read_bytes()
    assert_refused(
        cli("refit", "--bundle", bundle, "-c", cfclip_64),
        None,
        f"{bundle.resolve()}: its precomputed prompts would need recomputing, but it has no CLIP text graph "
        "(exported --without-clip); export the new checkpoint instead",
    )
    assert (bundle / "manifest.json").read_bytes() == before


# --- hashed files that are not what the manifest says they hold -------------------------------


def rehash(bundle: Path, relative: str, content: bytes) -> None:
    """Replace a listed file and record its new hash, as someone rewriting the bundle would."""
    replace_file(bundle / relative, content)
    manifest = read_manifest(bundle)
    manifest["files"][relative] = hashlib.sha256(content).hexdigest()
    write_raw_manifest(bundle, manifest)


def test_mean_w_declaring_a_huge_shape_is_refused_before_allocating(tmp_path, cli, bundle):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    rehash(bundle, "mean_w.npy", header.getvalue() + bytes(64))
    out = tmp_path / "out"
    assert_refused(
        edit(cli, bundle, out, "--text", "green lipstick", "--seed", 1, "--truncation", 0.5),
        out,
        f"{bundle / 'mean_w.npy'}: holds float32 [1000000000000], expected float32 [512]",
    )


def test_precomputed_prompt_of_the_wrong_shape_is_refused(tmp_path, cli, bundle, latents_64):
    manifest = read_manifest(bundle)
    manifest["prompts"]["green lipstick"] = "mean_w.npy"  # listed and hashed, but not a t_w
    write_raw_manifest(bundle, manifest)
    out = tmp_path / "out"
    assert_refused(
        edit(cli, bundle, out, "-l", latents_64, "--text", "green lipstick"),
        out,
        f"{bundle / 'mean_w.npy'}: holds float32 [512], expected float32 [1, 10, 512]",
    )


def test_graph_asking_for_unlisted_external_data_is_refused(tmp_path, bundle):
    """ONNX Runtime gets the verified bytes, not a path, so it can read no file the manifest does not hash."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    secret = numpy_helper.from_array(np.ones((1, 512), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["z", "w"], ["w_out"])],
        "mapping",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 512])],
        [helper.make_tensor_value_info("w_out", TensorProto.FLOAT, ["batch", 512])],
        [secret],
    )
    staging = tmp_path / "graph"
    staging.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, staging / "mapping.onnx", save_as_external_data=True, location="secret.bin", size_threshold=0)
    shutil.copyfile(staging / "secret.bin", bundle / "secret.bin")  # inside the bundle, but listed nowhere
    rehash(bundle, "mapping.onnx", (staging / "mapping.onnx").read_bytes())
    out = tmp_path / "out"
    ran = run_cfdeploy("edit", "--bundle", bundle, "--out", out, "--text", "green lipstick", "--seed", 1)
    assert ran.returncode == 2, ran.stderr
    assert messages(ran.stderr) == (
        f"error: {bundle / 'mapping.onnx'}: ONNX Runtime cannot load this graph: it reads "
        "external data files the manifest does not list (only files it hashes are read)"
    )
    assert not out.exists()


# --- pinning the manifest ---------------------------------------------------------------------


def test_inspect_prints_the_manifest_sha256_and_edit_refuses_any_other(tmp_path, cli, bundle, one_code, embedding_file):
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert json.loads(cli("inspect", bundle, "--json").stdout)["manifest_sha256"] == digest
    assert f"\npin it: --expect-manifest {digest}\n" in cli("inspect", bundle).stdout  # whole, to copy
    pinned = tmp_path / "pinned"
    assert (
        edit(
            cli, bundle, pinned, "-l", one_code, "--text-embedding", embedding_file, "--expect-manifest", digest.upper()
        ).exit_code
        == 0
    )
    manifest = read_manifest(bundle)
    manifest["opts"]["description"] = "something else"  # a consistent rewrite: every hash still matches
    write_raw_manifest(bundle, manifest)
    rewritten = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    out = tmp_path / "out"
    assert_refused(
        edit(cli, bundle, out, "-l", one_code, "--text-embedding", embedding_file, "--expect-manifest", digest),
        out,
        f"{bundle / 'manifest.json'}: sha256 {rewritten[:12]}… is not the pinned {digest[:12]}…",
    )


def test_a_pin_that_is_not_a_sha256_is_refused(bundle):
    with pytest.raises(CfdeployError, match=r"^pinned manifest sha256 'abc123': expected 64 hex digits$"):
        Bundle(bundle, expect_manifest="abc123")


# --- the prompt cache -------------------------------------------------------------------------

PROMPT = "purple hair"


def run_cfdeploy(*args: object) -> subprocess.CompletedProcess:
    """The real command line (the cache's warning goes through the process's own stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "cfdeploy", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def cache_entry(bundle: Path) -> tuple[Path, Path]:
    entries = sorted((bundle / "cache").glob("*.npy"))
    assert len(entries) == 1, entries
    return entries[0], entries[0].with_suffix(".sha256")


def test_tampered_cache_entry_is_recomputed_with_a_warning_and_rewritten(tmp_path, bundle, one_code):
    def edit_with_prompt(name: str) -> tuple[np.ndarray, list[str], dict]:
        out = tmp_path / name
        result = run_cfdeploy(
            "edit", "--bundle", bundle, "-l", one_code, "--text", PROMPT, "--out", out, "--save-latents"
        )
        assert result.returncode == 0, result.stderr
        return np.load(out / "latents.npy"), result.stderr.splitlines(), json.loads((out / "edit.json").read_text())

    uncached, _, first = edit_with_prompt("uncached")
    entry, digest = cache_entry(bundle)
    computed = entry.read_bytes()
    cached, cached_stderr, second = edit_with_prompt("cached")
    replace_file(entry, npy_bytes(np.zeros((1, 10, 512), np.float32)))  # a valid array, but not this prompt's
    recomputed, stderr, third = edit_with_prompt("tampered")

    warning = (
        f"{entry}: prompt cache entry does not match its recorded sha256 (changed or damaged); "
        "ignoring it and recomputing the prompt"
    )
    assert len([line for line in stderr if line.endswith(warning)]) == 1
    assert not [line for line in cached_stderr if "prompt cache" in line]
    assert (
        "clip_text" in first["timings_s"]
        and "clip_text" not in second["timings_s"]
        and "clip_text" in third["timings_s"]
    )
    assert np.array_equal(cached, uncached) and np.array_equal(recomputed, uncached)
    assert cache_entry(bundle) == (entry, digest) and entry.read_bytes() == computed
    assert digest.read_text() == f"{hashlib.sha256(computed).hexdigest()}\n"


def test_cache_that_is_a_symlink_is_refused(tmp_path, cli, bundle, latents_64):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (bundle / "cache").symlink_to(elsewhere)
    out = tmp_path / "out"
    assert_refused(
        edit(cli, bundle, out, "-l", latents_64, "--text", PROMPT),
        out,
        f"{bundle / 'cache'}: is a symlink; the prompt cache must be a directory inside the bundle",
    )
    assert list(elsewhere.iterdir()) == []


def test_cache_max_bounds_the_cache(tmp_path, cli, bundle, one_code):
    for number, prompt in enumerate(("red hair", "blue hair")):
        out = tmp_path / f"out{number}"
        assert edit(cli, bundle, out, "-l", one_code, "--text", prompt, "--cache-max", 1).exit_code == 0
    assert len(list((bundle / "cache").glob("*.npy"))) == 1


TEXT_LATENTS = np.random.default_rng(6).standard_normal((1, 10, 512)).astype(np.float32)


def _overwritten(entry: Path, digest: Path) -> None:
    replace_file(entry, npy_bytes(TEXT_LATENTS + 1))


def _truncated(entry: Path, digest: Path) -> None:
    replace_file(entry, entry.read_bytes()[:-100])


def _rehashed(content: bytes):
    def damage(entry: Path, digest: Path) -> None:
        replace_file(entry, content)
        replace_file(digest, f"{hashlib.sha256(content).hexdigest()}\n".encode())

    return damage


def pickled_npy() -> bytes:
    """A .npy whose data is a pickle: loading it with pickles allowed would run whatever it names."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([None], object), allow_pickle=True)
    return buffer.getvalue()


def _without_hash(entry: Path, digest: Path) -> None:
    digest.unlink()


def _fifo(entry: Path, digest: Path) -> None:
    entry.unlink()
    os.mkfifo(entry)


DAMAGED = {
    "overwritten": (_overwritten, "does not match its recorded sha256 (changed or damaged)"),
    "truncated": (_truncated, "does not match its recorded sha256 (changed or damaged)"),
    "not an array": (
        _rehashed(b"not an array at all"),
        "is not a .npy file of format 1.0 or 2.0 (or its header is malformed)",
    ),
    "truncated with its hash": (
        _rehashed(npy_bytes(TEXT_LATENTS)[:-100]),
        "has 20380 data bytes, expected 20480 (truncated or padded)",
    ),
    "another shape": (
        _rehashed(npy_bytes(TEXT_LATENTS[:, :2])),
        "holds float32 [1, 2, 512], expected float32 [1, 10, 512]",
    ),
    "NaN": (_rehashed(npy_bytes(np.full_like(TEXT_LATENTS, np.nan))), "holds NaN or infinite values"),
    "pickled objects": (_rehashed(pickled_npy()), "holds object [1], expected float32 [1, 10, 512]"),
    "no hash beside it": (_without_hash, "has no readable {digest} beside it"),
    "a FIFO": (_fifo, "is not a regular file"),
}


@pytest.mark.parametrize("case", DAMAGED, ids=list(DAMAGED))
def test_damaged_cache_entry_is_ignored_with_one_warning_then_replaced(bundle, case):
    damage, problem = DAMAGED[case]
    warnings: list[str] = []
    cache = TextLatentCache(Bundle(bundle), on_warning=warnings.append)
    cache.put(PROMPT, TEXT_LATENTS)
    entry, digest = cache_entry(bundle)
    damage(entry, digest)
    assert cache.get(PROMPT) is None
    problem = problem.format(digest=digest.name)
    assert warnings == [f"{entry}: prompt cache entry {problem}; ignoring it and recomputing the prompt"]
    cache.put(PROMPT, TEXT_LATENTS)
    assert np.array_equal(cache.get(PROMPT), TEXT_LATENTS) and len(warnings) == 1
    mask = os.umask(0)
    os.umask(mask)
    assert {stat.S_IMODE(path.stat().st_mode) for path in (entry, digest)} == {0o666 & ~mask}


def test_least_recently_used_entries_are_evicted(bundle):
    cache = TextLatentCache(Bundle(bundle), max_entries=2)
    for number, prompt in enumerate(("a", "b")):
        cache.put(prompt, TEXT_LATENTS + number)
    assert np.array_equal(cache.get("a"), TEXT_LATENTS)  # a hit: "b" is now the least recently used
    cache.put("c", TEXT_LATENTS + 2)
    assert cache.get("b") is None
    assert np.array_equal(cache.get("a"), TEXT_LATENTS) and np.array_equal(cache.get("c"), TEXT_LATENTS + 2)
    assert len(list((bundle / "cache").glob("*.npy"))) == len(list((bundle / "cache").glob("*.sha256"))) == 2


def test_cache_off_and_precomputed_prompts_first(bundle):
    cache = TextLatentCache(Bundle(bundle), max_entries=0)
    cache.put(PROMPT, TEXT_LATENTS)
    assert cache.get(PROMPT) is None and not (bundle / "cache").exists()
    assert cache.get("green lipstick").shape == (1, 10, 512)
    with pytest.raises(CfdeployError, match=r"^--cache-max must be 0 \(no cache\) or more entries, got -1$"):
        TextLatentCache(Bundle(bundle), max_entries=-1)
