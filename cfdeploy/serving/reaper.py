"""The processes of a local Ray end with the command that started it, however that command ends.

Ray ties the processes it starts itself (GCS, raylet) to the driver, but the raylet's own children (the
dashboard and runtime-env agents, workers) outlive a driver killed with SIGKILL by a minute or more. So
:func:`~cfdeploy.serving.cluster.connect` starts this module beside a new local Ray, with a marker in the
environment that every Ray process inherits; it watches a pipe from the driver and, once the driver
closes it or dies, ends every process of that Ray. A process that renames itself (Ray's agents do) may
write its new name over the environment ``/proc`` shows, marker included, so while the driver runs the
reaper also notes every descendant of a marked process, and ends those too. Linux only (it reads
``/proc``); the standard library and :mod:`cfdeploy.environment` only, so it starts at once.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path

from cfdeploy.environment import process_stat

MARKER = "CFDEPLOY_RAY_OWNER"
GRACE_S = 2.0  # SIGTERM first, for what is still shutting down; SIGKILL after this
QUIET_S = 1.0
LIMIT_S = 20.0  # a killed process can take seconds to go on a machine short of memory
WATCH_S = 1.0  # how often the processes of the running Ray are noted


def scan(token: str) -> tuple[dict[int, tuple[int, int]], set[int]]:
    """One pass over ``/proc``: every process's parent pid and start time (:func:`process_stat`), and the processes
    whose environment carries ``MARKER=token`` (this one aside)."""
    needle = f"{MARKER}={token}".encode()
    table, marked = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            table[pid] = process_stat(pid)
            if pid != os.getpid() and needle in (entry / "environ").read_bytes().split(b"\0"):
                marked.add(pid)
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return table, marked


def ours(token: str, known: dict[int, int]) -> list[int]:
    """The Ray's processes: the marked ones, their descendants, and those noted before that still run (the same pid
    and start time). Each is noted in ``known`` (pid → start time)."""
    table, found = scan(token)
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    unvisited = list(found)
    while unvisited:
        for child in children.get(unvisited.pop(), []):
            if child not in found:
                found.add(child)
                unvisited.append(child)
    found |= {pid for pid, started in known.items() if pid in table and table[pid][1] == started}
    found.discard(os.getpid())
    known.update({pid: table[pid][1] for pid in found if pid in table})
    return sorted(found)


def end_ours(token: str, known: dict[int, int]) -> None:
    """SIGTERM the Ray's processes (:func:`ours`), SIGKILL those still there after :data:`GRACE_S`, and keep
    looking until none has been seen for :data:`QUIET_S` (a dying raylet may still be starting an agent),
    :data:`LIMIT_S` at most."""
    started = last_seen = time.monotonic()
    while (now := time.monotonic()) - started < LIMIT_S:
        found = ours(token, known)
        if found:
            last_seen = now
        elif now - last_seen >= QUIET_S:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGTERM if now - started < GRACE_S else signal.SIGKILL)
            except OSError:
                continue
        time.sleep(0.1)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal's group is the driver's to handle
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    token = sys.argv[1]
    known: dict[int, int] = {}  # pid → start time of each process of the Ray seen so far
    pipe = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([pipe], [], [], WATCH_S)
        if readable and not os.read(pipe, 4096):  # the driver closed the pipe, or died
            break
        ours(token, known)
    end_ours(token, known)


if __name__ == "__main__":
    main()
