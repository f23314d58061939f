"""The compiled-graph cache ONNX Runtime and OpenVINO share: hits are recorded, and a damaged, symlinked or foreign
entry is refused with a warning and rebuilt, never loaded.

Hits and misses are asserted from what the backends record (``describe()``), not from timings. The graphs are a
64 px bundle's mapping network (8 MB): every rule is the cache's, whatever the graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import cfdeploy.files
import cfdeploy.graph_cache
from cfdeploy.backends import open_backend
from cfdeploy.files import HashRecord, file_identity, sha256_file
from cfdeploy.graph_cache import ENTRY_RECORD, HASHES_DIR, GraphCache, cache_root, entry_key, entry_parts

RUNTIMES = ("onnxruntime", "openvino")
Z = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CFDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "graphs"


@pytest.fixture(scope="module")
def bundle(bundle_with_encoder) -> Path:
    return bundle_with_encoder[1]


def mapping_run(runtime: str, bundle: Path, warnings: list[str] | None = None) -> tuple[np.ndarray, str]:
    """The mapping network's output from a newly opened backend (as a fresh process opens it), and the cache's
    outcome for it."""
    backend = open_backend(runtime, bundle)
    if warnings is not None:
        backend.graphs.cache.on_warning = warnings.append
    w = backend.run("mapping", z=Z)
    return w, backend.describe()["session_cache"]["mapping"]


def only_entry(cache_dir: Path) -> Path:
    (entry,) = [path for path in cache_dir.iterdir() if not path.name.startswith(".")]
    return entry


def blob_of(entry: Path) -> Path:
    """The entry's weights: OpenVINO's compiled model, or the file of ONNX Runtime's weights that it maps in place."""
    return max((path for path in entry.iterdir() if path.name != ENTRY_RECORD), key=lambda path: path.stat().st_size)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_second_opening_hits_the_cache_and_computes_the_same(runtime, bundle, cache_dir):
    first, outcome = mapping_run(runtime, bundle)
    assert outcome == "miss"
    second, outcome = mapping_run(runtime, bundle)
    assert outcome == "hit"
    np.testing.assert_array_equal(first, second)
    record = json.loads((only_entry(cache_dir) / ENTRY_RECORD).read_text())
    assert (
        record["parts"]["runtime"] == runtime
        and record["parts"]["graph_sha256"]
        == (json.loads((bundle / "manifest.json").read_text())["files"]["mapping.onnx"])
    )
    assert not [path for path in cache_dir.iterdir() if path.name.startswith(".partial-")]


@pytest.fixture(scope="module")
def twin_bundles(bundle, tmp_path_factory) -> tuple[Path, Path]:
    """Two copies of the bundle whose mapping graphs keep their weights in ``mapping.onnx.data``: the same
    ``mapping.onnx`` bytes, the second's weights halved."""
    import shutil

    import onnx
    from onnx import numpy_helper

    twins = []
    for name, scale in (("weights", 1.0), ("halved_weights", 0.5)):
        copy = tmp_path_factory.mktemp(name) / "bundle"
        shutil.copytree(bundle, copy, copy_function=os.link)
        graph = onnx.load(str(bundle / "mapping.onnx"))
        for initializer in graph.graph.initializer:
            values = numpy_helper.to_array(initializer)
            if values.dtype == np.float32 and values.nbytes >= 1024:  # those saved outside the graph
                initializer.CopyFrom(numpy_helper.from_array(values * np.float32(scale), initializer.name))
        (copy / "mapping.onnx").unlink()  # a link to the original bundle's file
        onnx.save_model(
            graph, str(copy / "mapping.onnx"), save_as_external_data=True, location="mapping.onnx.data",
            size_threshold=1024,
        )  # fmt: skip
        manifest = json.loads((copy / "manifest.json").read_text())
        for relative in ("mapping.onnx", "mapping.onnx.data"):
            manifest["files"][relative] = hashlib.sha256((copy / relative).read_bytes()).hexdigest()
        (copy / "manifest.json").unlink()
        (copy / "manifest.json").write_text(json.dumps(manifest))
        twins.append(copy)
    assert (twins[0] / "mapping.onnx").read_bytes() == (twins[1] / "mapping.onnx").read_bytes()
    assert (twins[1] / "mapping.onnx.data").stat().st_size > 1 << 20  # OpenVINO reads these as it compiles
    return twins[0], twins[1]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_graph_whose_weights_file_differs_misses_the_entry_of_the_same_graph_file(runtime, twin_bundles, cache_dir):
    first, halved = twin_bundles
    assert mapping_run(runtime, first)[1] == "miss"
    found, outcome = mapping_run(runtime, halved)
    assert outcome == "miss"
    np.testing.assert_allclose(found, open_backend(runtime, halved, session_cache=False).run("mapping", z=Z), rtol=1e-5)
    assert not np.allclose(found, mapping_run(runtime, first)[0])


