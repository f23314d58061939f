"""The processes of a local Ray end with the command that started it, however that command ends.

Ray ties the processes it starts itself (GCS, raylet) to the driver, but the raylet's own children (the
dashboard and runtime-env agents, workers) outlive a driver killed with SIGKILL by a minute or more. So
:func:`~cfdeploy.serving.cluster.connect` starts this module beside a new local Ray, with a marker in the
environment that every Ray process inherits; it waits on a pipe from the driver and, once the driver
closes it or dies, ends every process still carrying the marker. Linux only (it reads ``/proc``); the
standard library only, so it starts at once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

MARKER = "CFDEPLOY_RAY_OWNER"
GRACE_S = 2.0  # SIGTERM first, for what is still shutting down; SIGKILL after this
QUIET_S = 1.0
LIMIT_S = 20.0  # a killed process can take seconds to go on a machine short of memory


def marked(token: str) -> list[int]:
    """The processes whose environment carries ``MARKER=token`` (this one aside)."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours
                continue
    return found


def end_marked(token: str) -> None:
    """SIGTERM the marked processes, SIGKILL those still there after :data:`GRACE_S`, and keep looking until none
    has been seen for :data:`QUIET_S` (a dying raylet may still be starting an agent), :data:`LIMIT_S` at most."""
    started = last_seen = time.monotonic()
    while (now := time.monotonic()) - started < LIMIT_S:
        found = marked(token)
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
    while sys.stdin.buffer.read(4096):
        pass
    end_marked(sys.argv[1])


if __name__ == "__main__":
    main()
