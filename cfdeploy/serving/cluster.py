"""Ray for ``serve`` and ``batch``: join a running cluster, or start a local one that lives as long as the command."""

from __future__ import annotations

import logging

from cfdeploy.errors import CfdeployError


def connect(address: str | None, num_cpus: int | None = None, *, driver_logs: bool = True) -> bool:
    """Join the cluster at ``address`` (``auto``, ``host:port``), or start a local Ray with ``num_cpus`` (default: all).

    Returns whether this call connected (the caller then disconnects with ``ray.shutdown()``, which
    stops only a local Ray); False when the process was already connected.
    """
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=driver_logs)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise CfdeployError(f"could not join {where}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    return True