@pytest.mark.parametrize(
    "runtime,damaged",
    [("onnxruntime", "graph.onnx.data"), ("onnxruntime", "graph.onnx"), ("openvino", "compiled.blob")],
)
def test_a_damaged_file_is_refused_with_a_warning_then_rebuilt(runtime, damaged, bundle, cache_dir):
    """ONNX Runtime's weights and OpenVINO's compiled model are checked where they lie, ONNX Runtime's graph in
    memory."""
    expected, _ = mapping_run(runtime, bundle)
    entry = only_entry(cache_dir)
    blob = entry / damaged
    content = bytearray(blob.read_bytes())
    content[len(content) // 2] ^= 0xFF
    blob.write_bytes(bytes(content))
    warnings: list[str] = []
    found, outcome = mapping_run(runtime, bundle, warnings)
    assert outcome == "refused"
    assert warnings == [
        f"{entry}: {blob.name} does not match its recorded sha256 (changed or damaged); refused, and rebuilt"
    ]
    np.testing.assert_array_equal(found, expected)
    assert mapping_run(runtime, bundle)[1] == "hit"


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings from Linux's /proc")
@pytest.mark.parametrize("runtime,weights_file", [("onnxruntime", "graph.onnx.data"), ("openvino", "compiled.blob")])
def test_a_hit_maps_the_cached_weights_from_the_entry_instead_of_copying_them(runtime, weights_file, bundle, cache_dir):
    mapping_run(runtime, bundle)
    weights = blob_of(only_entry(cache_dir))
    assert weights.name == weights_file
    backend = open_backend(runtime, bundle)
    backend.run("mapping", z=Z)
    assert backend.describe()["session_cache"]["mapping"] == "hit"
    mapped = {line.split(maxsplit=5)[-1] for line in Path("/proc/self/maps").read_text().splitlines()}
    assert str(weights) in mapped


def test_an_entry_that_passes_its_checks_but_onnx_runtime_cannot_load_is_refused_then_rebuilt(bundle, cache_dir):
    expected, _ = mapping_run("onnxruntime", bundle)
    entry = only_entry(cache_dir)
    record = json.loads((entry / ENTRY_RECORD).read_text())
    del record["files"]["graph.onnx.data"]  # as if the weights had gone: the graph alone checks out
    (entry / ENTRY_RECORD).write_text(json.dumps(record))
    (entry / "graph.onnx.data").unlink()
    warnings: list[str] = []
    found, outcome = mapping_run("onnxruntime", bundle, warnings)
    assert outcome == "refused"
    assert len(warnings) == 1 and warnings[0].startswith(f"{entry}: ONNX Runtime cannot load it (")
    assert warnings[0].endswith("); refused, and rebuilt")
    np.testing.assert_array_equal(found, expected)
    assert mapping_run("onnxruntime", bundle)[1] == "hit"


def test_a_symlinked_entry_or_blob_is_refused_and_rebuilt(bundle, cache_dir, tmp_path):
    mapping_run("onnxruntime", bundle)
    entry = only_entry(cache_dir)
    elsewhere = tmp_path / "elsewhere"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)
    warnings: list[str] = []
    assert mapping_run("onnxruntime", bundle, warnings)[1] == "refused"
    assert warnings == [f"{entry}: is a symlink or not a directory; refused, and rebuilt"]
    assert elsewhere.is_dir() and not only_entry(cache_dir).is_symlink()  # the link went, not what it led to
    blob = blob_of(entry)
    (tmp_path / "blob").write_bytes(blob.read_bytes())
    blob.unlink()
    blob.symlink_to(tmp_path / "blob")
    warnings.clear()
    assert mapping_run("onnxruntime", bundle, warnings)[1] == "refused"
    assert warnings == [f"{entry}: {blob.name} is a symlink or not a regular file; refused, and rebuilt"]


