"""Mesh and data placement (data parallelism; fsdp/tensor axes come later).

One mesh axis, `data`, over every device of every process. Parameters and the train state are
replicated; a global batch [accum, micro_batch, seq] is split over `data` along the micro-batch
axis, and each process supplies only its own rows (`global_batch_from_local`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
BATCH_SPEC = P(None, DATA, None)  # [accum, micro_batch, seq]
EVAL_BATCH_SPEC = P(DATA, None)  # [micro_batch, seq]


def make_mesh(devices=None) -> Mesh:
    """A 1-axis `data` mesh over `devices` (default: all devices of all processes).

    The axis type is Auto: with jax's default (Explicit) axes the embedding gather fails to shard.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,), axis_types=(AxisType.Auto,))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def replicate(tree, mesh: Mesh):
    """Put every array of `tree` on every device of `mesh` (params, train state, RNG keys)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def global_batch_from_local(local: np.ndarray, mesh: Mesh, spec: P = BATCH_SPEC) -> jax.Array:
    """This process's rows -> the global array sharded by `spec`.

    local: [accum, local_micro_batch, seq] for BATCH_SPEC (or [local_micro_batch, seq] for
    EVAL_BATCH_SPEC); the global micro-batch is local_micro_batch * process_count.
    """
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Join a multi-process run (`jax.distributed.initialize`) when a coordinator address is given.

    Call before anything touches a device. Without an address this is a single-process run.
    """
    if coordinator_address is not None and not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
