"""A per-user cache of compiled graphs, so a fresh process skips the runtime's graph optimisation or compilation.

ONNX Runtime spends seconds re-laying out convolution weights each time it opens a graph, and OpenVINO compiles
each graph on first load. Both write what they made into this cache (ONNX Runtime its optimised graph, OpenVINO
its exported compiled model) and read it back in the next process. The exporter keeps the ONNX graphs it traced
in a cache of the same kind (:func:`cfdeploy.exporter.export_cache`).

An entry is a directory ``ROOT/KEY/`` holding the runtime's files and ``entry.json``, which records the key's parts
and each file's sha256. The key is the sha256 of the graph's own sha256 (the bundle manifest's), the runtime and its
version, the CPU's features and the session settings, so another runtime version, another CPU or other settings
miss. Before use every file is checked against its recorded sha256 (read into memory, or, where the runtime maps it
itself, hashed where it lies unless the record of earlier hashes in ``ROOT/.hashes`` shows it untouched since it was
written); an entry that is damaged, records another key, or is (or holds) a symlink is refused with a one-line
warning, removed, and rebuilt. Entries are written to a temporary directory and renamed into place, and renamed out
of it before they are removed, so a reader never sees half of one. The least recently used entries go first once
the cache holds more than its bound.

The cache guards against damage and mix-ups, not against someone who can write the user's cache directory (they
could rewrite ``entry.json`` too): its place is under the user's home, like the installed packages themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cfdeploy.files import HashRecord, file_identity, sha256_file

CACHE_DIR_ENV = "CFDEPLOY_CACHE_DIR"  # overrides where the cache lives (tests point it at a temporary directory)
CACHE_MAX_ENV = "CFDEPLOY_CACHE_MAX_GB"  # overrides the size bound
DEFAULT_MAX_BYTES = 8 << 30
ENTRY_RECORD = "entry.json"
MAX_RECORD_BYTES = 64 << 10
GRAPHS_DIR = "graphs"
REMOVING = ".removing-"  # an entry renamed out of its place, being removed
HASHES_DIR = ".hashes"  # inside the cache: the sha256s of files hashed before (cfdeploy.files.HashRecord)
_log = logging.getLogger(__name__)


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """``$CFDEPLOY_CACHE_DIR``, else ``$XDG_CACHE_HOME/cfdeploy``, else ``~/.cache/cfdeploy``."""
    if environ.get(CACHE_DIR_ENV):
        return Path(environ[CACHE_DIR_ENV])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cfdeploy"


def cache_bound(environ: Mapping[str, str] = os.environ) -> int:
    """The cache's size bound in bytes: ``$CFDEPLOY_CACHE_MAX_GB`` if it is a number, else 8 GiB."""
    try:
        return max(0, int(float(environ[CACHE_MAX_ENV]) * (1 << 30)))
    except (KeyError, ValueError):
        return DEFAULT_MAX_BYTES


