"""Session-wide synthetic files in the official formats, and the helpers tests share.

Files are built once per session. Where the image size is not the point, tests use the 64 px files
(the 256 px layout's first blocks); the 256 and 1024 px files follow the manifests exactly.
Test modules import the helpers from here (``from conftest import …``), never from each other.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import gc
import inspect
import json
import multiprocessing
import os
import pickle
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch

import drawn_faces
import synthetic_files
from cfdeploy import samples
from cfdeploy.models import reference

# The workers and every process they start keep the memory they free for their next allocations (up to glibc's
# 32 MB mmap limit), instead of handing it back to the kernel and faulting it in again, zeroed, a moment later: at
# glibc's defaults a fifth of the run's CPU time was the kernel's. What they do map comes in 2 MB pages where the
# kernel offers transparent huge pages on request (glibc's hugetlb=1 for malloc, THP_MEM_ALLOC_ENABLE for torch's
# allocator): a 64 MB tensor is then 32 page faults, not 16,384. Set here, in the process that starts the workers.
os.environ.setdefault(
    "GLIBC_TUNABLES",
    "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296:"
    "glibc.malloc.top_pad=268435456",
)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# Two workers share the cores, so a process they start (a command, an export in a child) runs its torch threads
# beside a busy one: OpenMP's threads then sleep between parallel regions instead of spinning, which took a fifth of
# such a process's CPU time from the other worker (16.4 → 13.2 CPU-s for a 64 px `cfdeploy edit -c` beside one busy
# core). The workers themselves run torch on one thread.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# cfdeploy fsyncs what it writes before renaming it into place, so a power cut leaves the old file or the new one.
# No test cuts the power, and in the test processes those waits for the disk (gigabytes of checkpoints, bundles and
# caches a run) were most of the time the CPUs sat idle; what the tests check (a temporary file renamed over the
# target, nothing half-written after a crash or a Ctrl-C) is the same without them.
os.fsync = lambda fd: None
TOLERANCE = 1e-4  # relative L2 against the official formulation, on every output
TOKENIZER_PROMPTS = [
    "green lipstick",
    "A Photo of a DOG!!",
    "green   lipstick",
    "rock &amp; roll, baby.",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;amp;lt;",
    "Hello,World?",
    "it's they're I'll don't",
    "café naïve Straße",
    "Ünïcödé ÅÆØ",
    "日本語のテキスト",
    "😀 blue dog 🐶",
    "\tTabs\nand\r\nnewlines ",
    "3.14159 x2",
    "mixed-CASE_Under_score",
    "ﬁ ligature",
    "<start_of_text>literal specials<end_of_text>",
    "word " * 75,
]
# The seed of the CLIP text tower in the run's text-tower files (`clip_text_state`); `cfdeploy bench --synthetic`
# writes the same one, so its export reuses the text graph the run's bundles traced.
CLIP_SEED = samples.CLIP_SEED
DAC_PROMPT, DAC_TARGET = "A cat.", "A cat wearing a wool cap."
DAC_IMAGE_SIZE = 32  # the tiny random model's (cfdeploy.dac.synthetic): 16×16 latents
FAST_DAC = dict(
    unet_steps=4, text_steps=4, rank=4, resolution=DAC_IMAGE_SIZE, save_every=2
)  # the tiny DAC model's settings


def rel_l2(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """``|a - b| / |b|`` in float64."""
    a, b = (np.asarray(t.detach() if isinstance(t, torch.Tensor) else t, dtype=np.float64) for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.lru_cache(maxsize=16)
def _official_edit(checkpoint: Path, w: bytes, w_shape: tuple, features: bytes, features_shape: tuple):
    content = torch.load(checkpoint, weights_only=True)
    w_array = np.frombuffer(w, np.float32).reshape(w_shape)
    features_array = np.frombuffer(features, np.float32).reshape(features_shape)
    with torch.no_grad():
        w_hat, image = reference.cfclip_edit(
            content["state_dict"],
            content["opts"],
            torch.from_numpy(w_array.copy()),
            torch.from_numpy(features_array.copy()),
        )
    return w_hat.numpy(), image.numpy()


def official_edit(checkpoint: Path, w: np.ndarray, text_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The official formulation's ``w_hat`` and image (memoised: several tests share inputs)."""
    w, text_features = np.asarray(w, np.float32), np.asarray(text_features, np.float32)
    return _official_edit(checkpoint, w.tobytes(), w.shape, text_features.tobytes(), text_features.shape)


