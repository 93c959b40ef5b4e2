"""Device mesh, FSDP parameter shardings, batch shardings (training, and sampling over local devices),
multi-host initialisation and host barriers.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose replicas also
split the parameters and optimizer state, ZeRO-3 style). Batches are split over both axes; every
parameter larger than ``min_fsdp_size`` elements is split over ``fsdp`` along its largest divisible
dimension. XLA inserts the all-gathers and reduce-scatters (GSPMD), so the model code stays unsharded.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import multihost

MESH_AXES = ("data", "fsdp")


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join the multi-host job: explicit coordinator flags, else JAX's auto-detection (TPU pods, SLURM,
    Open MPI); a single process needs nothing."""
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")):
        jax.distributed.initialize()
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


_barrier_count = 0


def sync_processes(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process has reached ``name``: a host-side barrier over JAX's coordination service,
    for the points where the other processes wait for work that only process 0 does (writing a tiny base,
    rendering the synthetic data, exporting a model). A device collective (``sync_global_devices``) is wrong
    there: on CPU, Gloo gives up after 30 s when one process reaches its first collective that much later.
    Every process must pass the same barriers in the same order (their keys are numbered)."""
    global _barrier_count
    if jax.process_count() == 1:
        return
    _barrier_count += 1
    multihost.get_barrier_sync_fn()(key=f"jointnet_{name}_{_barrier_count}", timeout_ms=timeout_s * 1000)


def broadcast_from_process0(value: np.ndarray) -> np.ndarray:
    """Process 0's ``value`` on every process (a small array; a device collective, so call it right after a
    :func:`sync_processes` barrier on CPU)."""
    if jax.process_count() == 1:
        return value
    return np.asarray(multihost.broadcast_one_to_all(value))


def all_processes_agree(ok: bool, name: str) -> bool:
    """Whether ``ok`` holds on every process (after a :func:`sync_processes` barrier named ``name``): a
    decision all processes must take alike, such as "this checkpoint could be read", when one process alone
    may have failed."""
    if jax.process_count() == 1:
        return bool(ok)
    sync_processes(name)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(ok)))))


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over all global devices; -1 on one axis means "the rest"."""
    n = jax.device_count()
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} available devices")
    devices = np.asarray(jax.devices()).reshape(data, fsdp)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def fsdp_spec(shape, fsdp_size: int, min_fsdp_size: int = 2**14) -> PartitionSpec:
    """Split the largest dimension divisible by the fsdp axis; replicate small or indivisible arrays."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(tree, mesh: Mesh, min_fsdp_size: int = 2**14):
    """FSDP ``NamedSharding`` for every array leaf of a pytree (parameters, optimizer moments, ...)."""
    size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size, min_fsdp_size)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(tree, batch: int):
    """Place every array of ``tree`` (leading axis = the batch) data-parallel over this process's devices,
    when there are several and ``batch`` divides evenly over them (sampling); else leave it as it is."""
    devices = jax.local_devices()
    if len(devices) == 1 or batch % len(devices):
        return tree
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    return jax.tree.map(lambda a: jax.device_put(a, sharding), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over both mesh axes."""
    return NamedSharding(mesh, PartitionSpec(MESH_AXES))
