"""Writing results so that nothing is lost and nothing is left behind, even when a run is killed.

Three pieces, for POSIX systems (``fcntl`` locks, ``rename``), Linux first:

- :func:`write_atomic`, the package's one file writer: a temporary sibling named after the owner's
  pid, written, flushed, fsynced and renamed over the target, so a reader sees the old file or the
  new one, never half of one.
- :class:`DirectoryLock`: one writer per directory at a time (``.NAME.lock`` beside it); whoever holds
  it also clears what killed runs left for that directory.
- :class:`StagedDirectory`: an output directory built in a staging directory and swapped into place
  only when the command succeeds.

The swap. On Linux, ``renameat2(RENAME_EXCHANGE)`` exchanges the staging directory and the old output
in one step, so the output path is never missing, whenever the process is killed. Where the system
or file system lacks it (another OS, glibc before 2.28, NFS), two renames are used: the old output
moves aside to ``.NAME.<pid>.old``, then the new one moves in. A kill between those two renames
leaves the output missing for an instant, with the old one beside it: the next cfdeploy run for that
directory (anything that takes its :class:`DirectoryLock`) moves it back before doing anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import json
import os
import platform
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from cfdeploy.environment import process_stat
from cfdeploy.errors import CfdeployError

# Errors that mean "the disk cannot take more", each with the words the one-line message uses.
_DISK_FULL = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system (or the process's file size limit)",
}
# A write_atomic temporary file: .NAME.<pid>.<8 hex digits>.partial beside its target.
_ATOMIC_PARTIAL = re.compile(r"\..+\.\d{1,9}\.[0-9a-f]{8}\.partial")
# Staging directory of an in-place run (see StagedDirectory), inside the output directory itself.
_IN_PLACE_STAGING = re.compile(r"\.cfdeploy\.(\d{1,9})\.partial")
_TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_MAX_SHOWN_COMMAND = 300  # characters of the lock holder's command line kept for the busy message


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Generator output ``[B, 3, S, S]`` in about [-1, 1] → ``[B, S, S, 3]`` uint8, as the official code saves."""
    unit = (np.clip(images, -1.0, 1.0) + 1.0) / 2.0
    pixels: np.ndarray = np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return pixels


# --- files ------------------------------------------------------------------------------------


def save_png(stream: BinaryIO, pixels: np.ndarray, compress_level: int = 6) -> None:
    """``[H, W, 3]`` uint8 ``pixels`` as PNG; zlib level 0-9. One encoder, so files and served PNGs are the same bytes."""
    if compress_level not in range(10):
        raise CfdeployError(f"PNG compression level must be 0 to 9, got {compress_level}")
    Image.fromarray(pixels).save(stream, format="PNG", compress_level=compress_level)


