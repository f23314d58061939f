"""Hostile and careless input files: each is built here, and each must be refused with one line naming the
file and the problem, exit code 2, no traceback, nothing written, and no code of the file ever run."""

import gzip
import os
import pickle
import shlex
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import synthetic_files
from cfdeploy.checkpoints import read_clip_state
from cfdeploy.errors import CfdeployError
from cfdeploy.tokenizer import ClipTokenizer, packaged_vocab_path
from conftest import assert_refused, messages

FIFO_RESCUE_AFTER_S = 20.0
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


@pytest.fixture
def edit(cli, tmp_path, cfclip_64, latents_64, embedding_file):
    """``cfdeploy edit`` with good inputs, any of them overridden by keyword; returns (result, out)."""

    def run(**overrides):
        out = tmp_path / "out"
        options = {
            "--checkpoint": cfclip_64,
            "--latents": latents_64,
            "--text-embedding": embedding_file,
            "--out": out,
            **overrides,
        }
        return cli("edit", *[part for pair in options.items() for part in pair]), out

    return run


def saved(path: Path, content) -> Path:
    torch.save(content, path)
    return path


def rewritten(archive: Path, out: Path, replacements: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    """A copy of a zip, some entries (named relative to its root folder) given other contents."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(out, "w", compression) as target:
        root = source.namelist()[0].split("/")[0]
        for entry in source.infolist():
            data = replacements.get(entry.filename.removeprefix(f"{root}/"), source.read(entry))
            target.writestr(entry.filename, data)
    return out


# --- TorchScript archives: read as zips, never by torch.jit.load -------------------------------------------


class Planter(nn.Module):
    """A scripted module whose ``__setstate__`` creates a file: ``torch.jit.load`` runs it while loading."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.weight = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        self.training = state[2]
        # shared=True maps the named file read-write, creating it: any file the archive names is planted.
        self.weight = state[1] + torch.from_file(self.marker, True, 1, dtype=torch.uint8).float()


class Tiny(nn.Module):
    """A genuine scripted module, the carrier for pickle payloads."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Masked(nn.Module):
    """Like CLIP's traced text tower: fp16 weights, a buffer, and a tensor constant (its causal mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("context_length", torch.tensor(77))
        self.mask = torch.full((4, 4), float("-inf")).triu(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.mask.clamp(min=-1.0)


class Payload:
    """A classic pickle payload: unpickling it calls ``function(argument)``."""

    def __init__(self, function, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("torchscript") / "tiny.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    return path


def test_openai_layout_archive_reads_bit_exactly_what_torchscript_gives(clip_torchscript_file):
    ours = read_clip_state(clip_torchscript_file)
    theirs = torch.jit.load(str(clip_torchscript_file)).state_dict()  # the test's own trusted file
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key], tensor), key
    assert ours["token_embedding.weight"].dtype == torch.float16


def test_traced_archive_gives_parameters_and_buffers_not_its_constants(tmp_path):
    path = tmp_path / "traced.pt"
    traced = torch.jit.trace(Masked().half(), torch.zeros(1, 4, dtype=torch.float16))
    torch.jit.save(traced, str(path))
    with zipfile.ZipFile(path) as archive:
        assert any("/constants/" in name for name in archive.namelist())  # the mask is stored as a constant
    ours = read_clip_state(path)
    theirs = torch.jit.load(str(path)).state_dict()
    assert ours.keys() == {"proj.weight", "proj.bias", "context_length"} == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) and ours[key].dtype == theirs[key].dtype for key in theirs)


def test_scripted_setstate_is_refused_and_never_runs(cli, tmp_path):
    marker = tmp_path / "planted.pth"
    archive = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(Planter(str(marker))), str(archive))
    refusal = (
        f"error: {archive}: refused to load: __torch__.",
        "Planter restores its state with its own TorchScript code (__setstate__), which cfdeploy never runs",
    )
    assert_refused(cli("inspect", archive), None, *refusal)
    out = tmp_path / "features.npy"
    assert_refused(cli("embed", "green lipstick", "--clip-weights", archive, "--out", out), out, *refusal)
    assert not marker.exists()
    torch.jit.load(str(archive))  # what loading it with TorchScript does: the file is planted
    assert marker.exists()


