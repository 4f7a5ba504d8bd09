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
    anywhere; otherwise JAX's own cluster detection is asked (TPU pods, SLURM, Open MPI,
    Kubernetes), and a plain machine stays a single process. Must run before anything touches
    the devices.
    """
    if _distributed_is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address:
        # CPU collectives across processes (how multi-host is tested on one machine); the
        # default in recent JAX, not in older releases.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
        return
    try:
        jax.distributed.initialize()
    except ValueError:
        pass  # no cluster detected: one process
    except RuntimeError:
        pass  # devices already in use in this process (a notebook, tests): stay single-process


def _distributed_is_initialized() -> bool:
    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return check()
    from jax._src import distributed

    return distributed.global_state.client is not None


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


def local_rows(array: jax.Array) -> np.ndarray:
    """This host's rows of a batch-sharded array, in order, as one numpy array."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def replicate(tree, mesh: Mesh):
    """Places a host tree (the same on every host) replicated on every device of every host."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)


def shard_batch(array, mesh: Mesh) -> jax.Array:
    """Splits a host array that every host holds whole (prompts, seeds) over the devices by rows."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, batch_sharded(mesh), lambda index: array[index])