@functools.lru_cache(maxsize=16)
def _official_w_hat(checkpoint: Path, w: bytes, w_shape: tuple, features: bytes, features_shape: tuple) -> np.ndarray:
    content = torch.load(checkpoint, weights_only=True)
    w_array = np.frombuffer(w, np.float32).reshape(w_shape)
    features_array = np.frombuffer(features, np.float32).reshape(features_shape)
    no_image = torch.empty(0)
    with torch.no_grad(), mock.patch.object(reference, "generator", return_value=no_image):
        w_hat, image = reference.cfclip_edit(
            content["state_dict"],
            content["opts"],
            torch.from_numpy(w_array.copy()),
            torch.from_numpy(features_array.copy()),
        )
    assert image is no_image
    return w_hat.numpy()


def official_w_hat(checkpoint: Path, w: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """The official formulation's ``w_hat`` alone: :func:`official_edit` without synthesising the image, which is
    most of its time (``reference.cfclip_edit`` with its generator step left out), for tests that check no image."""
    w, text_features = np.asarray(w, np.float32), np.asarray(text_features, np.float32)
    return _official_w_hat(checkpoint, w.tobytes(), w.shape, text_features.tobytes(), text_features.shape)


@functools.lru_cache(maxsize=1)
def open_clip_model(seed: int = CLIP_SEED):
    """open_clip's CLIP ViT-B/32 built by open_clip's API, holding the session's CLIP weights (memoised)."""
    import open_clip

    from cfdeploy.models.clip_text import CLIP_ARCHITECTURE

    model = open_clip.create_model(CLIP_ARCHITECTURE, pretrained=None)
    model.load_state_dict(synthetic_files.clip_text_state(seed), strict=False)
    return model.eval()


def open_clip_features(prompts: list[str], seed: int = CLIP_SEED) -> np.ndarray:
    """open_clip's own tokenizer and encode_text on the same weights, loaded with open_clip's API."""
    import open_clip

    with torch.no_grad():
        return open_clip_model(seed).encode_text(open_clip.tokenize(prompts)).numpy()


# What a command prints on stderr outside a terminal as it works: a phase done with its time, or work counted.
PROGRESS_LINE = re.compile(r"(?!error: |warning: )(.+ \(\d+\.\d s\)|.+ \[\d+(/\d+)?\])")


def messages(stderr: str) -> str:
    """``stderr`` without the progress lines a command prints outside a terminal: its errors and warnings."""
    return "\n".join(line for line in stderr.strip().splitlines() if not PROGRESS_LINE.fullmatch(line))


def assert_refused(result, out: Path | None, *fragments: str) -> None:
    """Exit 2 with one ``error:`` line holding every fragment (after any progress lines), no traceback, and nothing
    written at ``out``."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = messages(result.stderr).splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.endswith((".partial", ".old"))]


class OwnRay:
    """The processes of the Ray one test starts, told apart from any other Ray on the machine (another developer's
    tests, a user's cluster): see :func:`own_ray`."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)

    def _is_ours(self, process: Path) -> bool:
        command = (process / "cmdline").read_bytes()
        if self.root.encode() in command:  # gcs_server, raylet and Ray's Python daemons name the session directory
            return True
        if f"RAY_TMPDIR={self.root}".encode() in (process / "environ").read_bytes().split(b"\0"):
            return True
        for descriptor in (process / "fd").iterdir():  # workers and agents (renamed ray::…) hold their logs open
            with contextlib.suppress(OSError):
                if os.readlink(descriptor).startswith(self.root + os.sep):
                    return True
        return False

    def processes(self) -> list[str]:
        """Command lines of this Ray's processes still running (this test process itself aside)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if self._is_ours(entry):
                        found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:  # gone meanwhile, or another user's
                    continue
        return found

    def assert_none_left(self, wait_s: float = 20) -> None:
        deadline = time.monotonic() + wait_s
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not self.processes()


@contextlib.contextmanager
def own_ray() -> Iterator[OwnRay]:
    """Inside the block, ``RAY_TMPDIR`` names a fresh directory: a local Ray started there, in this process or in a
    child inheriting the environment, keeps its session in it, and each of its processes names it on its command
    line or in its environment, or holds a log file open in it. The directory goes when the block ends without error."""
    # Short, under /tmp: Ray's socket paths inside it must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="cfdeploy-ray-", dir="/tmp"))
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(root)
    try:
        yield OwnRay(root)
    finally:
        if previous is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = previous
    shutil.rmtree(root, ignore_errors=True)


def ray_is_connected() -> bool:
    """Whether this process is connected to a Ray (started or joined)."""
    import ray

    return ray.is_initialized()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def checkpoint_with_generator_of(path: Path, generator_seed: int, mapper_seed: int, **opts) -> None:
    """A CF-CLIP file (256 px unless ``size`` is given) whose mappers come from ``mapper_seed`` and whose generator
    is ``generator_seed``'s."""
    torch.save(synthetic_files.checkpoint_with_generator_of(generator_seed, mapper_seed, **opts), path)


# --- slow subprocess work started as soon as the tests are collected ---------------------------------------------

_EARLY: dict[str, tuple[str, Callable[[Path], Any]]] = {}
_STARTED: dict[str, concurrent.futures.Future] = {}
EARLY_RESULT = "result.pickle"


def prepare_early(key: str, work: Callable[[Path], Any]) -> None:
    """Register ``work(directory)``, slow work in subprocesses (a virtual environment, a type check), from a test
    module. Once collection is done it starts in a background thread if a test of that module was selected, once for
    every worker of the run (:func:`built_once`), its processes at the lowest priority: it takes the CPU time the
    tests leave (while they wait for Ray, say), not theirs. :func:`early_result` waits for it."""
    caller = inspect.currentframe().f_back  # type: ignore[union-attr]
    _EARLY[key] = (caller.f_code.co_filename, work)  # type: ignore[union-attr]


_EARLY_PROCESSES: set[subprocess.Popen] = set()
_EARLY_STOPPED = threading.Event()


def early_run(args: list, check: bool = False, **options: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` for early work, at the lowest priority. A test run stopped before the work is done (Ctrl-C,
    ``-x``) stops it, and a stopped process raises: it is never taken for the work's result."""
    if _EARLY_STOPPED.is_set():
        raise RuntimeError("the test run stopped")
    with subprocess.Popen(["nice", "-n", "19", *map(str, args)], **options) as process:
        _EARLY_PROCESSES.add(process)
        try:
            stdout, stderr = process.communicate()
        finally:
            _EARLY_PROCESSES.discard(process)
    if _EARLY_STOPPED.is_set():
        raise RuntimeError("the test run stopped")
    if check and process.returncode:
        raise subprocess.CalledProcessError(process.returncode, args, stdout, stderr)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def _early_work(key: str, shared: Path) -> Any:
    def build(directory: Path) -> None:
        (directory / "work").mkdir(parents=True)
        (directory / EARLY_RESULT).write_bytes(pickle.dumps(_EARLY[key][1](directory / "work")))

    return pickle.loads((built_once(shared / "early" / key.replace(" ", "-"), build) / EARLY_RESULT).read_bytes())


def _start_early(key: str, shared: Path) -> None:
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=key)
    _STARTED[key] = executor.submit(_early_work, key, shared)
    executor.shutdown(wait=False)


def early_result(key: str, shared: Path) -> Any:
    if key not in _STARTED:
        _start_early(key, shared)
    return _STARTED[key].result()


# The suite runs on two workers (pytest-xdist, one module at a time each, in this order): the longest modules go
# first, so that neither worker is left with a long one at the end while the other waits; the first user of a shared
# bundle goes well before its other users (test_hostile_bundles builds the 64 px one with CLIP), so no worker waits
# for another. Modules not listed go last: among them the GPU script's dry run, which works from the start at the
# lowest priority and is checked at the end.
LONGEST_FIRST = [
    "training/test_train.py",
    "photos/test_e4e.py",
    "core/test_hostile_bundles.py",
    "dac/test_dac.py",
    "cfclip/test_bench.py",
    "cfclip/test_refit.py",
    "serving/test_serve.py",
    "cfclip/test_parity.py",
    "serving/test_serve_lifecycle.py",
    "core/test_core_install.py",
    "photos/test_invert.py",
    "cfclip/test_export_cache.py",
    "photos/test_identity.py",
    "cfclip/test_bundle.py",
    "serving/test_batch.py",
    "cfclip/test_openvino.py",
    "cfclip/test_bench_table.py",
    "cfclip/test_typecheck.py",
    "serving/test_serve_backpressure.py",
    "photos/test_paste.py",
    "core/test_samples.py",
    "dac/test_dac_interrupt.py",
    "cfclip/test_refine.py",
    "core/test_extras.py",
    "core/test_bad_input.py",
    "cfclip/test_cli.py",
    "cfclip/test_python_api.py",
    "cfclip/test_several_prompts.py",
    "core/test_cli_safety.py",
]
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = "/".join(item.path.parts[-2:])
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order


def pytest_configure(config: pytest.Config) -> None:
    if XDIST_WORKER is not None:  # each worker gets its share of the cores, not all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_finish(session: pytest.Session) -> None:
    selected = {str(item.path) for item in session.items}  # every worker collects the whole selection
    for key, (module, _) in _EARLY.items():
        if module in selected and key not in _STARTED:
            _start_early(key, shared_directory(session.config._tmp_path_factory))  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A worker whose own tests are done lets the work go on: the other worker's tests may be waiting for it.
    if session.shouldstop or session.shouldfail or exitstatus == pytest.ExitCode.INTERRUPTED:
        _EARLY_STOPPED.set()
        for process in list(_EARLY_PROCESSES):
            process.terminate()
    for future in _STARTED.values():
        concurrent.futures.wait([future])


@pytest.fixture(scope="module", autouse=True)
def memory_back_after_each_module() -> Iterator[None]:
    """After each module (its module fixtures gone first: autouse ones are set up first, torn down last), free
    what cycles hold and give the freed heap back to the system, so one module's peak is not the next one's floor.
    What is left (imported libraries, the session's fixtures) is frozen: later collections, this one's and Python's
    own, no longer walk its millions of objects (they took half a minute of the run)."""
    from cfdeploy.exporter import release_freed_memory

    yield
    release_freed_memory()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def graph_cache_in_a_temporary_directory(shared: Path) -> Iterator[Path]:
    """Compiled and exported graphs go to the run's temporary directory, never the user's ~/.cache (subprocesses
    inherit it). Both workers share it, as processes of one user do: a graph one exported the other reuses."""
    root = shared / "cache"
    previous = os.environ.get("CFDEPLOY_CACHE_DIR")
    os.environ["CFDEPLOY_CACHE_DIR"] = str(root)
    yield root
    if previous is None:
        del os.environ["CFDEPLOY_CACHE_DIR"]
    else:
        os.environ["CFDEPLOY_CACHE_DIR"] = previous


def built_once(path: Path, build: Callable[[Path], Any]) -> Path:
    """``build(path)`` once for every worker of the run: the first worker to ask builds it, holding a lock, and the
    others wait for it and use what it built (a file or a directory that no test changes)."""
    done = path.with_name(path.name + ".done")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if path.is_dir():
                shutil.rmtree(path)
            path.unlink(missing_ok=True)  # a build that failed half-way
            build(path)
            done.touch()
    return path


def in_child(function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``function(*args, **kwargs)`` in a fresh Python process: a build of hundreds of MB gives its memory back when
    that process ends, instead of raising this worker's peak for the rest of the run."""
    process = multiprocessing.get_context("spawn").Process(target=function, args=args, kwargs=kwargs)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{function.__qualname__} failed in a child process (exit code {process.exitcode})")


def save_e4e_checkpoint(path: Path, seed: int, size: int) -> None:
    torch.save(synthetic_files.e4e_checkpoint(seed=seed, size=size), path)


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_directory(tmp_path_factory)


def shared_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's synthetic files and bundles are built once for all workers (pytest-xdist's workers share
    the parent of their own temporary directories)."""
    root = tmp_path_factory.getbasetemp()
    return (root.parent if XDIST_WORKER is not None else root) / "shared"


@pytest.fixture(scope="session")
def files(shared: Path) -> Path:
    return shared / "official"


@pytest.fixture(scope="session")
def predictor_files(shared: Path) -> dict[int, Path]:
    """Tiny dlib shape predictors (68 and 5 points) trained on drawn faces, by point count."""
    return drawn_faces.predictor_files_in(built_once(shared / "dlib", drawn_faces.train_predictors))


@pytest.fixture(scope="session")
def cfclip_64(files: Path) -> Path:
    return built_once(
        files / "green_lipstick_64.pt", lambda path: torch.save(synthetic_files.cfclip_checkpoint(64, seed=6), path)
    )


@pytest.fixture(scope="session")
def cfclip_256(files: Path) -> Path:
    return built_once(
        files / "green_lipstick_256.pt", lambda path: torch.save(synthetic_files.cfclip_checkpoint(256, seed=1), path)
    )


@pytest.fixture(scope="module")
def cfclip_1024(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The 1024 px file (213 MB): written for each module that uses it, deleted when that module is done."""
    path = tmp_path_factory.mktemp("official_1024") / "green_lipstick_1024.pt"
    torch.save(synthetic_files.cfclip_checkpoint(1024, seed=2), path)
    yield path
    path.unlink()


@pytest.fixture(scope="session")
def clip_state_dict_file(files: Path) -> Path:
    return built_once(
        files / "clip_text_open_clip.pt", lambda path: torch.save(synthetic_files.clip_text_state(seed=CLIP_SEED), path)
    )


@pytest.fixture(scope="session")
def clip_torchscript_file(files: Path) -> Path:
    return built_once(
        files / "ViT-B-32.pt",
        lambda path: synthetic_files.save_torchscript_archive(
            synthetic_files.clip_text_state(seed=CLIP_SEED, dtype=torch.float16), path
        ),
    )


@pytest.fixture(scope="session")
def clip_vit_b32_file(files: Path) -> Path:
    """Full CLIP ViT-B/32 weights, text and image towers (open_clip's state dict, seeded random): what refinement and
    training read. 600 MB, written once for the run."""
    from cfdeploy.models.clip_text import ClipText

    return built_once(
        files / "clip_vit_b32_full.pt", lambda path: torch.save(ClipText.random(seed=7).clip.state_dict(), path)
    )


def saved_array(path: Path, array: np.ndarray) -> Path:
    return built_once(path, lambda target: np.save(target, array))


@pytest.fixture(scope="session")
def latents_64(files: Path) -> Path:
    return saved_array(
        files / "latents_64.npy", np.random.default_rng(4).standard_normal((5, 10, 512)).astype(np.float32)
    )


@pytest.fixture(scope="session")
def latents_256(files: Path) -> Path:
    return saved_array(
        files / "latents_256.npy", np.random.default_rng(4).standard_normal((3, 14, 512)).astype(np.float32)
    )


@pytest.fixture(scope="session")
def embedding_file(files: Path) -> Path:
    return saved_array(files / "embedding.npy", np.random.default_rng(5).standard_normal(512).astype(np.float32))


def run_cli(*args: object):
    """Invoke ``cfdeploy`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from cfdeploy.cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args], prog_name="cfdeploy")


@pytest.fixture
def cli():
    """:func:`run_cli`, for tests."""
    return run_cli


def bundle_with_a_prompt(out: Path, checkpoint: Path, clip_weights: Path) -> Path:
    """``checkpoint`` exported through the CLI once for the run, with the CLIP text graph and "green lipstick"
    precomputed."""

    def export(target: Path) -> None:
        args = ("export", "-c", checkpoint, "--clip-weights", clip_weights, "--out", target)
        result = run_cli(*args, "--text", "green lipstick")
        assert result.exit_code == 0, result.stderr

    return built_once(out, export)


@pytest.fixture(scope="session")
def bundle_256(shared: Path, cfclip_256: Path, clip_state_dict_file: Path) -> Path:
    """The 256 px layout exported, for the tests where its size is the point (bf16's fidelity, the GPU runs)."""
    return bundle_with_a_prompt(shared / "bundles" / "green_lipstick_256", cfclip_256, clip_state_dict_file)


@pytest.fixture(scope="session")
def bundle_64(shared: Path, cfclip_64: Path, clip_state_dict_file: Path) -> Path:
    """The bundle edits, refits, hostile copies and the server use: a 64 px image costs a quarter of a 256 px one,
    and its graphs are mostly reused from the run's other exports."""
    return bundle_with_a_prompt(shared / "bundles" / "green_lipstick_64", cfclip_64, clip_state_dict_file)


@pytest.fixture(scope="session")
def bundle_64_without_clip(shared: Path, cfclip_64: Path) -> Path:
    """``cfclip_64`` exported through the CLI ``--without-clip`` and with no prompt: it edits with text embeddings."""

    def export(out: Path) -> None:
        result = run_cli("export", "-c", cfclip_64, "--without-clip", "-o", out)
        assert result.exit_code == 0, result.stderr

    return built_once(shared / "bundles" / "without_clip_64", export)


@pytest.fixture(scope="session")
def other_prompt_64(files: Path) -> Path:
    """Another prompt's 64 px checkpoint: ``cfclip_64``'s generator (seed 6) with mappers of seed 7."""
    return built_once(files / "other_prompt_64.pt", lambda path: checkpoint_with_generator_of(path, 6, 7, size=64))


@pytest.fixture(scope="session")
def other_prompt_bundle_64(shared: Path, other_prompt_64: Path, bundle_64_without_clip: Path) -> Path:
    """``other_prompt_64`` exported through the CLI ``--without-clip``, once for the run and after
    ``bundle_64_without_clip``: its generator and mapping come from the export cache, its mappers (exported nowhere
    else in the run) are traced anew."""

    def export(out: Path) -> None:
        result = run_cli("export", "-c", other_prompt_64, "--without-clip", "-o", out)
        assert result.exit_code == 0, result.stderr

    return built_once(shared / "bundles" / "other_prompt_64", export)


@pytest.fixture(scope="session")
def e4e_64(files: Path) -> Path:
    """An e4e checkpoint for the 64 px generator: the official encoder with 10 style blocks (what the official code
    builds for ``stylegan_size`` 64), its own generator, latent_avg; 600 MB."""
    return built_once(files / "e4e_64.pt", lambda path: in_child(save_e4e_checkpoint, path, seed=13, size=64))


@pytest.fixture(scope="session")
def bundle_with_encoder(
    shared: Path, cfclip_64: Path, clip_state_dict_file: Path, e4e_64: Path
) -> tuple[Path, Path, dict]:
    """``(e4e file, bundle, manifest)``: a 64 px bundle exported with the e4e encoder and without CLIP."""
    from cfdeploy.exporter import export_bundle

    out = built_once(
        shared / "bundles" / "with_encoder_64",
        lambda path: in_child(
            export_bundle, cfclip_64, clip_state_dict_file, path, include_clip_text=False, encoder=e4e_64
        ),
    )
    return e4e_64, out, json.loads((out / "manifest.json").read_text())


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads at ``count`` inside the block (tiny CPU training stalls with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def dac_base(shared: Path) -> Path:
    """A tiny random Stable Diffusion folder (cfdeploy.dac.synthetic)."""
    from cfdeploy.dac.synthetic import write_random_base_model

    return built_once(shared / "dac" / "tiny-sd", lambda path: write_random_base_model(path, "tiny"))


@pytest.fixture(scope="session")
def dac_image(shared: Path) -> Path:
    return built_once(shared / "dac-image" / "cat.png", synthetic_files.dac_image(seed=0).save)


@pytest.fixture(scope="session")
def dac_run(shared: Path, dac_base: Path, dac_image: Path) -> Path:
    """A complete DAC run on the tiny model, never interrupted."""
    from cfdeploy.dac.abduct import AbductInputs, AbductSettings, abduct

    def run(out: Path) -> None:
        with torch_threads(1):
            abduct(AbductSettings(DAC_PROMPT, DAC_TARGET, **FAST_DAC), AbductInputs(dac_image, dac_base), out)

    return built_once(shared / "dac-runs" / "cat_cap", run)


@pytest.fixture(scope="session")
def dac_bundle(shared: Path, dac_run: Path) -> Path:
    """``dac_run`` exported with the exact (scale-input) UNet."""
    from cfdeploy.dac.export import export_dac_bundle

    def export(out: Path) -> None:
        with torch_threads(1):
            export_dac_bundle(dac_run, out)

    return built_once(shared / "dac-bundles" / "cat_cap", export)