@pytest.mark.parametrize("entry", ["data.pkl", "constants.pkl"])
@pytest.mark.parametrize("function", [os.system, exec], ids=["os.system", "exec"])
def test_pickle_payload_in_an_archive_is_refused_naming_the_global(cli, tmp_path, tiny_archive, entry, function):
    marker = tmp_path / "code_ran"
    argument = f"touch {shlex.quote(str(marker))}" if function is os.system else f"open({str(marker)!r}, 'w').close()"
    payload = pickle.dumps(Payload(function, argument), protocol=4)  # protocol 2 would name builtins __builtin__
    archive = rewritten(tiny_archive, tmp_path / "ViT-B-32.pt", {entry: payload})
    global_name = f"{function.__module__}.{function.__name__}"
    assert_refused(
        cli("inspect", archive),
        None,
        f"error: {archive}: refused to load: it references {global_name}, which could run code",
    )
    assert not marker.exists()
    pickle.loads(payload)  # what an unrestricted unpickler does with it
    assert marker.exists()


def test_archive_whose_tensor_entry_is_short_is_refused(cli, tmp_path, tiny_archive):
    archive = rewritten(tiny_archive, tmp_path / "short.pt", {"data/0": b"\0" * 4})
    assert_refused(
        cli("inspect", archive),
        None,
        f"{archive}: not a readable TorchScript archive",
        "holds 4 bytes, not the 6 torch.float32 declared",
    )


# --- Declared sizes checked before allocating ---------------------------------------------------------------


def test_zip_declaring_far_more_than_it_holds_is_refused_before_reading(cli, edit, tmp_path):
    plain = saved(tmp_path / "plain.pt", {"state_dict": {"decoder.x": torch.zeros(4 << 20)}})
    bomb = rewritten(plain, tmp_path / "bomb.pt", {}, compression=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    with zipfile.ZipFile(bomb) as archive:
        data_entry = next(name for name in archive.namelist() if name.endswith("/data/0"))
    message = (
        f"{bomb}: zip entry {data_entry} declares 16,777,216 bytes, far more than the {bomb.stat().st_size:,}-byte"
    )
    result, out = edit(**{"--checkpoint": bomb})
    assert_refused(result, out, message)
    assert_refused(cli("inspect", bomb), None, message)


def write_npy_header(path: Path, shape: tuple[int, ...], data: bytes) -> Path:
    with path.open("wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": shape})
        file.write(data)
    return path


def test_npy_declaring_more_than_it_holds_is_refused_before_allocating(cli, edit, tmp_path):
    path = write_npy_header(tmp_path / "huge.npy", (100_000, 14, 512), b"\0" * 1024)
    result, out = edit(**{"--latents": path})
    assert_refused(
        result,
        out,
        f"{path}: the .npy header declares latents [100000, 14, 512] float32 (2,867,200,000 bytes) "
        "but the file holds 1,024 bytes of data",
    )
    assert_refused(cli("inspect", path), None, f"{path}: the .npy header declares array [100000, 14, 512]")


def test_npy_of_python_objects_is_refused(cli, tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"w": 1}], dtype=object), allow_pickle=True)
    assert_refused(
        cli("inspect", path), None, f"{path}: the .npy array holds Python objects (pickled), which are never loaded"
    )


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc to set a memory limit")
def test_memory_error_while_reading_names_the_file(tmp_path):
    """A file that honestly holds more than the process may allocate (a sparse 256 MiB .npy, 64 MiB allowed)."""
    path = write_npy_header(tmp_path / "big.npy", (256, 1024, 256), b"")
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size + (256 << 20))
    limit_then_inspect = (
        "import resource, sys\n"
        "import cfdeploy.inspection\n"
        "from cfdeploy.cli import app\n"
        "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + (64 << 20), resource.RLIM_INFINITY))\n"
        "app(['inspect', sys.argv[1]])\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", limit_then_inspect, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        timeout=120,
    )
    assert process.returncode == 2, process.stderr
    assert messages(process.stderr) == f"error: {path}: reading it needs more memory than this machine has"


