"""Ray at the edge: joining the cluster, the device rule, and how many CPUs an actor may take.

Every stage and harness asks these three questions the same way, so they are answered once:

- :func:`init_ray`: join the job's cluster (``RAY_ADDRESS``) or start a local one;
- :func:`resolve_device`: ``compute.device`` ``auto`` means ``cuda`` when the Ray cluster has
  GPUs (not when the driver has one: the driver of a cloud cluster is a CPU head node);
- :func:`actor_cpus`: a CPU actor pool never takes every CPU, or its feeding tasks starve;
- :func:`bf16_is_fast`: whether bf16 autocast speeds this device up (GPUs, CPUs with AMX).

Ray is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def init_ray(attempts: int = 3, **kwargs: Any) -> None:
    """Join the Ray cluster this job runs on (``RAY_ADDRESS``), or start a local one (``kwargs`` go to ``ray.init``).

    Retried: on a loaded machine a local raylet can miss Ray's fixed 30 s registration
    deadline, and Ray raises a bare ``Exception`` for that.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs = {"log_to_driver": True, "configure_logging": False, **kwargs}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as exc:
            ray.shutdown()
            if attempt == attempts:
                raise
            log.warning("ray.init failed (%s); retrying (%d/%d)", exc, attempt + 1, attempts)
            time.sleep(2.0 * attempt)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when the Ray cluster has GPUs, else ``cpu``; ``cuda`` and ``cpu`` are kept."""
    if device != "auto":
        return device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def bf16_is_fast(device_type: str) -> bool:
    """bf16 autocast pays on a GPU and on a CPU with AMX tiles (bf16 matmuls several times
    float32's); without AMX a CPU emulates bf16 and runs it slower than float32
    (benchmarks/README.md has both peaks of the machines measured)."""
    if device_type == "cuda":
        return True
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x; absent: assume none
    return device_type == "cpu" and amx is not None and bool(amx())


def actor_cpus(requested: float, num_actors: int) -> float:
    """CPUs per actor of a CPU actor pool: at most ``requested``, and never so many that the pool
    takes every CPU of the cluster. The read and decode tasks that feed the actors need a core
    too; without one, the stream waits for CPUs the actors hold and never moves (2 actors x 1 CPU
    on 2 cores)."""
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    return min(requested, max(total - 1.0, total / 2) / num_actors)