def png_bytes(pixels: np.ndarray, compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    save_png(buffer, pixels, compress_level)
    return buffer.getvalue()


def write_atomic(path: Path, content: bytes | Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with ``content`` (bytes, or a function that writes to a binary stream) in one step.

    The new file gets ordinary permissions from the umask. On any error, KeyboardInterrupt included,
    the temporary file is removed and ``path`` is as it was; a full disk is a one-line CfdeployError.
    """
    with _disk_errors(path, "the previous file, if any, is unchanged"):
        _replace_file(path, content)


def write_npy_atomic(path: Path, array: np.ndarray, force: bool) -> None:
    """Write ``array`` to the ``.npy`` file ``path`` atomically; an existing file needs ``force``."""
    check_output_file(path, force)
    make_parents(path)
    write_atomic(path, npy_bytes(array))


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in ``.npy`` format, for small arrays (large ones: :class:`ArrayWriter`).

    Not ``np.save`` to the file: on a real file numpy writes with ``tofile``, whose failure on a full
    disk is an OSError without an errno.
    """
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def check_output_file(path: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output file path that cannot be replaced safely (call it before slow work)."""
    target = _located(path)
    _refuse_links(target)
    if target.is_dir():
        raise CfdeployError(f"{target}: is a directory, expected a file path")
    if target.exists() and not target.is_file():
        raise CfdeployError(f"{target}: exists and is not a regular file")
    _refuse_inputs(target, inputs)
    if target.exists() and not force:
        raise CfdeployError(f"{target}: file exists (use --force to replace it)")


def clear_partial_files(directory: Path) -> None:
    """Delete the temporary files of :func:`write_atomic` calls that were killed, in ``directory``.

    Only for a caller that knows no writer into ``directory`` is running (it holds the lock every writer
    there runs under): such a file is named after its writer's pid, which may be on another host.
    """
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if _ATOMIC_PARTIAL.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _replace_file(path: Path, content: bytes | Callable[[BinaryIO], None]) -> None:
    """The one implementation behind every file cfdeploy writes."""
    partial = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    stream = _create(partial)
    try:
        with stream:
            if isinstance(content, bytes):
                stream.write(content)
            else:
                content(stream)
            _make_durable(stream)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _create(path: Path) -> BinaryIO:
    """A new file (never an existing one, never through a link) with the umask's permissions."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def _make_durable(stream: BinaryIO) -> None:
    stream.flush()
    os.fsync(stream.fileno())


@contextlib.contextmanager
def _disk_errors(shown: Path, unchanged: str) -> Iterator[None]:
    """Turn a full disk (or quota, or file size limit) into one line naming ``shown``."""
    try:
        yield
    except OSError as error:
        if error.errno not in _DISK_FULL:
            raise
        raise CfdeployError(f"{shown}: {_DISK_FULL[error.errno]}; {unchanged}") from error


# --- checks -----------------------------------------------------------------------------------


def check_output_dir(out: Path, force: bool, inputs: Sequence[Path] = (), unfinished: str | None = None) -> None:
    """Refuse an output directory that cannot be replaced safely (StagedDirectory calls it on entry).

    Refused: a file; a symbolic link, dangling or not (a link is never replaced, nor written through);
    the root; a directory that is, contains or lies inside one of ``inputs``; a directory that
    contains the working directory; a non-empty directory without ``force``. ``unfinished`` names what the
    directory holds that ``--resume`` continues, which that refusal then points to rather than to ``--force``.
    """
    target = _located(out)
    _refuse_links(target)
    if target == target.parent:
        raise CfdeployError(f"{target}: is the root directory; choose a directory below it")
    if target.exists() and not target.is_dir():
        raise CfdeployError(f"{target}: exists and is not a directory")
    _refuse_inputs(target, inputs)
    if not target.is_dir() or not _has_user_entries(target):
        return
    working = _working_directory()
    if working is not None and target in working.parents:
        raise CfdeployError(f"{target}: contains the working directory {working}; cfdeploy will not replace it")
    if not force:
        if unfinished:
            raise CfdeployError(f"{target}: holds {unfinished} (--resume continues it, --force replaces it)")
        raise CfdeployError(f"{target}: directory is not empty (use --force to replace it)")


def _located(path: Path) -> Path:
    """``path`` made absolute with its parent directories resolved; the last part is kept (it may be a link)."""
    absolute = Path(os.path.abspath(path))
    return absolute.parent.resolve() / absolute.name


def _refuse_links(target: Path) -> None:
    if not target.is_symlink():
        return
    if not target.exists():
        raise CfdeployError(
            f"{target}: is a dangling symbolic link (to {os.readlink(target)}); remove it or choose another path"
        )
    raise CfdeployError(
        f"{target}: is a symbolic link (to {os.readlink(target)}); give the real path, cfdeploy never replaces a link"
    )


def refuse_inputs(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output path that is, contains or lies inside one of ``inputs``, for writers that do not stage.

    :func:`check_output_dir` and :func:`check_output_file` check it too; ``--force`` never lifts it.
    """
    _refuse_inputs(_located(out), inputs)


def _refuse_inputs(target: Path, inputs: Sequence[Path]) -> None:
    """An output must not be, contain or lie inside what the command reads (link or link target)."""
    for given in inputs:
        try:
            candidates = {_located(given), Path(given).resolve()}
        except (RuntimeError, OSError):  # Python before 3.13 raises RuntimeError for a loop, later ones OSError
            raise CfdeployError(f"{given}: cannot be read: a loop of symbolic links") from None
        for candidate in candidates:
            if candidate == target:
                raise CfdeployError(f"{target}: is the input {given}; choose another output")
            if target in candidate.parents:
                raise CfdeployError(f"{target}: contains the input {given}; choose another output")
            if candidate in target.parents:
                raise CfdeployError(f"{target}: lies inside the input {given}; choose an output outside it")


def _has_user_entries(directory: Path) -> bool:
    """Whether ``directory`` holds anything but an in-place run's staging directory."""
    with os.scandir(directory) as entries:
        return any(_IN_PLACE_STAGING.fullmatch(entry.name) is None for entry in entries)


def _working_directory() -> Path | None:
    try:
        return Path.cwd().resolve()
    except FileNotFoundError:  # the working directory was deleted
        return None


def make_parents(path: Path) -> None:
    """Create ``path``'s missing parent directories; failure is one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CfdeployError(f"{path.parent}: cannot create the directory ({error.strerror})") from None


# --- moving directories -----------------------------------------------------------------------


def _find_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc before 2.28
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_renameat2 = _find_renameat2()


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``); False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _swap_into_place(new: Path, target: Path) -> None:
    """Put ``new`` at ``target`` and delete what was there (see the module's docstring for the guarantees)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):
        _discard(new)  # now the old one
        return
    aside = target.parent / f".{target.name}.{os.getpid()}.old"
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _discard(aside)


def _discard(path: Path) -> None:
    """Delete a file or a tree we own; failures only leave debris that the next run clears."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_directory(directory: Path) -> None:
    """Make renames and new entries in ``directory`` durable (skipped where the file system cannot)."""
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(handle)


def replace_directory(new: Path, out: Path) -> None:
    """Put the directory ``new`` at ``out`` and delete the old ``out``; ``new`` gets ``out``'s permissions.

    In one step on Linux, else two renames (see the module's docstring). The caller holds ``out``'s
    :class:`DirectoryLock`.
    """
    if out.exists():
        new.chmod(stat.S_IMODE(out.stat().st_mode))
    _swap_into_place(new, out)


# --- locks ------------------------------------------------------------------------------------


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from ``/proc``; None where that cannot be read."""
    try:
        _, ticks = process_stat(pid)
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return int(boot.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _made_by_a_live_run(pid: int, path: Path) -> bool:
    """Whether ``path``, named after ``pid``, may belong to a run still going.

    Not when ``pid`` is dead, nor when it is ours or started after ``path`` last changed: a pid reused by
    a later process (every run of a container may get the same one) does not keep a killed run's debris.
    """
    if pid == os.getpid() or not _is_alive(pid):
        return False
    started = _process_start(pid)
    try:
        changed = path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return started is None or started <= changed + 1.0  # a second for clock granularity


def _clear_leftovers(directory: Path) -> None:
    """Delete what killed runs left for ``directory``; the caller holds its lock.

    Beside it: staging directories ``.NAME.<pid>.partial`` (a run killed during its final swap leaves
    the old output there), and the old directory ``.NAME.<pid>.old`` of an interrupted two-rename swap,
    which goes back in place if ``directory`` is missing. Inside it: the staging directories of in-place
    runs. Only lock holders make them, so they are stale unless their pid is a live process that already
    ran when they last changed (see :func:`_made_by_a_live_run`).
    """
    beside = re.compile(rf"\.{re.escape(directory.name)}\.(\d{{1,9}})\.(partial|old)")
    for entry in directory.parent.iterdir():
        match = beside.fullmatch(entry.name)
        if match is None or _made_by_a_live_run(int(match[1]), entry):
            continue
        if match[2] == "old" and not os.path.lexists(directory):
            os.rename(entry, directory)
        else:
            _discard(entry)
    if directory.is_dir() and not directory.is_symlink():
        for entry in directory.iterdir():
            match = _IN_PLACE_STAGING.fullmatch(entry.name)
            if match is not None and not _made_by_a_live_run(int(match[1]), entry):
                _discard(entry)


class DirectoryLock:
    """The right to change one directory: an exclusive ``fcntl`` lock on ``.NAME.lock`` beside it.

    Every writer takes it (staged outputs, engine builds and refits of a bundle), so two cfdeploy runs
    never interleave their files. With ``timeout`` 0 a busy lock fails at once, otherwise it is retried
    until ``timeout`` seconds have passed. The lock file records its holder's pid, host, start time and
    command line (so that a run finding it busy says which run holds it) and is deleted on release. On
    acquiring it, leftovers of killed runs for the directory are cleared. Like the staging directory,
    the lock file is beside the directory, so its parent must be writable.
    """

    def __init__(self, directory: Path, timeout: float = 600.0) -> None:
        self.directory = _located(directory)
        self.path = self.directory.parent / f".{self.directory.name}.lock"
        self.timeout = timeout
        self._handle: int | None = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            handle = self._open()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(handle)
                os.close(handle)
                if time.monotonic() >= deadline:
                    raise CfdeployError(self._busy(holder)) from None
                time.sleep(0.2)
                continue
            if _is_same_file(handle, self.path):
                break
            os.close(handle)  # locked a file its owner had just deleted on release: lock the new one
        self._handle = handle
        try:
            os.ftruncate(handle, 0)
            os.pwrite(handle, _holder_record(), 0)
            _clear_leftovers(self.directory)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)  # still ours: nobody else can create it while we hold it
        os.close(self._handle)
        self._handle = None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as error:
            raise CfdeployError(f"{self.path}: cannot create the lock file ({error.strerror})") from None

    def _busy(self, holder: str | None) -> str:
        owner = f" ({holder})" if holder else ""
        waited = f"; gave up after {self.timeout:g}s" if self.timeout > 0 else ""
        return f"{self.directory}: another cfdeploy run is writing this directory{owner}{waited}"


def _holder_record() -> bytes:
    """Who holds a lock, for the message of whoever finds it busy: pid, host, start time and command line."""
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    record = {
        "pid": os.getpid(),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": command[:_MAX_SHOWN_COMMAND],
    }
    return (json.dumps(record) + "\n").encode()


def _read_holder(handle: int) -> str | None:
    """The lock holder as a phrase (``pid 12 on host, since …: command``), or None when its record is unreadable.

    The holder writes its record just after locking, so an empty file is read again for a moment.
    """
    for _ in range(10):
        content = os.pread(handle, 4096, 0)
        if content:
            break
        time.sleep(0.02)
    try:
        record = json.loads(content)
        return f"pid {int(record['pid'])} on {record['host']}, since {record['started']}: {record['command']}"
    except (ValueError, TypeError, KeyError):
        return None


def _is_same_file(handle: int, path: Path) -> bool:
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


# --- staged output directories ----------------------------------------------------------------


class _TerminationGuard:
    """While staged work runs, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` so that cleanup runs.

    During cleanup and the final swap they are held, and raised once that is done. Only in the main
    thread (where Python runs handlers), and only for signals left at their default: a SIGHUP ignored
    by ``nohup`` stays ignored.
    """

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._holding = False
        self._held: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number in _TERMINATING_SIGNALS:
            if signal.getsignal(number) is signal.SIG_DFL:
                self._previous[number] = signal.signal(number, self._handle)

    def hold(self) -> None:
        self._holding = True

    def restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
        if self._held is not None:
            raise SystemExit(128 + self._held)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self._holding:
            self._held = number
            return
        raise SystemExit(128 + number)


class ArrayWriter:
    """A float32 ``.npy`` file written front to back, one block of rows at a time, with ordinary writes.

    Not a memory map: a mapped write to a full disk kills the process with SIGBUS, an ordinary one
    raises an error that becomes one line.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], shown: Path, unchanged: str) -> None:
        self.shape = shape
        self.rows = 0
        self._shown = shown
        self._unchanged = unchanged
        self._stream: BinaryIO | None = _create(path)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": shape}
        try:
            with self._disk_errors():
                np.lib.format.write_array_header_1_0(self._stream, header)
        except BaseException:
            self._abandon()
            raise

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (``[n, *shape[1:]]``, converted to float32)."""
        block = np.ascontiguousarray(rows, dtype="<f4")
        if self._stream is None:
            raise CfdeployError(f"{self._shown}: already closed")
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise CfdeployError(
                f"{self._shown}: rows of shape {block.shape} do not fit {self.shape} after {self.rows} rows"
            )
        with self._disk_errors():
            self._stream.write(block.data)
        self.rows += len(block)

    def close(self) -> None:
        """Check that every declared row was written, and make the file durable."""
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        with stream, self._disk_errors():
            if self.rows != self.shape[0]:
                raise CfdeployError(f"{self._shown}: {self.rows} of {self.shape[0]} rows were written")
            _make_durable(stream)

    def _abandon(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
            self._stream = None

    def _disk_errors(self) -> contextlib.AbstractContextManager[None]:
        return _disk_errors(self._shown, self._unchanged)


class StagedDirectory:
    """An output directory built in a staging directory and put in place only if the block succeeds.

    Enter it at the start of a command, before the slow work: the output is checked
    (:func:`check_output_dir`), missing parent directories are made, the directory's lock is taken (a
    second run for the same output fails at once, naming the run that holds it), leftovers of killed runs
    are cleared, and the staging directory ``.NAME.<pid>.partial`` is made beside ``out`` (``path``).
    On success the staging directory replaces ``out`` in one step (see the module's docstring); the
    new directory keeps ``out``'s permissions, or gets the umask's. On an error, Ctrl-C, SIGTERM or
    SIGHUP, the staging directory and any parent directories made are removed and ``out`` is
    untouched; a full disk anywhere is one line naming the file.

    In place: when ``out`` is the working directory (``--out .``) or a mount point, moving it would
    leave the user's shell in a deleted directory, or is impossible. Then the staging directory is
    ``out/.cfdeploy.<pid>.partial``, and on success its entries replace ``out``'s one by one (each
    in one step), and with ``force`` ``out``'s other entries are deleted; ``out`` itself stays. A kill
    during those renames (milliseconds, after all the work) can leave a mix of old and new entries.
    """

    def __init__(self, out: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
        self.out = _located(out)
        self.force = force
        self.inputs = tuple(inputs)
        self.in_place = self.out == _working_directory() or os.path.ismount(self.out)
        staging = f".cfdeploy.{os.getpid()}.partial" if self.in_place else f".{self.out.name}.{os.getpid()}.partial"
        self.path = (self.out if self.in_place else self.out.parent) / staging
        self._lock = DirectoryLock(self.out, timeout=0)
        self._termination = _TerminationGuard()
        self._writers: list[ArrayWriter] = []
        self._made_parents: list[Path] = []

    def __enter__(self) -> StagedDirectory:
        check_output_dir(self.out, self.force, self.inputs)
        with contextlib.ExitStack() as on_failure:
            self._made_parents = [parent for parent in self.out.parents if not parent.exists()]
            on_failure.callback(self._remove_made_parents)
            make_parents(self.out)
            self._lock.acquire()
            on_failure.callback(self._lock.release)
            check_output_dir(self.out, self.force, self.inputs)  # again: a killed swap may have been undone
            with self._disk_errors(self.out):
                os.mkdir(self.path, 0o777)
            on_failure.pop_all()
        self._termination.install()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._termination.hold()
        committed = False
        try:
            if error is None:
                self._commit()
                committed = True
        finally:
            if not committed:
                self._abandon()
            self._lock.release()
            self._termination.restore()
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            raise CfdeployError(f"{self.out}: {_DISK_FULL[error.errno]}; it was left as it was") from error

    def write_png(self, name: str, pixels: np.ndarray, compress_level: int = 6) -> None:
        """Save ``[H, W, 3]`` uint8 ``pixels``; zlib level 0-9 (1 is several times faster than Pillow's 6)."""
        self.write(name, lambda stream: save_png(stream, pixels, compress_level))

    def write_json(self, name: str, content: Mapping[str, Any]) -> None:
        self.write(name, (json.dumps(content, indent=2, default=str) + "\n").encode())

    def write_npy(self, name: str, array: np.ndarray) -> None:
        self.write(name, npy_bytes(array))

    def open_array(self, name: str, shape: tuple[int, ...]) -> ArrayWriter:
        """A float32 ``.npy`` of ``shape`` to fill block by block (see :class:`ArrayWriter`); closed on success if not before."""
        with self._disk_errors(self.out / name):
            writer = ArrayWriter(self.path / name, shape, self.out / name, f"{self.out} was left as it was")
        self._writers.append(writer)
        return writer

    def write(self, name: str, content: bytes | Callable[[BinaryIO], None]) -> None:
        """Write the file ``name`` (bytes, or a function that writes to a binary stream) into the staging directory."""
        with self._disk_errors(self.out / name):
            _replace_file(self.path / name, content)

    def _disk_errors(self, shown: Path) -> contextlib.AbstractContextManager[None]:
        return _disk_errors(shown, f"{self.out} was left as it was")

    def _commit(self) -> None:
        for writer in self._writers:
            writer.close()
        check_output_dir(self.out, self.force, self.inputs)  # nothing appeared meanwhile that force does not cover
        with self._disk_errors(self.out):
            _fsync_directory(self.path)
            if self.in_place:
                self._move_entries_in()
                _fsync_directory(self.out)
            else:
                replace_directory(self.path, self.out)
                _fsync_directory(self.out.parent)

    def _move_entries_in(self) -> None:
        new = {entry.name for entry in self.path.iterdir()}
        for name in sorted(new):
            _swap_into_place(self.path / name, self.out / name)
        for entry in self.out.iterdir():
            if entry.name not in new and _IN_PLACE_STAGING.fullmatch(entry.name) is None:
                _discard(entry)  # only with force: without it, out held nothing else
        self.path.rmdir()

    def _abandon(self) -> None:
        for writer in self._writers:
            writer._abandon()
        _discard(self.path)
        self._lock.release()  # its file is in the deepest parent made
        self._remove_made_parents()

    def _remove_made_parents(self) -> None:
        for parent in self._made_parents:  # deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