# --- FIFOs, devices and directories ----------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path):
    """A FIFO. Should a reader ever block on it (the bug), a writer connects and closes after a while, so the
    test fails on the message instead of hanging."""
    path = tmp_path / "input.npy"
    os.mkfifo(path)
    done = threading.Event()

    def rescue() -> None:
        if not done.wait(FIFO_RESCUE_AFTER_S):
            with path.open("wb"):
                pass

    threading.Thread(target=rescue, daemon=True).start()
    yield path
    done.set()


@pytest.mark.parametrize("option", ["--checkpoint", "--latents", "--text-embedding"])
def test_fifo_input_is_refused_not_read(edit, fifo, option):
    result, out = edit(**{option: fifo})
    assert_refused(result, out, f"error: {fifo}: not a regular file (a FIFO)")


def test_fifo_clip_weights_and_inspect_are_refused(cli, tmp_path, fifo):
    out = tmp_path / "features.npy"
    assert_refused(
        cli("embed", "a dog", "--clip-weights", fifo, "--out", out), out, f"{fifo}: not a regular file (a FIFO)"
    )
    assert_refused(cli("inspect", fifo), None, f"{fifo}: not a regular file (a FIFO)")


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_device_and_directory_inputs_are_refused(cli, edit, tmp_path):
    assert_refused(cli("inspect", "/dev/null"), None, "/dev/null: not a regular file (a character device)")
    directory = tmp_path / "checkpoint.pt"
    directory.mkdir()
    result, out = edit(**{"--checkpoint": directory})
    assert_refused(result, out, f"{directory}: not a regular file (a directory)")


# --- Non-finite weights and malformed options -------------------------------------------------------------------


def test_cfclip_checkpoint_with_nan_weights_is_refused_naming_the_first_bad_key(edit, tmp_path):
    content = synthetic_files.cfclip_checkpoint(256, seed=6)
    state = content["state_dict"]
    state["mapper.fc.weight"][0, 0] = float("nan")
    state["decoder.convs.3.conv.weight"].view(-1)[:12] = torch.tensor([float("nan"), float("inf")] * 6)
    first = next(key for key in state if key in ("mapper.fc.weight", "decoder.convs.3.conv.weight"))
    count = 12 if first.startswith("decoder.") else 1
    path = saved(tmp_path / "nan.pt", content)
    result, out = edit(**{"--checkpoint": path})
    assert_refused(result, out, f"error: {path}: {first} has {count} NaN/inf values")


@pytest.mark.parametrize(
    "key,message",
    [
        ("g_ema.to_rgbs.0.conv.weight", "g_ema.to_rgbs.0.conv.weight has 3 NaN/inf values"),
        ("latent_avg", "latent_avg has 3 NaN/inf values"),
    ],
)
def test_rosinality_checkpoint_with_inf_is_refused(cli, tmp_path, key, message):
    generator = synthetic_files.cfclip_checkpoint(256, seed=7)["state_dict"]
    content = {
        "g_ema": {
            name.removeprefix("decoder."): value for name, value in generator.items() if name.startswith("decoder.")
        },
        "latent_avg": torch.randn(512),
    }
    bad = content["latent_avg"] if key == "latent_avg" else content["g_ema"][key.removeprefix("g_ema.")]
    bad.view(-1)[:3] = float("-inf")
    path = saved(tmp_path / "stylegan2.pt", content)
    assert_refused(cli("inspect", path), None, f"error: {path}: {message}")


