"""Ctrl-C in `cfdeploy dac abduct` on a real process: while the base model loads and during the first step, whose
single backward pass at 256 px or more runs for many seconds on a CPU even on the tiny model, minutes at the
default 512 px (Python takes a signal only between the main thread's bytecodes, so the work runs in a worker
thread). Each run is stopped at a stage the progress display names (Rich draws it into the pipe as into a
terminal)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DAC_PROMPT, DAC_TARGET

PROMPT_EXIT_S = 15  # from SIGINT to exit, on a loaded 2-core machine


def interrupted_at(marker: bytes, args: list[str]) -> tuple[int, str, float]:
    """Start ``cfdeploy`` with ``args``, send SIGINT once its stderr shows ``marker``: (exit code, stderr, seconds
    from the signal to the exit)."""
    environment = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cfdeploy", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a shell's background job ignores it
    )
    assert process.stderr is not None
    seen, deadline = b"", time.monotonic() + 600
    try:
        while marker not in seen:
            assert process.poll() is None, seen.decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
            if select.select([process.stderr], [], [], 0.05)[0]:
                seen += os.read(process.stderr.fileno(), 65536)
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, rest = process.communicate(timeout=120)
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", (seen + rest).decode(errors="replace"))  # Rich's colours
        return process.returncode, text, time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    "marker", [b"loading the base model", b"a step takes about"], ids=["while-loading", "in-the-first-step"]
)
def test_ctrl_c_stops_abduct_at_once_saying_nothing_was_written(dac_base: Path, dac_image: Path, tmp_path, marker):
    out = tmp_path / "run"
    args = ["dac", "abduct", "-i", str(dac_image), "--source-text", DAC_PROMPT, "-t", DAC_TARGET]
    code, stderr, exit_s = interrupted_at(
        marker, [*args, "--base-model", str(dac_base), "--resolution", "256", "-o", str(out)]
    )
    assert code == 130, stderr[-2000:]
    assert exit_s < PROMPT_EXIT_S, exit_s
    assert "error: interrupted; nothing was written" in stderr
    assert "Traceback" not in stderr
    if marker == b"a step takes about":  # the estimate came first
        assert "at 256 px (extrapolated from steps timed at 64 px and 128 px)" in stderr
    assert not out.exists() or not list(out.iterdir())
    assert not [entry for entry in tmp_path.rglob("*") if entry.name.endswith(".partial")]
