"""Outputs with real processes, signals, locks and a really full disk: nothing lost, nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cfdeploy import outputs
from cfdeploy.errors import CfdeployError
from cfdeploy.outputs import (
    DirectoryLock,
    StagedDirectory,
    check_output_dir,
    check_output_file,
    write_atomic,
    write_npy_atomic,
)

# Holds the staged directory of its first argument open until killed; prints the staging path first.
HOLDER = """
import sys, time
from pathlib import Path
from cfdeploy.outputs import StagedDirectory

with StagedDirectory(Path(sys.argv[1]), force=True) as staged:
    staged.write_json("result.json", {"run": "killed"})
    print(staged.path, flush=True)
    time.sleep(120)
"""


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """An empty directory to put outputs in (resolved: messages name resolved paths)."""
    path = tmp_path.resolve() / "work"
    path.mkdir()
    return path


def previous_output(parent: Path) -> Path:
    out = parent / "out"
    out.mkdir()
    (out / "old.json").write_text("old")
    return out


def contents(directory: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in directory.iterdir()}


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"script_{len(list(tmp_path.glob('script_*')))}.py"
    path.write_text(textwrap.dedent(text))
    return path


def default_signals() -> None:
    """In the child: signals at their defaults, even when pytest runs under nohup or in the background."""
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(number, signal.SIG_DFL)


def hold(tmp_path: Path, out: Path) -> tuple[subprocess.Popen[str], Path]:
    process = subprocess.Popen(
        [sys.executable, script(tmp_path, HOLDER), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
    )
    assert process.stdout is not None
    staging = Path(process.stdout.readline().strip())
    assert staging.is_dir(), "the holder did not start"
    return process, staging


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def refusal(out: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> str:
    with pytest.raises(CfdeployError) as refused:
        with StagedDirectory(out, force, inputs):
            raise AssertionError("entered")
    return str(refused.value)


# --- --out . ----------------------------------------------------------------------------------


def test_out_dot_writes_into_the_empty_working_directory_and_force_replaces_its_contents(work, monkeypatch):
    monkeypatch.chdir(work)
    inode = os.stat(".").st_ino
    with StagedDirectory(Path("."), False) as staged:
        assert staged.in_place and staged.path.parent == work
        staged.write_json("first.json", {"run": 1})
    assert names(work) == ["first.json"] and names(work.parent) == ["work"]
    assert refusal(Path(".")) == f"{work}: directory is not empty (use --force to replace it)"
    (work / "subdir").mkdir()
    with StagedDirectory(Path("."), True) as staged:
        staged.write_json("first.json", {"run": 2})
        staged.write_npy("second.npy", np.arange(3, dtype=np.float32))
    assert names(work) == ["first.json", "second.npy"] and names(work.parent) == ["work"]
    assert json.loads((work / "first.json").read_text()) == {"run": 2}
    assert os.stat(".").st_ino == inode and Path.cwd() == work  # the shell's directory is still the output


def test_an_output_that_contains_the_working_directory_is_refused_even_with_force(work, monkeypatch):
    inside = work / "inside"
    inside.mkdir()
    monkeypatch.chdir(inside)
    assert (
        refusal(Path(".."), force=True)
        == f"{work}: contains the working directory {inside}; cfdeploy will not replace it"
    )
    assert names(work) == ["inside"] and names(work.parent) == ["work"]


# --- kills, signals, locks ----------------------------------------------------------------------


def test_kill_9_leaves_the_previous_output_and_the_next_run_removes_the_staging_directory(tmp_path, work):
    out = previous_output(work)
    process, staging = hold(tmp_path, out)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert staging.name == f".out.{process.pid}.partial" and (staging / "result.json").is_file()
    assert contents(out) == {"old.json": "old"}
    with StagedDirectory(out, True) as staged:
        assert not staging.exists()
        staged.write_json("result.json", {"run": "next"})
    assert names(work) == ["out"] and names(out) == ["result.json"]


@pytest.mark.parametrize(
    ("number", "status"), [(signal.SIGTERM, 128 + 15), (signal.SIGHUP, 128 + 1), (signal.SIGINT, -2)]
)
def test_a_terminated_run_removes_its_staging_directory_and_leaves_the_output(tmp_path, work, number, status):
    out = previous_output(work)
    process, _ = hold(tmp_path, out)
    process.send_signal(number)
    try:
        assert process.wait(timeout=30) == status
    finally:
        process.kill()
    assert names(work) == ["out"] and contents(out) == {"old.json": "old"}


def test_termination_handlers_are_restored_and_an_ignored_sighup_stays_ignored(work):
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StagedDirectory(work / "out", False):
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_second_run_for_the_same_output_fails_at_once_naming_the_first(tmp_path, work):
    out = previous_output(work)
    before = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() - 1))
    process, staging = hold(tmp_path, out)
    after = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + 1))
    try:
        started = time.monotonic()
        message = refusal(out, force=True)
        holder = f"pid {process.pid} on {platform.node()}, since "
        prefix = f"{out}: another cfdeploy run is writing this directory ({holder}"
        assert message.startswith(prefix), message
        since, command = message[len(prefix) :].split(": ", 1)
        assert before <= since <= after, since
        assert command.startswith("script_") and command.endswith(f".py {out})"), command
        assert time.monotonic() - started < 1.0
        with pytest.raises(CfdeployError) as refused:
            with DirectoryLock(out, timeout=0.3):
                pass
        assert str(refused.value) == f"{message[:-1]}); gave up after 0.3s"
        assert names(work) == sorted([".out.lock", staging.name, "out"])
    finally:
        process.terminate()
        process.wait()
    with DirectoryLock(out, timeout=0.3):
        recorded = json.loads((work / ".out.lock").read_text())
        assert recorded["pid"] == os.getpid() and recorded["host"] == platform.node()
    assert names(work) == ["out"] and contents(out) == {"old.json": "old"}


def test_a_run_killed_in_its_final_swap_leaves_staging_that_the_next_run_clears_even_under_a_reused_pid(work):
    """After the exchange the staging directory holds the old output; a kill while deleting it leaves it behind,
    named after a pid that the next run (a container's, say) may well have itself or see reused by another process."""
    out = previous_output(work)
    own = work / f".out.{os.getpid()}.partial"
    own.mkdir()
    (own / "old.json").write_text("old")
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        reused = work / f".out.{later.pid}.partial"
        reused.mkdir()
        (reused / "old.json").write_text("old")
        an_hour_ago = time.time() - 3600
        os.utime(reused, (an_hour_ago, an_hour_ago))  # last changed before that process started
        with StagedDirectory(out, True) as staged:
            staged.write_json("result.json", {"run": "next"})
    finally:
        later.kill()
        later.wait()
    assert names(work) == ["out"] and names(out) == ["result.json"]


def fail_while_writing(out, force: bool, failure: BaseException) -> None:
    """Write into a staged ``out``, then fail inside the block."""
    with StagedDirectory(out, force) as staged:
        staged.write_json("result.json", {})
        raise failure


def test_an_error_in_the_block_removes_staging_and_the_parents_it_made(work):
    out = previous_output(work)
    with pytest.raises(ValueError, match="model failed"):
        fail_while_writing(out, True, ValueError("model failed"))
    assert names(work) == ["out"] and contents(out) == {"old.json": "old"}
    with pytest.raises(KeyboardInterrupt):
        fail_while_writing(work / "made" / "for" / "out", False, KeyboardInterrupt())
    assert names(work) == ["out"]


# --- the swap -------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_renameat2_exchanges_two_directories_in_one_step(work):
    first, second = work / "first", work / "second"
    for directory in (first, second):
        directory.mkdir()
        (directory / "name").write_text(directory.name)
    assert outputs._exchange(first, second)
    assert (first / "name").read_text() == "second" and (second / "name").read_text() == "first"


def test_without_renameat2_a_kill_between_the_two_renames_is_undone_by_the_next_run(work, monkeypatch):
    monkeypatch.setattr(outputs, "_renameat2", None)
    out = previous_output(work)
    with StagedDirectory(out, True) as staged:
        staged.write_json("new.json", {})
    assert names(work) == ["out"] and names(out) == ["new.json"]
    # what a kill between the renames leaves: out moved aside, the finished staging directory beside it
    dead = dead_pid()
    out.rename(work / f".out.{dead}.old")
    (work / f".out.{dead}.partial").mkdir()
    (work / f".out.{dead}.partial" / "newer.json").write_text("{}")
    assert refusal(out) == f"{out}: directory is not empty (use --force to replace it)"
    assert names(work) == ["out"] and names(out) == ["new.json"]


def test_without_renameat2_a_failed_second_rename_puts_the_old_directory_back(work, monkeypatch):
    monkeypatch.setattr(outputs, "_renameat2", None)
    out = previous_output(work)
    new = work / "staged"
    new.mkdir()
    rename = os.rename

    def second_rename_fails(source, target):
        if Path(source) == new:
            raise OSError(errno.EIO, "I/O error")
        rename(source, target)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="I/O error"):
        outputs.replace_directory(new, out)
    monkeypatch.setattr(os, "rename", rename)
    assert names(work) == ["out", "staged"] and contents(out) == {"old.json": "old"}