def test_another_runtime_version_misses_and_an_entry_recording_other_parts_is_refused(tmp_path):
    cache = GraphCache(tmp_path / "graphs")
    parts = entry_parts("onnxruntime", "1.22.0", "ab" * 32, "x86_64 cpu avx2", {"level": "all"})
    cache.put(parts, {"graph.onnx": b"optimised"})
    assert cache.load("mapping", parts) == {"graph.onnx": b"optimised"}
    foreign = {**parts, "version": "1.23.0"}
    assert cache.load("mapping", foreign) is None and cache.outcomes["mapping"] == "miss"
    (tmp_path / "graphs" / entry_key(parts)).rename(tmp_path / "graphs" / entry_key(foreign))  # mislabelled
    warnings: list[str] = []
    cache.on_warning = warnings.append
    assert cache.load("mapping", foreign) is None and cache.outcomes["mapping"] == "refused"
    assert warnings[0].endswith(
        f"its {ENTRY_RECORD} records another graph, runtime, CPU or settings; refused, and rebuilt"
    )


def test_an_entry_holding_a_file_its_record_does_not_list_is_refused(tmp_path):
    cache, warnings = GraphCache(tmp_path / "graphs"), []
    cache.on_warning = warnings.append
    parts = entry_parts("onnxruntime", "1.32.0", "cd" * 32, "cpu", {})
    cache.put(parts, {"graph.onnx": b"graph"})
    (cache.entry_path(parts) / "graph.onnx.data").write_bytes(b"weights nobody hashed")
    assert cache.load("mapping", parts, in_place=("graph.onnx.data",)) is None
    assert cache.outcomes["mapping"] == "refused" and not cache.entry_path(parts).exists()
    assert warnings == [
        f"{cache.entry_path(parts)}: it holds graph.onnx.data, which its {ENTRY_RECORD} does not list; refused, and "
        "rebuilt"
    ]


def test_an_entry_in_place_is_never_replaced_a_later_store_of_it_is_dropped(tmp_path):
    """A process may be mapping the entry's files: another process that made the same entry keeps the first one."""
    cache = GraphCache(tmp_path / "graphs")
    parts = entry_parts("onnxruntime", "1.32.0", "ef" * 32, "cpu", {})
    cache.put(parts, {"graph.onnx": b"first"})
    first_inode = (cache.entry_path(parts) / "graph.onnx").stat().st_ino
    cache.put(parts, {"graph.onnx": b"second"})
    assert cache.load("mapping", parts) == {"graph.onnx": b"first"}
    assert (cache.entry_path(parts) / "graph.onnx").stat().st_ino == first_inode
    assert [path.name for path in (tmp_path / "graphs").iterdir() if path.name != HASHES_DIR] == [
        cache.entry_path(parts).name
    ]


def test_the_least_recently_used_entries_go_first_past_the_bound(tmp_path):
    cache = GraphCache(tmp_path / "graphs", max_bytes=3000)
    parts = [entry_parts("openvino", "1", f"{index:064x}", "cpu", {}) for index in range(3)]
    for index, part in enumerate(parts):
        cache.put(part, {"compiled.blob": bytes(1000)})
        os.utime(tmp_path / "graphs" / entry_key(part) / ENTRY_RECORD, (index, index))  # written in this order
    assert cache.load("a", parts[0]) is None  # the oldest went when the third came
    assert cache.load("b", parts[1]) is not None and cache.load("c", parts[2]) is not None


def test_an_entry_removed_by_another_process_while_it_is_read_is_a_miss_without_a_warning(tmp_path, monkeypatch):
    cache, warnings = GraphCache(tmp_path / "graphs"), []
    cache.on_warning = warnings.append
    parts = entry_parts("onnxruntime", "1.32.0", "12" * 32, "cpu", {})
    cache.put(parts, {"graph.onnx": b"graph"})
    read = cfdeploy.graph_cache._regular_bytes

    def evicted_meanwhile(path: Path, limit: int | None) -> bytes:
        GraphCache(tmp_path / "graphs").discard(parts)  # another process evicts it between the checks
        return read(path, limit)

    monkeypatch.setattr(cfdeploy.graph_cache, "_regular_bytes", evicted_meanwhile)
    assert cache.load("mapping", parts) is None
    assert cache.outcomes["mapping"] == "miss" and warnings == []


def test_an_entry_is_renamed_out_of_its_place_before_it_is_removed(tmp_path, monkeypatch):
    """So another process sees the whole entry or none of it."""
    cache = GraphCache(tmp_path / "graphs")
    parts = entry_parts("onnxruntime", "1.32.0", "34" * 32, "cpu", {})
    cache.put(parts, {"graph.onnx": b"graph", "graph.onnx.data": b"weights"})
    seen_while_removing: list[bool] = []
    remove_tree = cfdeploy.graph_cache.shutil.rmtree

    def watching(path: Path, *args: object, **kwargs: object) -> None:
        seen_while_removing.append(os.path.lexists(cache.entry_path(parts)))
        remove_tree(path, *args, **kwargs)

    monkeypatch.setattr(cfdeploy.graph_cache.shutil, "rmtree", watching)
    cache.discard(parts)
    assert seen_while_removing == [False]
    assert [path.name for path in (tmp_path / "graphs").iterdir() if path.name != HASHES_DIR] == []


