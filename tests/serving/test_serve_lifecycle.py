"""How ``cfdeploy serve`` starts and stops: refusals in one line with nothing left running, SIGTERM drains the edits in
flight and exits 0 with no process left, and a local Ray ends with a driver killed with SIGKILL.

Real signals to real commands (subprocesses), each looking only at the processes of its own Ray (:func:`own_ray`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cfdeploy.client import Client, ServerError
from conftest import assert_refused, free_port, own_ray, ray_is_connected

PROMPT = "green lipstick"  # precomputed in bundle_64
GRACE_S = 20  # serve's default --grace-s
STOP_LIMIT_S = 25  # what a supervisor may wait for, with the default grace


def test_refusals_before_ray_starts_are_one_line(cli, bundle_64: Path, tmp_path: Path) -> None:
    """Settings, a damaged graph and a port in use are found before Ray starts: one line, exit 2, nothing started."""
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle_64, damaged, copy_function=os.link)
    graph = damaged / "generator.onnx"
    content = bytearray(graph.read_bytes())
    content[len(content) // 2] ^= 0xFF
    graph.unlink()  # a hard link: the shared bundle stays whole
    graph.write_bytes(bytes(content))
    with own_ray() as our_ray, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_refused(
            cli("serve", "--bundle", bundle_64, "--batch-wait-ms", "nan"),
            None,
            "--batch-wait-ms must be a finite number, 0 or more, got nan",
        )
        assert_refused(
            cli("serve", "--bundle", bundle_64, "--grace-s", "-1"),
            None,
            "--grace-s must be a finite number, 0 or more, got -1.0",
        )
        assert_refused(
            cli("serve", "--bundle", bundle_64, "--port", port),
            None,
            f"cannot listen on 127.0.0.1:{port}: already in use (give another --port or --host)",
        )
        assert_refused(
            cli("serve", "--bundle", damaged, "--port", free_port()),
            None,
            f"{graph}: sha256",
            "differs from the manifest's",
        )
        assert not ray_is_connected() and not our_ray.processes()


def serve_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "cfdeploy", "serve", *map(str, args)]


def test_more_replicas_than_the_cpus_hold_is_refused_and_ray_stops(bundle_64: Path) -> None:
    with own_ray() as our_ray:
        refused = subprocess.run(
            serve_command("--bundle", bundle_64, "--replicas", 5000, "--port", free_port()),
            capture_output=True,
            text=True,
            timeout=180,  # Ray would wait for room forever
        )
        assert refused.returncode == 2, refused.stderr
        [line] = refused.stderr.strip().splitlines()
        assert re.fullmatch(
            r"error: 5000 replicas of 1 CPU and 0 GPU each do not fit: the Ray cluster has (\d+) CPU and 0 GPU, "
            r"room for \1; ask for fewer replicas or less per replica",
            line,
        ), line
        assert not our_ray.processes()


def test_sigterm_drains_the_edit_in_flight_and_exits_0_with_nothing_left(bundle_64: Path) -> None:
    """An edit that waits 3 s for its generator batch is in flight when SIGTERM comes: it is answered, new edits get
    503 while it drains, and the command exits 0 within 25 s, every process gone; its console is its own lines."""
    port = free_port()
    command = serve_command("--bundle", bundle_64, "--port", port, "--batch-wait-ms", 3000)
    with own_ray() as our_ray:
        server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        assert server.stderr is not None
        lines = []
        while not lines or not lines[-1].startswith("serving "):
            line = server.stderr.readline()
            assert line, (server.wait(), lines)
            lines.append(line.rstrip("\n"))
        client = Client(f"http://127.0.0.1:{port}")
        codes = np.random.default_rng(5).standard_normal((1, 10, 512)).astype(np.float32)
        answered: list[object] = []
        in_flight = threading.Thread(target=lambda: answered.append(client.edit(prompt=PROMPT, latents=codes)))
        in_flight.start()
        time.sleep(1.0)  # in the router, waiting for its batch
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        while healthy(client):
            time.sleep(0.1)
        with pytest.raises(ServerError) as refusal:
            client.edit(prompt=PROMPT, latents=codes)
        assert (refusal.value.status, refusal.value.message) == (503, "the server is stopping; retry on another")
        rest = server.stderr.read()
        assert server.wait(timeout=STOP_LIMIT_S) == 0
        stopped_after = time.monotonic() - signalled
        left = our_ray.processes()
        in_flight.join()
        driver_log = (Path(lines[1].removeprefix("Ray's logs: ")) / "cfdeploy-driver.log").read_text()
    assert stopped_after <= STOP_LIMIT_S and not left, (stopped_after, left)
    print(f"stopped {stopped_after:.1f} s after SIGTERM")
    assert len(answered) == 1 and len(answered[0].images) == 1  # type: ignore[attr-defined]
    assert re.fullmatch(r"starting Ray Serve and loading the bundles \(\d+\.\d s\)", lines[0]), lines
    assert lines[2:] == [
        f"serving {bundle_64.name} at http://127.0.0.1:{port} (1 replica(s) each, onnxruntime); Ctrl-C or SIGTERM stops"
    ]
    assert rest.splitlines() == [
        f"stopping: edits in flight have {GRACE_S} s to finish (Ctrl-C again: stop now)",
        "stopped",
    ]
    assert "Started Serve" in driver_log  # Ray's own lines: in its log directory


def healthy(client: Client) -> bool:
    """Whether /healthz says ok; a draining server's is 503."""
    try:
        client.health()
    except ServerError as refusal:
        return refusal.status != 503
    return True


