"""Devices and hosts: multi-host start-up, the data-parallel mesh, and global batches.

The model is pmap's: parameters replicated on every device of every host, the batch split over
all devices along the mesh axis "data", gradients averaged. It is written as `jax.jit` over a
`Mesh` with `NamedSharding`s; each host passes only its own rows of the batch.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """Starts multi-host JAX when asked to or when the platform says so.

    Explicit flags (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) start it
    anywhere; on TPU pods and SLURM/Open MPI clusters `jax.distributed.initialize()` finds its
    peers itself. A single process on one machine needs nothing.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            # CPU collectives across processes (how multi-host is tested on one machine).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif _on_multihost_platform():
        jax.distributed.initialize()


def _on_multihost_platform() -> bool:
    # TPU pod workers (more than one host in the slice) and SLURM / Open MPI launches.
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return ("," in tpu_hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1
            or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Sharding of a batch whose axis `leading_axes` is the sample axis (0, or 1 after the
    micro-batch axis of gradient accumulation)."""
    return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def global_batch(local: dict, mesh: Mesh, sample_axis: int = 0) -> dict:
    """Builds global arrays from this host's rows (each host passes a different part)."""
    sharding = batch_sharded(mesh, sample_axis)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def replicate(tree, mesh: Mesh):
    """Places a host tree (the same on every host) replicated on every device of every host."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)