def entry_parts(runtime: str, version: str, graph_sha256: str, cpu: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What a compiled graph depends on; an entry's key is the hash of these parts."""
    return {"runtime": runtime, "version": version, "graph_sha256": graph_sha256, "cpu": cpu, "settings": settings}


def entry_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class RefusedEntry(Exception):
    """An entry that must not be used; the message says why (it is rebuilt)."""


class GraphCache:
    """The entries under ``root`` (default :func:`cache_root`/graphs), at most ``max_bytes`` in all.

    Args:
        root: the cache directory; created (mode 0700) on the first write.
        max_bytes: the size bound; the least recently used entries are removed past it.
        on_warning: told, in one line, about each refused entry and each failed write.
    """

    def __init__(
        self,
        root: Path | None = None,
        max_bytes: int | None = None,
        on_warning: Callable[[str], None] = _log.warning,
    ) -> None:
        self.root = root if root is not None else cache_root() / GRAPHS_DIR
        self.max_bytes = cache_bound() if max_bytes is None else max_bytes
        self.on_warning = on_warning
        self.hashes = HashRecord(self.root / HASHES_DIR)
        self.outcomes: dict[str, str] = {}  # network → hit, miss or refused: what describe() reports

    def entry_path(self, parts: Mapping[str, Any]) -> Path:
        """Where the entry for ``parts`` lies (whether or not it exists)."""
        return self.root / entry_key(parts)

    def load(self, network: str, parts: Mapping[str, Any], in_place: Collection[str] = ()) -> dict[str, bytes] | None:
        """The entry's files (name → verified bytes), or None on a miss; a refused entry is removed and warned of.

        A file named in ``in_place`` is checked against its sha256 where it lies, through a read-only mapping, and
        left out of the result: the runtime maps it from :meth:`entry_path` itself, so its pages are shared with
        every process that maps it rather than copied into each (an entry is never changed once renamed into place;
        it is only removed, and a file a runtime has mapped outlives its removal).

        What happened is recorded in :attr:`outcomes` under ``network``: ``hit``, ``miss`` or ``refused``.
        """
        entry = self.entry_path(parts)
        files = None
        if os.path.lexists(entry):
            if not entry.is_symlink():  # recently used before its checks, so no other process evicts it meanwhile
                with contextlib.suppress(OSError, NotImplementedError):
                    os.utime(entry / ENTRY_RECORD, follow_symlinks=False)
            try:
                files = self._read(entry, parts, in_place)
            except (RefusedEntry, OSError, ValueError) as why:
                if not os.path.lexists(entry):  # removed whole by another process meanwhile (eviction): a miss
                    self.outcomes[network] = "miss"
                    return None
                self.refuse(network, parts, str(why) if isinstance(why, RefusedEntry) else f"cannot be read ({why})")
                return None
        self.outcomes[network] = "miss" if files is None else "hit"
        return files

    def load_checking(
        self, network: str, parts: Mapping[str, Any], check: Callable[[str], object], in_place: Collection[str] = ()
    ) -> dict[str, bytes] | None:
        """:meth:`load`, with ``check(network)`` run meanwhile on a second thread where an entry exists: the bundle's
        own graph checked against its manifest, so a damaged bundle is refused even where a cached graph would run in
        its place. Both may hash hundreds of MB; side by side they take the time of the longer. On a miss the check
        is left to the runtime's read of the graph, which hashes what it reads (a graph is hashed once, not twice)."""
        if not os.path.lexists(self.entry_path(parts)):
            self.outcomes[network] = "miss"
            return None
        with ThreadPoolExecutor(1) as checking:
            checked = checking.submit(check, network)
            files = self.load(network, parts, in_place)
            checked.result()
        return files

    def refuse(self, network: str, parts: Mapping[str, Any], why: str) -> None:
        """Warn that the entry for ``parts`` is not used and why, remove it, and record ``refused`` for ``network``
        (also for an entry that passed its checks and then failed in the runtime's hands)."""
        entry = self.entry_path(parts)
        self.on_warning(f"{entry}: {why}; refused, and rebuilt")
        self._remove(entry)
        self.outcomes[network] = "refused"

    def discard(self, parts: Mapping[str, Any]) -> None:
        """Remove the entry for ``parts``, if any (it proved wrong in use)."""
        self._remove(self.entry_path(parts))

    def _read(self, entry: Path, parts: Mapping[str, Any], in_place: Collection[str]) -> dict[str, bytes]:
        if entry.is_symlink() or not entry.is_dir():
            raise RefusedEntry("is a symlink or not a directory")
        record = _regular_bytes(entry / ENTRY_RECORD, MAX_RECORD_BYTES)
        try:
            recorded = json.loads(record.decode("utf-8"))
        except ValueError:
            raise RefusedEntry(f"its {ENTRY_RECORD} is not JSON") from None
        if not isinstance(recorded, dict) or recorded.get("parts") != json.loads(json.dumps(parts)):
            raise RefusedEntry(f"its {ENTRY_RECORD} records another graph, runtime, CPU or settings")
        digests = recorded.get("files")
        if not isinstance(digests, dict) or not digests:
            raise RefusedEntry(f"its {ENTRY_RECORD} lists no files")
        unlisted = sorted(set(os.listdir(entry)) - set(digests) - {ENTRY_RECORD})
        if unlisted:
            raise RefusedEntry(f"it holds {unlisted[0]}, which its {ENTRY_RECORD} does not list")
        files = {}
        for name, digest in digests.items():
            if not isinstance(name, str) or "/" in name or "\0" in name or name in ("", ".", "..", ENTRY_RECORD):
                raise RefusedEntry(f"its {ENTRY_RECORD} names a file outside the entry")
            if name in in_place:
                _regular_status(entry / name)
                try:
                    found = sha256_file(entry / name, self.hashes)
                except OSError as error:
                    raise RefusedEntry(f"{name} cannot be read ({error.strerror or error})") from None
            else:
                files[name] = _regular_bytes(entry / name, None)
                found = hashlib.sha256(files[name]).hexdigest()
            if found != digest:
                raise RefusedEntry(f"{name} does not match its recorded sha256 (changed or damaged)")
        return files

    def put(self, parts: Mapping[str, Any], files: Mapping[str, bytes | Path]) -> None:
        """Store ``files`` (name → bytes, or a file of this process's to copy: a graph's weights of gigabytes need not
        pass through memory) as the entry for ``parts``; a full disk or read-only cache only warns."""
        try:
            with self.staging() as staging:
                for name, content in files.items():
                    if isinstance(content, Path):
                        shutil.copyfile(content, staging / name)
                    else:
                        (staging / name).write_bytes(content)
                self.commit(parts, staging)
        except OSError as error:
            self.on_warning(f"{self.root}: could not store a graph ({error.strerror or error})")

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A new directory inside the cache for an entry's files (a runtime may write them there itself); what is not
        committed is removed."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".partial-", dir=self.root, ignore_cleanup_errors=True) as directory:
            yield Path(directory)

    def commit(self, parts: Mapping[str, Any], staging: Path) -> None:
        """Record the sha256 of each file in ``staging`` and rename it into place as the entry for ``parts``."""
        entry = self.entry_path(parts)
        files = {path.name: self._hashed_here(path) for path in staging.iterdir()}
        record = {"parts": parts, "files": files, "created": time.time()}
        (staging / ENTRY_RECORD).write_text(json.dumps(record, sort_keys=True))
        if os.path.lexists(entry):
            return  # another process stored it first; an entry in place is never replaced, only removed
        try:
            os.rename(staging, entry)
        except OSError:
            if not (entry.is_dir() and not entry.is_symlink()):
                raise
            return  # another process stored the same entry first
        self.evict(keep=entry)

    def _hashed_here(self, path: Path) -> str:
        """The sha256 of a file this process has just written, recorded so the next process need not hash it."""
        identity = file_identity(path)
        digest = _mapped_sha256(path)
        self.hashes.remember(path, identity, digest, written_here=True)
        return digest

    def evict(self, keep: Path | None = None) -> None:
        """Remove the least recently used entries (and any partial ones) until the cache holds at most its bound.
        Other processes may be storing and removing entries meanwhile: what vanishes is passed over."""
        entries = []
        for path in self.root.iterdir():
            if path.name.startswith(REMOVING):
                self._remove(path)  # left by a process that was killed while removing it
            elif path.name.startswith(".partial-"):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - path.lstat().st_mtime > 3600:
                        self._remove(path)  # left by a process that was killed while writing
            elif not path.name.startswith("."):
                entries.append((_last_used(path), _size(path), path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != keep:
                self._remove(path)
                total -= size

    def _remove(self, path: Path) -> None:
        """Remove an entry without following symlinks: renamed out of its place first, so that another process sees
        the whole entry or none of it, never one that is half removed."""
        with contextlib.suppress(OSError):
            if path.is_symlink() or not path.is_dir():
                path.unlink()
                return
            if not path.name.startswith(REMOVING):
                removing = path.with_name(f"{REMOVING}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
                os.rename(path, removing)
                path = removing
            shutil.rmtree(path)


def _regular_status(path: Path) -> None:
    """RefusedEntry unless ``path`` is a regular file itself (not a symlink)."""
    try:
        mode = path.lstat().st_mode
    except OSError:
        raise RefusedEntry(f"{path.name} is missing") from None
    if not stat.S_ISREG(mode):
        raise RefusedEntry(f"{path.name} is a symlink or not a regular file")


def _regular_bytes(path: Path, limit: int | None) -> bytes:
    """A regular file's content (never through a symlink), or RefusedEntry."""
    _regular_status(path)
    with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW)) as handle:
        content = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(content) > limit:
        raise RefusedEntry(f"{path.name} is larger than {limit} bytes")
    return content


def _mapped_sha256(path: Path) -> str:
    """A file's sha256, hashed through a read-only mapping rather than read into memory."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def _last_used(path: Path) -> float:
    try:
        return (path / ENTRY_RECORD).lstat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    """An entry's size; 0 for one that is not a directory or is gone."""
    try:
        if path.is_symlink() or not path.is_dir():
            return 0
        return sum(child.lstat().st_size for child in path.iterdir())
    except FileNotFoundError:
        return 0