def test_permissions_come_from_the_umask_or_from_the_replaced_directory(work):
    kept = previous_output(work)
    kept.chmod(0o711)
    mask = os.umask(0o027)
    try:
        with StagedDirectory(work / "new", False) as staged:
            staged.write_json("a.json", {})
        with StagedDirectory(kept, True) as staged:
            staged.write_png("a.png", np.zeros((4, 4, 3), np.uint8), compress_level=1)
        write_atomic(work / "file", b"x")
    finally:
        os.umask(mask)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert (mode(work / "new"), mode(work / "new" / "a.json")) == (0o750, 0o640)
    assert (mode(kept), mode(kept / "a.png"), mode(work / "file")) == (0o711, 0o640, 0o640)


# --- refusals -------------------------------------------------------------------------------------


def test_outputs_that_cannot_be_replaced_safely_are_refused_before_anything_is_made(work):
    target = work / "target"
    target.mkdir()
    (work / "file").write_text("x")
    (work / "dangling").symlink_to(work / "missing")
    (work / "link").symlink_to(target)
    before = names(work)
    assert refusal(work / "file", True) == f"{work / 'file'}: exists and is not a directory"
    assert refusal(work / "dangling", True) == (
        f"{work / 'dangling'}: is a dangling symbolic link (to {work / 'missing'}); remove it or choose another path"
    )
    assert refusal(work / "link", True) == (
        f"{work / 'link'}: is a symbolic link (to {target}); give the real path, cfdeploy never replaces a link"
    )
    assert refusal(Path("/"), True) == "/: is the root directory; choose a directory below it"
    assert names(work) == before and names(target) == []