def test_eviction_passes_over_entries_another_process_removes_meanwhile(tmp_path, monkeypatch):
    cache = GraphCache(tmp_path / "graphs", max_bytes=1000)
    parts = [entry_parts("openvino", "1", f"{index:064x}", "cpu", {}) for index in range(3)]
    for part in parts[:2]:
        cache.put(part, {"compiled.blob": bytes(800)})
    (tmp_path / "graphs" / ".partial-gone").mkdir()
    listed = Path.iterdir

    def vanishing(directory: Path):
        for path in listed(directory):
            if directory == tmp_path / "graphs" and path.name in (".partial-gone", entry_key(parts[0])):
                GraphCache(directory)._remove(path)  # listed, then removed by another process
            yield path

    monkeypatch.setattr(Path, "iterdir", vanishing)
    warnings: list[str] = []
    cache.on_warning = warnings.append
    cache.put(parts[2], {"compiled.blob": bytes(800)})
    assert warnings == []
    monkeypatch.setattr(Path, "iterdir", listed)
    assert [cache.load("x", part) is not None for part in parts] == [False, False, True]


def test_a_cache_entry_naming_an_unreadable_file_is_refused_with_a_warning(tmp_path):
    cache, warnings = GraphCache(tmp_path / "graphs"), []
    cache.on_warning = warnings.append
    parts = entry_parts("onnxruntime", "1.32.0", "56" * 32, "cpu", {})
    cache.put(parts, {"graph.onnx": b"graph"})
    record_file = cache.entry_path(parts) / ENTRY_RECORD
    record = json.loads(record_file.read_text())
    record["files"]["graph\0onnx"] = record["files"]["graph.onnx"]
    record_file.write_text(json.dumps(record))
    assert cache.load("mapping", parts) is None and cache.outcomes["mapping"] == "refused"
    assert warnings == [
        f"{cache.entry_path(parts)}: its {ENTRY_RECORD} names a file outside the entry; refused, and rebuilt"
    ]


def test_a_symlinked_entry_leaves_what_it_leads_to_untouched(tmp_path):
    cache = GraphCache(tmp_path / "graphs", on_warning=lambda line: None)
    parts = entry_parts("onnxruntime", "1.32.0", "78" * 32, "cpu", {})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ENTRY_RECORD).write_text("{}")
    os.utime(elsewhere / ENTRY_RECORD, (1, 1))
    (tmp_path / "graphs").mkdir()
    cache.entry_path(parts).symlink_to(elsewhere)
    assert cache.load("mapping", parts) is None and cache.outcomes["mapping"] == "refused"
    assert (elsewhere / ENTRY_RECORD).stat().st_mtime == 1 and not cache.entry_path(parts).exists()


FULL_DISK_RUN = """
import json, resource, signal, sys
from pathlib import Path
import numpy as np
from cfdeploy.backends import open_backend
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
backend = open_backend("onnxruntime", Path(sys.argv[1]))
warnings = []
backend.graphs.cache.on_warning = warnings.append
w = backend.run("mapping", z=np.load(sys.argv[2]))
print(json.dumps({"w": w.tolist(), "cache": backend.describe()["session_cache"], "warnings": warnings}))
"""


