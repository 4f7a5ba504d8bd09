"""Devices and hosts: multi-host start-up, the device mesh, and global batches.

The mesh has two axes, "data" and "fsdp" (devices.reshape(-1, fsdp), so an fsdp group is
consecutive devices: one host's when fsdp is at most its device count). The batch is split over
every device (both axes); gradients are averaged. With fsdp 1 this is pmap's model: everything
replicated. With fsdp > 1 the train state's leaves may be split over the "fsdp" axis
(`fsdp_sharding`; which leaves: sdjax.train.state), and XLA's partitioner inserts the gathers.
It is all `jax.jit` over a `Mesh` with `NamedSharding`s; each host passes only its own rows of
the batch.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import socket
import sys
import time
from typing import Iterator, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax.errors import SdjaxError

log = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def quiet_libtpu_without_tpu() -> None:
    """With libtpu installed (requirements_tpu.txt, for the --topology check) on a machine with
    no TPU, libtpu prints an INVALID_ARGUMENT error with a source trace, and a warning, at every
    start: it cannot find the TPU VM's worker hostnames and host bounds. Giving it those of a
    lone host silences both; the topologies it compiles for are unchanged (their own names set
    them). Never set on a TPU VM, where they come from the VM's metadata, nor over a user's own."""
    import glob
    import importlib.util

    if any(name in os.environ for name in ("TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS")):
        return
    if importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return  # TPU chips (v2-v4 as /dev/accel*, v5e and later through VFIO)
    try:
        from jax._src import hardware_utils  # JAX's own PCI scan for TPU chips

        if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
            return
    except Exception:  # a private module: if it moves, the device files above decide
        pass
    os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
    os.environ["TPU_HOST_BOUNDS"] = "1,1,1"


def multi_process_environment(environ=None) -> Optional[str]:
    """What in the environment says this process is one of several, in words; None if nothing.

    Read from the variables the launchers set: JAX's own, a TPU pod's worker list, SLURM,
    Open MPI and a Kubernetes JobSet."""
    env = os.environ if environ is None else environ

    def count(name):
        try:
            return int(env.get(name, ""))
        except ValueError:
            return 0

    found = []
    if env.get("JAX_COORDINATOR_ADDRESS"):
        found.append(f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}")
    if count("JAX_NUM_PROCESSES") > 1:
        found.append(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']}")
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        workers = [w for w in env.get(name, "").split(",") if w.strip()]
        if len(workers) > 1:
            found.append(f"a TPU pod ({name} lists {len(workers)} workers)")
            break
    if count("MEGASCALE_NUM_SLICES") > 1:
        found.append(f"a multi-slice TPU job (MEGASCALE_NUM_SLICES={env['MEGASCALE_NUM_SLICES']})")
    slurm_tasks = max(count("SLURM_STEP_NUM_TASKS"), count("SLURM_NTASKS"))
    if slurm_tasks > 1 and "SLURM_PROCID" in env:
        found.append(f"SLURM with {slurm_tasks} tasks")
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        found.append(f"Open MPI with {env['OMPI_COMM_WORLD_SIZE']} processes")
    if env.get("JOBSET_NAME"):
        found.append(f"a Kubernetes JobSet ({env['JOBSET_NAME']})")
    return ", ".join(found) or None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           timeout_seconds: int = 300) -> None:
    """Starts multi-host JAX when asked to or when the platform says so.

    Explicit flags (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) start it
    anywhere; otherwise JAX's own cluster detection is asked (TPU pods, SLURM, Open MPI,
    Kubernetes), and a plain machine stays a single process. `--num_processes 1` forces one
    process. When the environment says this is one process of several and the start fails,
    the run stops (SdjaxError): every worker training alone as process 0 would write the same
    files. Must run before anything touches the devices.
    """
    if _distributed_is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if num_processes == 1:
        return
    detected = multi_process_environment()
    if detected or coordinator_address:
        # If JAX's coordination client gives up it aborts the process (no Python error to
        # catch), so say first what is being started.
        print(f"multi-host: starting JAX's distributed runtime ({detected or 'coordinator ' + coordinator_address}); "
              f"waiting up to {timeout_seconds} s for the other processes", file=sys.stderr, flush=True)
    if coordinator_address and process_id not in (None, 0):
        _wait_for_coordinator(coordinator_address, timeout_seconds, detected)
    try:
        if coordinator_address:
            # CPU collectives across processes (how multi-host is tested on one machine); the
            # default in recent JAX, not in older releases.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(coordinator_address=coordinator_address,
                                       num_processes=num_processes, process_id=process_id,
                                       initialization_timeout=timeout_seconds)
            return
        jax.distributed.initialize(initialization_timeout=timeout_seconds)
    except Exception as e:  # noqa: BLE001 -- whatever JAX raised, say it in one line
        what = (str(e).strip().splitlines() or [type(e).__name__])[0][:300].rstrip(".")
        if coordinator_address or detected:
            raise DistributedStartError(
                f"this process is one of several ({detected or 'coordinator ' + coordinator_address}), "
                f"but jax.distributed.initialize failed: {what}. Check that every worker runs the "
                "same command and can reach the coordinator; for a single process pass "
                "--num_processes 1") from None
        if not isinstance(e, (ValueError, RuntimeError)):
            raise
        # No cluster detected (ValueError), or the devices are already in use in this process
        # (a notebook, tests; RuntimeError): one process.


class DistributedStartError(SdjaxError):
    """Multi-host start-up failed where the environment asked for it."""


def _wait_for_coordinator(address: str, timeout_seconds: int, detected: Optional[str]) -> None:
    """Waits until the coordinator's port accepts connections; DistributedStartError if it does
    not within the timeout (rather than JAX aborting the process)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_seconds
    error = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)),
                                          timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except (OSError, ValueError) as e:
            error = e
            time.sleep(0.5)
    reason = getattr(error, "strerror", None) or str(error) or "no answer"
    raise DistributedStartError(
        f"this process is one of several ({detected or 'coordinator ' + address}), but the "
        f"coordinator {address} did not answer within {timeout_seconds} s ({reason}): start "
        "process 0 first, check the address and port (--coordinator_address), or raise "
        "--distributed_timeout")


