"""Ray for ``serve`` and ``batch``: join a running cluster, or start a local one that lives as long as the command."""

from __future__ import annotations

import logging
import math
from typing import Any

from cfdeploy.errors import CfdeployError


def connect(address: str | None, num_cpus: int | None = None, *, driver_logs: bool = True) -> bool:
    """Join the cluster at ``address`` (``auto``, ``host:port``), or start a new local Ray with ``num_cpus`` (default: all).

    Returns whether this call connected (the caller then disconnects with ``ray.shutdown()``, which
    stops only a local Ray); False when the process was already connected.
    """
    import ray

    if ray.is_initialized():
        return False
    try:
        # "local": a new Ray even where RAY_ADDRESS or `ray start` points at a cluster, which would otherwise be joined.
        ray.init(
            address=address or "local",
            num_cpus=num_cpus if address is None else None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=driver_logs,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise CfdeployError(
            f"could not join {where}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    return True


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


def require_resources(cpus: float, gpus: float, unit: str) -> None:
    """Refuse, in one line, a replica or worker that no node of the cluster could hold (Ray would wait forever)."""
    import ray

    nodes: list[dict[str, float]] = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if not any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        largest: dict[str, float] = max(nodes, key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)), default={})
        raise CfdeployError(
            f"no Ray node has {cpus:g} CPU and {gpus:g} GPU for one {unit} (the largest has "
            f"{largest.get('CPU', 0):g} CPU, {largest.get('GPU', 0):g} GPU)"
        )