def test_a_local_ray_ends_with_a_driver_killed_with_sigkill() -> None:
    """Ray's agents would outlive a killed driver by a minute or more; the reaper ends them at once."""
    started = (
        "from cfdeploy.serving.cluster import connect; import time; "
        "connect(None, 1); print('up', flush=True); time.sleep(600)"
    )
    with own_ray() as our_ray:
        driver = subprocess.Popen([sys.executable, "-c", started], stdout=subprocess.PIPE, text=True)
        assert driver.stdout is not None and driver.stdout.readline() == "up\n"
        assert any("raylet" in process for process in our_ray.processes())
        driver.kill()
        driver.wait()
        our_ray.assert_none_left(wait_s=30)  # without the reaper its agents outlive the driver by 60 s or more


def process_ended(pid: int) -> bool:
    """Gone, or a zombie (dead, waiting for whoever reaps orphans here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_reaper_ends_a_process_of_its_ray_whose_environment_no_longer_shows_the_marker() -> None:
    """Ray's agents write their new names over the environment /proc shows, marker included: the reaper knows them as
    descendants of a marked process, and still once that process is gone and they are orphans."""
    from cfdeploy.serving.reaper import MARKER, WATCH_S

    token = f"reaper-test-{os.getpid()}"
    starts_an_unmarked_child = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], env={}); "
        "print(child.pid, flush=True); time.sleep(120)"
    )
    marked = subprocess.Popen(
        [sys.executable, "-c", starts_an_unmarked_child], env={**os.environ, MARKER: token}, stdout=subprocess.PIPE
    )
    assert marked.stdout is not None
    child = int(marked.stdout.readline())
    reaper = subprocess.Popen([sys.executable, "-m", "cfdeploy.serving.reaper", token], stdin=subprocess.PIPE)
    try:
        time.sleep(3 * WATCH_S)  # the driver runs: the reaper notes its Ray's processes
        marked.kill()
        marked.wait()  # the child is an orphan now, with no marker anywhere in its ancestry
        assert not process_ended(child)
        assert reaper.stdin is not None
        reaper.stdin.close()  # the driver is gone
        reaper.wait(timeout=30)
        deadline = time.monotonic() + 5
        while not process_ended(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_ended(child)
    finally:
        reaper.kill()
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