def _distributed_is_initialized() -> bool:
    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return check()
    from jax._src import distributed

    return distributed.global_state.client is not None


def sync_hosts(name: str) -> None:
    """Every host waits here until all have arrived (nothing to do with one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def hosts_agree(value: str) -> bool:
    """Whether every host passed the same string (each host learns the same answer)."""
    if jax.process_count() == 1:
        return True
    import hashlib

    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.blake2b(value.encode(), digest_size=16).digest(), np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(digest))
    return bool((everyone == everyone[0]).all())


_MESSAGE_BYTES = 4096


def on_main_host(action, name: str) -> None:
    """Runs `action()` on host 0 alone, then every host learns how it went: when it raised,
    every host raises SdjaxError with host 0's message (rather than the others waiting at the
    next barrier for JAX's timeout); otherwise all continue together."""
    message = ""
    if jax.process_index() == 0:
        try:
            action()
        except Exception as e:  # noqa: BLE001 - every failure is told to every host
            text = " ".join(str(e).split())
            message = text if isinstance(e, SdjaxError) else f"{type(e).__name__}: {text}"
            message = message or type(e).__name__
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        encoded = message.encode()[:_MESSAGE_BYTES]
        buffer = np.zeros(_MESSAGE_BYTES + 4, np.uint8)
        buffer[:4] = np.frombuffer(np.uint32(len(encoded)).tobytes(), np.uint8)
        buffer[4:4 + len(encoded)] = np.frombuffer(encoded, np.uint8)
        shared = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
        size = int(np.frombuffer(shared[:4].tobytes(), np.uint32)[0])
        message = shared[4:4 + size].tobytes().decode(errors="replace")
    if message:
        raise SdjaxError(f"{message} (on host 0, during {name})" if jax.process_count() > 1
                         else message)