def test_force_never_replaces_an_input(work):
    bundle = work / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    out = previous_output(work)
    (out / "latents.npy").write_text("x")
    elsewhere = work / "elsewhere.pt"
    elsewhere.write_text("x")
    (out / "linked.pt").symlink_to(elsewhere)
    before = {name: names(work / name) for name in ("bundle", "out")}
    assert refusal(bundle, True, (bundle,)) == f"{bundle}: is the input {bundle}; choose another output"
    assert (
        refusal(out, True, (out / "latents.npy",))
        == f"{out}: contains the input {out / 'latents.npy'}; choose another output"
    )
    assert (
        refusal(out, True, (elsewhere, out / "linked.pt"))
        == f"{out}: contains the input {out / 'linked.pt'}; choose another output"
    )
    assert (
        refusal(bundle / "edits", True, (bundle,))
        == f"{bundle / 'edits'}: lies inside the input {bundle}; choose an output outside it"
    )
    assert {name: names(work / name) for name in ("bundle", "out")} == before
    check_output_dir(out, True, (elsewhere,))  # the link's target outside out is fine on its own


def test_output_files_are_checked_like_directories(work):
    existing = work / "embedding.npy"
    existing.write_text("x")
    (work / "link.npy").symlink_to(existing)
    with pytest.raises(CfdeployError, match=r"embedding\.npy: file exists \(use --force to replace it\)$"):
        write_npy_atomic(existing, np.zeros(2), force=False)
    with pytest.raises(
        CfdeployError, match=r"link\.npy: is a symbolic link \(to .*embedding\.npy\); give the real path"
    ):
        write_npy_atomic(work / "link.npy", np.zeros(2), force=True)
    with pytest.raises(CfdeployError, match=rf"^{work}: is a directory, expected a file path$"):
        check_output_file(work, force=True)
    with pytest.raises(CfdeployError, match=r"embedding\.npy: is the input .*; choose another output$"):
        check_output_file(existing, force=True, inputs=(existing,))
    write_npy_atomic(work / "new" / "embedding.npy", np.arange(3.0), force=False)
    assert np.load(work / "new" / "embedding.npy").tolist() == [0.0, 1.0, 2.0]
    assert names(work) == ["embedding.npy", "link.npy", "new"] and existing.read_text() == "x"


# --- writers --------------------------------------------------------------------------------------


def test_atomic_writes_leave_the_previous_file_on_any_error(work):
    path = work / "generator.engine"
    write_atomic(path, b"plan 1")

    def fails_halfway(stream):
        stream.write(b"half a plan")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, fails_halfway)
    assert path.read_bytes() == b"plan 1" and names(work) == ["generator.engine"]
    write_atomic(path, lambda stream: stream.write(b"plan 2"))
    assert path.read_bytes() == b"plan 2" and names(work) == ["generator.engine"]