def test_a_disk_that_fills_while_onnx_runtime_stores_its_graph_is_a_warning_and_the_graph_runs(
    bundle, cache_dir, tmp_path
):
    """ONNX Runtime writes its optimised graph (the mapping's: 8 MB) while it loads; files here may reach 1 MB."""
    import subprocess
    import sys

    np.save(tmp_path / "z.npy", Z)
    run = subprocess.run(
        [sys.executable, "-c", FULL_DISK_RUN, str(bundle), str(tmp_path / "z.npy")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["cache"] == {"mapping": "miss"}
    assert result["warnings"] == [f"{cache_dir}: could not store a compiled graph (ONNX Runtime failed to write it)"]
    expected = open_backend("onnxruntime", bundle, session_cache=False).run("mapping", z=Z)
    np.testing.assert_array_equal(np.array(result["w"], np.float32), expected)
    assert not [path for path in cache_dir.iterdir() if not path.name.startswith(".")]


def test_the_cache_lives_in_the_users_cache_directory_unless_overridden():
    assert cache_root({"HOME": "/home/u"}) == Path.home() / ".cache" / "cfdeploy"
    assert cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/cfdeploy")
    assert cache_root({"XDG_CACHE_HOME": "/x", "CFDEPLOY_CACHE_DIR": "/c"}) == Path("/c")


def test_no_session_cache_neither_reads_nor_writes_it(bundle, cache_dir, cli, tmp_path, embedding_file):
    result = cli(
        "edit", "--bundle", bundle, "--backend", "onnxruntime", "--seed", "1", "--text-embedding", embedding_file,
        "--no-session-cache", "-o", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "out" / "edit.json").read_text())["runtime"]["session_cache"] == "off"
    assert not cache_dir.exists()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_cache_hit_still_refuses_a_damaged_bundle(runtime, bundle, cache_dir, tmp_path):
    import shutil

    from cfdeploy.errors import CfdeployError

    mapping_run(runtime, bundle)  # the cache now holds the mapping network
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged, copy_function=os.link)
    graph = damaged / "mapping.onnx"
    content = bytearray(graph.read_bytes())
    content[-1] ^= 1
    graph.unlink()  # the link, not the original bundle's file
    graph.write_bytes(bytes(content))
    with pytest.raises(CfdeployError, match=r"differs from the manifest's .* \(file changed or damaged\)$"):
        mapping_run(runtime, damaged)


@pytest.fixture
def later_process(monkeypatch):
    """Forget this process's own hashes, as a new process starts without them; files count as settled at once."""
    monkeypatch.setattr(cfdeploy.files, "_HASHED", {})
    monkeypatch.setattr(cfdeploy.files, "SETTLED_NS", 0)


def hashing_refused(monkeypatch) -> None:
    """From here on, hashing any file fails the test: what is checked must come from the record."""

    def refuse(path: Path) -> str:
        raise AssertionError(f"{path} was hashed")

    monkeypatch.setattr(cfdeploy.files, "streamed_sha256", refuse)
    monkeypatch.setattr(cfdeploy.graph_cache, "_mapped_sha256", refuse)


def test_a_hit_after_the_filling_process_hashes_neither_the_bundles_graph_nor_the_cached_weights(
    bundle, cache_dir, later_process, monkeypatch
):
    expected, outcome = mapping_run("onnxruntime", bundle)  # reads and hashes the bundle's graph, writes the entry
    assert outcome == "miss"
    monkeypatch.setattr(cfdeploy.files, "_HASHED", {})
    hashing_refused(monkeypatch)
    found, outcome = mapping_run("onnxruntime", bundle)
    assert outcome == "hit"
    np.testing.assert_array_equal(found, expected)


def test_a_file_rewritten_with_its_size_and_modification_time_restored_is_hashed_again(tmp_path, later_process):
    record = HashRecord(tmp_path / "hashes")
    path = tmp_path / "graph.onnx"
    path.write_bytes(b"first graph")
    assert sha256_file(path, record) == hashlib.sha256(b"first graph").hexdigest()
    before = path.stat()
    time.sleep(0.05)  # past the file system's timestamp tick: the change time moves on
    path.write_bytes(b"other graph")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    cfdeploy.files._HASHED.clear()
    assert sha256_file(path, record) == hashlib.sha256(b"other graph").hexdigest()


def test_a_file_changed_in_the_last_two_seconds_is_hashed_but_not_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(cfdeploy.files, "_HASHED", {})
    record = HashRecord(tmp_path / "hashes")
    path = tmp_path / "graph.onnx"
    path.write_bytes(b"just written")
    assert sha256_file(path, record) == hashlib.sha256(b"just written").hexdigest()
    assert record.lookup(file_identity(path)) is None and not (tmp_path / "hashes").exists()


def test_a_record_is_kept_only_for_the_identity_it_names_and_records_are_bounded(tmp_path, later_process):
    record = HashRecord(tmp_path / "hashes", max_records=4)
    paths = [tmp_path / f"{index}.bin" for index in range(5)]
    for index, path in enumerate(paths):
        path.write_bytes(bytes([index]))
        sha256_file(path, record)
        os.utime(record._path(file_identity(path)), (index, index))  # recorded in this order
    assert [record.lookup(file_identity(path)) is not None for path in paths] == [False, False, False, True, True]
    kept = record._path(file_identity(paths[4]))
    foreign = json.loads(kept.read_text())
    foreign["identity"][1] += 1  # another inode's record under this name
    kept.write_text(json.dumps(foreign))
    assert record.lookup(file_identity(paths[4])) is None
