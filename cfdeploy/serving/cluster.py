"""Ray for ``serve`` and ``batch``: join a running cluster, or start a local one that lives as long as the command.

A local Ray started here ends with the command however it ends (:mod:`.reaper`), and its log lines go to a
file in its session's log directory unless ``verbose``: the console is the command's.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfdeploy.errors import CfdeployError
from cfdeploy.serving.reaper import MARKER

DRIVER_LOG = "cfdeploy-driver.log"  # the Ray lines the command's own process logs, beside Ray's processes' logs


@dataclass
class _Connection:
    """What :func:`connect` set up and :func:`disconnect` undoes (a process has one Ray connection, so one of these)."""

    reaper: subprocess.Popen[bytes] | None = None
    routed: dict[str, tuple[list[logging.Handler], bool]] = field(default_factory=dict)  # logger → handlers, propagate
    log_file: logging.FileHandler | None = None
    logs: Path | None = None


_connection = _Connection()


def connect(
    address: str | None, num_cpus: int | None = None, *, driver_logs: bool = True, verbose: bool = False
) -> bool:
    """Join the cluster at ``address`` (``auto``, ``host:port``), or start a new local Ray with ``num_cpus`` (default: all).

    Returns whether this call connected (the caller then calls :func:`disconnect`, which stops a local Ray with
    every process it started); False when the process was already connected. ``driver_logs``: workers' output
    forwarded to this process; ``verbose``: Ray's lines on the console rather than in :func:`ray_logs`.
    """
    import ray

    if ray.is_initialized():
        return False
    held = None if verbose else _route_ray_loggers()
    handlers = _signal_handlers()
    if address is None and sys.platform.startswith("linux"):
        token = secrets.token_hex(16)
        _connection.reaper = subprocess.Popen(
            [sys.executable, "-m", "cfdeploy.serving.reaper", token], stdin=subprocess.PIPE, start_new_session=True
        )
        os.environ[MARKER] = token
    try:
        # "local": a new Ray even where RAY_ADDRESS or `ray start` points at a cluster, which would otherwise be joined.
        ray.init(
            address=address or "local",
            num_cpus=num_cpus if address is None else None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=driver_logs and verbose,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        _release()
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise CfdeployError(
            f"could not join {where}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    except BaseException:
        _release()
        raise
    finally:
        os.environ.pop(MARKER, None)
        for number, handler in handlers.items():  # Ray's core installs its own SIGTERM handler, which aborts
            if handler is not None:
                signal.signal(number, handler)
    node = ray._private.worker._global_node
    assert node is not None
    _connection.logs = Path(node.get_logs_dir_path())
    if held is not None:
        _connection.log_file = logging.FileHandler(_connection.logs / DRIVER_LOG)
        _connection.log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
        for record in held.buffer:
            _connection.log_file.handle(record)
        for name in _connection.routed:
            logging.getLogger(name).handlers = [_connection.log_file]
    return True


def ray_logs() -> Path | None:
    """The log directory of the Ray this process connected to (its processes' logs, and :data:`DRIVER_LOG`)."""
    return _connection.logs


def local_ray_lost(settle_s: float = 1.0) -> bool:
    """Whether a process of the local Ray started here ended within ``settle_s``: a signal sent to the command's whole
    process group (systemd's default stop, ``timeout``, ``kill -- -PGID``) reaches them too, and a Ray without its
    GCS answers nothing (every call would wait a minute for it). False for a joined cluster."""
    import ray

    node = ray._private.worker._global_node
    if node is None:
        return False
    deadline = time.monotonic() + settle_s
    while not node.dead_processes():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


@contextlib.contextmanager
def ray_prints_to_log() -> Iterator[None]:
    """Inside the block, what Ray's driver prints itself rather than logs (its reports of failed actor tasks, on
    stdout) goes to :data:`DRIVER_LOG` too, when Ray's lines are routed there."""
    if _connection.log_file is None:
        yield
        return
    with contextlib.redirect_stdout(_connection.log_file.stream):
        yield


def disconnect() -> None:
    """Leave Ray (a local Ray stops), end what is left of a local Ray's processes, give the loggers back."""
    import ray

    try:
        ray.shutdown()
    finally:
        _release()


def _release() -> None:
    reaper, _connection.reaper = _connection.reaper, None
    if reaper is not None:
        assert reaper.stdin is not None
        reaper.stdin.close()  # the reaper ends what is left, and then itself
        reaper.wait()
    for name, (handlers, propagate) in _connection.routed.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = handlers, propagate
    if _connection.log_file is not None:
        _connection.log_file.close()
    _connection.routed, _connection.log_file, _connection.logs = {}, None, None


def _route_ray_loggers() -> logging.handlers.BufferingHandler:
    """Ray's loggers in this process (those with handlers of their own: ``ray``, ``ray.serve``, ``ray.data``) held
    in a buffer until Ray's log directory exists; :func:`connect` then writes them to :data:`DRIVER_LOG`."""
    held = logging.handlers.BufferingHandler(10_000)
    names = ["ray"] + [name for name in logging.root.manager.loggerDict if name.startswith("ray.")]
    for name in names:
        logger = logging.getLogger(name)
        if logger.handlers:
            _connection.routed[name] = (list(logger.handlers), logger.propagate)
            logger.handlers, logger.propagate = [held], False
    return held


def _signal_handlers() -> dict[int, Any]:
    """This process's SIGINT and SIGTERM handlers, to put back after ``ray.init`` (only the main thread has them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}


def actor_backend_options(
    backend: str, cpus: float, gpus: float, precision: str | None = None, session_cache: bool | None = None
) -> dict[str, Any]:
    """Backend options for a replica or worker given its Ray resources: ONNX Runtime and OpenVINO run one thread per
    CPU reserved; ONNX Runtime on the CPU unless a GPU share is reserved (then on the GPU Ray assigned, which it sees
    as cuda:0). ``precision`` (OpenVINO's bf16) and ``session_cache`` pass through."""
    if backend == "onnxruntime":
        return {"device": "cuda" if gpus > 0 else "cpu", "threads": max(1, round(cpus)), "session_cache": session_cache}
    if backend == "openvino":
        return {"threads": max(1, round(cpus)), "precision": precision, "session_cache": session_cache}
    return {}


def check_resources(backend: str, cpus: float, gpus: float, unit: str) -> None:
    """``--cpus-per-UNIT`` and ``--gpus-per-UNIT`` (``unit``: replica or worker), checked in one line each."""
    for kind, value in (("cpus", cpus), ("gpus", gpus)):
        if not math.isfinite(value) or value < 0:
            raise CfdeployError(f"--{kind}-per-{unit} must be a finite number, 0 or more, got {value}")
    if backend == "tensorrt" and gpus == 0:
        raise CfdeployError(
            f"--backend tensorrt needs a GPU: give --gpus-per-{unit} (a fraction such as 0.5 shares one)"
        )


def require_resources(cpus: float, gpus: float, unit: str, count: int = 1) -> None:
    """Refuse, in one line, ``count`` replicas or workers (``unit``) that the cluster's nodes cannot hold together:
    Ray would wait for room forever."""
    import ray

    nodes: list[dict[str, float]] = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if not any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        largest: dict[str, float] = max(nodes, key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)), default={})
        raise CfdeployError(
            f"no Ray node has {cpus:g} CPU and {gpus:g} GPU for one {unit} (the largest has "
            f"{largest.get('CPU', 0):g} CPU, {largest.get('GPU', 0):g} GPU)"
        )
    room = sum(min(_fits(node.get("CPU", 0), cpus), _fits(node.get("GPU", 0), gpus)) for node in nodes)
    if room < count:
        total_cpus, total_gpus = (sum(node.get(kind, 0) for node in nodes) for kind in ("CPU", "GPU"))
        raise CfdeployError(
            f"{count} {unit}s of {cpus:g} CPU and {gpus:g} GPU each do not fit: the Ray cluster has "
            f"{total_cpus:g} CPU and {total_gpus:g} GPU, room for {room:g}; ask for fewer {unit}s or less per {unit}"
        )


def _fits(available: float, each: float) -> float:
    """How many of ``each`` fit in ``available`` (Ray counts resources in units of 1e-4)."""
    return math.inf if each <= 0 else math.floor(available / each + 1e-6)