def make_mesh(fsdp: int = 1) -> Mesh:
    """The ("data", "fsdp") mesh of every device; `fsdp` must divide the device count."""
    devices = np.asarray(jax.devices())
    if fsdp < 1 or devices.size % fsdp:
        raise SdjaxError(f"--fsdp {fsdp} does not divide the {devices.size} devices: give a "
                         f"divisor of {devices.size}")
    return Mesh(devices.reshape(-1, fsdp), (DATA_AXIS, FSDP_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_size(mesh: Mesh) -> int:
    return dict(mesh.shape).get(FSDP_AXIS, 1)


def fsdp_sharding(mesh: Mesh, shape) -> NamedSharding:
    """An array of `shape` split over the "fsdp" axis along its largest dimension that the
    axis divides (replicated when none does, or when fsdp is 1)."""
    n = fsdp_size(mesh)
    if n > 1:
        for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
            if shape[dim] >= n and shape[dim] % n == 0:
                spec = [None] * len(shape)
                spec[dim] = FSDP_AXIS
                return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def mesh_context(mesh: Mesh):
    """Makes `mesh` the context mesh while a jitted function is traced (use inside it): code that
    must place work on the mesh itself, as the TPU flash-attention kernel does with
    `jax.shard_map` (XLA cannot partition a Pallas kernel), reads it from there."""
    use = getattr(jax.sharding, "use_abstract_mesh", None)
    if use is None:  # JAX < 0.7 keeps it private
        from jax._src.mesh import use_abstract_mesh as use
    return use(mesh.abstract_mesh)


def batch_sharded(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Sharding of a batch whose axis `leading_axes` is the sample axis (0, or 1 after the
    micro-batch axis of gradient accumulation): split over every device of the mesh."""
    return NamedSharding(mesh, P(*([None] * leading_axes), tuple(mesh.axis_names)))


def host_copy(tree):
    """Host numpy copies of global arrays, whole on every host: replicated ones from a local
    shard, split ones gathered from every host."""
    from jax.experimental import multihost_utils

    def get(x):
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(get, tree)


def to_replicated(tree, mesh: Mesh):
    """`tree`'s device arrays replicated over `mesh`, on every host. Those split across hosts
    (fsdp) are gathered by one program for them all, compiled once per mesh and tree structure:
    a program per leaf costs a compile and a round of collectives per leaf, every validation."""
    sharding = replicated(mesh)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    split = []
    for i, x in enumerate(leaves):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            continue
        if x.is_fully_addressable:  # on this host's devices: a copy, no program
            leaves[i] = jax.device_put(x, sharding)
        else:
            split.append(i)
    if split:
        for i, x in zip(split, _replicator(mesh)([leaves[i] for i in split])):
            leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.lru_cache(maxsize=None)
def _replicator(mesh: Mesh):
    return jax.jit(lambda arrays: arrays, out_shardings=replicated(mesh))


def global_batch(local: dict, mesh: Mesh, sample_axis: int = 0) -> dict:
    """Builds global arrays from this host's rows (each host passes a different part)."""
    sharding = batch_sharded(mesh, sample_axis)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


PREFETCH_TO_DEVICES = 2  # batches placed on the devices ahead of the one the step is given


def placed_ahead(host_batches: Iterator[dict], mesh: Mesh, sample_axis: int = 0,
                 depth: int = PREFETCH_TO_DEVICES) -> Iterator[dict]:
    """`global_batch` of each host batch, in order, with the next `depth` already placed.

    Placing only starts the copies to the devices (dispatch is asynchronous), so the batches
    of the next steps travel while this one is computed, and none waits to be copied after a
    step the host had to wait for (a log step). The order is the source's on every host; an
    error of the source is raised when its batch is due, not `depth` steps early. Closing
    this iterator closes the source. The source is read `depth` batches past the last one used.
    """
    source = iter(host_batches)
    ahead: collections.deque = collections.deque()
    exhausted = False
    try:
        while True:
            while not exhausted and len(ahead) <= depth:
                try:
                    ahead.append(global_batch(next(source), mesh, sample_axis))
                except StopIteration:
                    exhausted = True
                except Exception as e:  # noqa: BLE001 -- raised in its turn, below
                    ahead.append(e)
                    exhausted = True
            if not ahead:
                return
            item = ahead.popleft()
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


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