@pytest.mark.parametrize("file_format", ["pt", "safetensors", "torchscript"])
def test_clip_weights_with_nan_are_refused(cli, tmp_path, file_format):
    state = {
        "ln_final.weight": torch.ones(512, dtype=torch.float16),
        "ln_final.bias": torch.zeros(512, dtype=torch.float16),
    }
    state["ln_final.bias"][7] = float("nan")
    path = tmp_path / f"clip.{'safetensors' if file_format == 'safetensors' else 'pt'}"
    if file_format == "pt":
        torch.save(state, path)
    elif file_format == "safetensors":
        save_file(state, str(path))
    else:
        synthetic_files.save_torchscript_archive(state, path)
    out = tmp_path / "features.npy"
    result = cli("embed", "a dog", "--clip-weights", path, "--out", out)
    assert_refused(result, out, f"error: {path}: ln_final.bias has 1 NaN/inf values")


def test_non_numeric_stylegan_size_is_refused(cli, tmp_path):
    path = saved(tmp_path / "odd_opts.pt", synthetic_files.cfclip_checkpoint(256, stylegan_size="abc"))
    assert_refused(cli("inspect", path), None, f"error: {path}: opts.stylegan_size 'abc' is not a number")


def test_a_mapper_flag_that_is_not_a_boolean_is_refused(cli, tmp_path):
    """The string "False" is truthy: read as a flag it would drop the fine mapper of a file that has one."""
    path = saved(tmp_path / "odd_flag.pt", synthetic_files.cfclip_checkpoint(64, no_fine_mapper="False"))
    assert_refused(
        cli("inspect", path), None, f"error: {path}: opts.no_fine_mapper must be true or false, found 'False'"
    )


# --- Prompts and the tokenizer's vocabulary ---------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \t "])
def test_empty_prompt_is_refused(cli, tmp_path, clip_state_dict_file, prompt):
    out = tmp_path / "features.npy"
    result = cli("embed", prompt, "--clip-weights", clip_state_dict_file, "--out", out)
    assert_refused(result, out, f"error: prompt {prompt!r} is empty (or only whitespace)")


def test_prompt_that_is_not_utf8_is_refused(cli, tmp_path, clip_state_dict_file):
    prompt = os.fsdecode(b"caf\xe9 au lait")  # how Python hands over a Latin-1 argument: a lone surrogate
    out = tmp_path / "features.npy"
    result = cli("embed", prompt, "--clip-weights", clip_state_dict_file, "--out", out)
    assert_refused(result, out, r"error: prompt 'caf\udce9 au lait' is not valid UTF-8 text")


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1)


def genuine_vocab_lines() -> list[bytes]:
    return gzip.decompress(packaged_vocab_path().read_bytes()).split(b"\n")


@pytest.mark.parametrize(
    "content,problem",
    [
        (b"i n\nt h\n", "not a readable CLIP BPE merges file: Not a gzipped file"),
        (gzipped(b"#version: 0.2\nca f\xe9\n"), "not a CLIP BPE merges file: invalid UTF-8 at byte 18 (uncompressed)"),
        (gzipped(b"#version: 0.2\ni n"), "not a CLIP BPE merges file: 1 merges where CLIP's vocabulary has 48,894"),
        (gzipped(b"i n\n" * (5 << 20)), "not a CLIP BPE merges file: more than 16,777,216 bytes uncompressed"),
    ],
    ids=["not-gzip", "latin-1", "short", "gzip-bomb"],
)
def test_bad_vocabulary_file_is_refused_naming_it(tmp_path, content, problem):
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    path.write_bytes(content)
    with pytest.raises(CfdeployError) as refused:
        ClipTokenizer(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: {problem}") and "\n" not in message, message


def test_vocabulary_with_a_malformed_line_is_refused_naming_the_line(tmp_path):
    lines = genuine_vocab_lines()
    lines[3] = b"t h e"
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    path.write_bytes(gzipped(b"\n".join(lines)))
    with pytest.raises(CfdeployError) as refused:
        ClipTokenizer(path)
    assert str(refused.value) == f"{path}: line 4 is not a merge of two symbols: 't h e'"