def test_arrays_are_written_block_by_block_and_their_row_count_is_checked(work):
    rows = np.random.default_rng(0).standard_normal((5, 2, 3))
    with StagedDirectory(work / "out", False) as staged:
        writer = staged.open_array("latents.npy", (5, 2, 3))
        writer.write(rows[:2])
        writer.write(rows[2:])
        with pytest.raises(
            CfdeployError, match=r"latents\.npy: rows of shape \(1, 2, 3\) do not fit \(5, 2, 3\) after 5 rows$"
        ):
            writer.write(rows[:1])
        staged.open_array("unclosed.npy", (1, 2)).write(np.ones((1, 2)))
    assert np.array_equal(np.load(work / "out" / "latents.npy"), rows.astype(np.float32))
    assert np.load(work / "out" / "unclosed.npy").tolist() == [[1.0, 1.0]]
    with pytest.raises(CfdeployError) as refused:
        with StagedDirectory(work / "short", False) as staged:
            staged.open_array("images.npy", (4, 3)).write(np.zeros((3, 3)))
    assert str(refused.value) == f"{work / 'short'}/images.npy: 3 of 4 rows were written"
    assert names(work) == ["out"]


def test_png_compression_level_is_checked(work):
    with pytest.raises(CfdeployError, match=r"^PNG compression level must be 0 to 9, got 10$"):
        with StagedDirectory(work / "out", False) as staged:
            staged.write_png("a.png", np.zeros((2, 2, 3), np.uint8), compress_level=10)
    assert names(work) == []


# --- a full disk ------------------------------------------------------------------------------------

FULL_DISK = """
import json, sys
from pathlib import Path
import numpy as np
from cfdeploy.errors import CfdeployError
from cfdeploy.outputs import StagedDirectory, write_atomic

disk = Path(sys.argv[1])
out = disk / "out"
out.mkdir()
(out / "old.json").write_text("old")
(disk / "engine").write_bytes(b"old engine")
big = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB on a 512 KiB disk
noise = np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)  # 768 KiB as PNG
writes = {
    "npy": lambda staged: staged.write_npy("big.npy", big),
    "png": lambda staged: staged.write_png("big.png", noise),
    "array": lambda staged: staged.open_array("images.npy", big.shape).write(big),
    "direct": lambda staged: (staged.path / "graph.onnx").write_bytes(big.tobytes()),
}
messages = {}
for name, write in writes.items():
    try:
        with StagedDirectory(out, force=True) as staged:
            write(staged)
    except CfdeployError as error:
        messages[name] = str(error)
try:
    write_atomic(disk / "engine", big.tobytes())
except CfdeployError as error:
    messages["file"] = str(error)
before = {"names": sorted(path.name for path in disk.iterdir()), "old": (out / "old.json").read_text(),
          "engine": (disk / "engine").read_text()}
with StagedDirectory(disk, force=True) as staged:  # a mount point is written in place
    staged.write_json("fits.json", {"ok": True})
print(json.dumps({"messages": messages, "before": before, "names": sorted(path.name for path in disk.iterdir())}))
"""


@pytest.fixture(scope="module")
def small_tmpfs(tmp_path_factory):
    """How to run a command with a real 512 KiB file system mounted at its first argument (a user namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    command = [
        "unshare",
        "--mount",
        "--map-root-user",
        "sh",
        "-c",
        'mount -t tmpfs -o size=512k cfdeploy "$1" && shift && exec "$@"',
        "sh",
    ]
    probe = subprocess.run([*command, str(tmp_path_factory.mktemp("probe")), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    return command


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_behind(tmp_path, small_tmpfs):
    disk = tmp_path.resolve() / "disk"
    disk.mkdir()
    result = subprocess.run(
        [*small_tmpfs, str(disk), sys.executable, script(tmp_path, FULL_DISK), str(disk)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    out = disk / "out"
    kept = f"{out} was left as it was"
    assert report["messages"] == {
        "npy": f"{out}/big.npy: no space left on device; {kept}",
        "png": f"{out}/big.png: no space left on device; {kept}",
        "array": f"{out}/images.npy: no space left on device; {kept}",
        "direct": f"{out}: no space left on device; it was left as it was",
        "file": f"{disk}/engine: no space left on device; the previous file, if any, is unchanged",
    }
    assert report["before"] == {"names": ["engine", "out"], "old": "old", "engine": "old engine"}
    assert report["names"] == ["fits.json"]  # a mount point's contents replaced in place


EFBIG = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from cfdeploy.errors import CfdeployError
from cfdeploy.outputs import StagedDirectory

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    with StagedDirectory(Path(sys.argv[1]), force=False) as staged:
        staged.open_array("images.npy", (64, 1024)).write(np.zeros((64, 1024)))
except CfdeployError as error:
    print(error)
"""


def test_a_file_size_limit_is_one_line_too(tmp_path, work):
    result = subprocess.run(
        [sys.executable, script(tmp_path, EFBIG), str(work / "out")], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == (
        f"{work}/out/images.npy: file too large for the file system (or the process's file size limit); "
        f"{work}/out was left as it was\n"
    )
    assert names(work) == []
