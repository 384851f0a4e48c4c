"""Device mesh, partition rules and multi-host data placement.

Mesh axes (outermost first): `data` (pure data parallelism: parameters replicated), `fsdp`
(data parallelism with the frozen weights, LoRA params and optimizer state sharded: ZeRO-3),
`tensor` (tensor parallelism: attention heads, MLP width and vocabulary split) and `expert`
(expert parallelism: an MoE layer's experts, frozen and adapters, split; its devices also split
the batch, so tokens travel to their experts' devices and back, as XLA lays out the dispatch).
A single device is a 1x1x1x1 mesh.

Every parameter carries logical axis names (`out_sharding` metadata, see `models.linear.logical_axes`);
`RULES` maps each logical axis to a mesh axis, the same way for frozen weights, LoRA params and
(through `train_state_shardings`) the optimizer state:

  layers   -> None     the stacked-block axis is scanned over, one layer at a time
  embed    -> fsdp     model width: every matrix and norm is split over fsdp
  heads    -> tensor   q/proj width
  kv_heads -> tensor   k/v width
  mlp      -> tensor   MLP hidden width
  vocab    -> tensor   embedding rows / head columns
  expert   -> expert   MoE experts (size 1 unless mesh.expert is set: whole on each device)

A parameter dimension that its mesh axis does not divide, or whose mesh axis an earlier dimension
already uses, stays replicated. The batch [accum, micro_batch, seq] is split over (data, fsdp,
expert) along the micro-batch axis and replicated over tensor; each process builds only its own rows
(`batch_slice`, `global_batch_from_local`). `place` and `host_copy` move process-local values to
global arrays and back; `initialize_distributed` joins a multi-process run.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import numpy as np
import optax
from flax import nnx
from flax.traverse_util import unflatten_dict
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxlora.errors import ConfigError

DATA, FSDP, TENSOR, EXPERT = "data", "fsdp", "tensor", "expert"
MESH_AXES = (DATA, FSDP, TENSOR, EXPERT)
BATCH_AXES = (DATA, FSDP, EXPERT)  # the batch is split over every axis but tensor
BATCH_SPEC = P(None, BATCH_AXES, None)  # [accum, micro_batch, seq]
EVAL_BATCH_SPEC = P(BATCH_AXES, None)  # [micro_batch, seq]

RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("embed", FSDP),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("mlp", TENSOR),
    ("vocab", TENSOR),
    ("expert", EXPERT),
)


# ---------------------------------------------------------------------------------------------
# Mesh


def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int, expert: int = 1) -> tuple[int, int, int, int]:
    """The (data, fsdp, tensor, expert) sizes for `n_devices`; one size may be -1 (the remaining devices).

    ConfigError (one sentence) when the sizes do not multiply to the device count.
    """
    sizes = {DATA: data, FSDP: fsdp, TENSOR: tensor, EXPERT: expert}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    given = " x ".join(f"mesh.{a}={s}" for a, s in sizes.items() if a != EXPERT or s != 1)
    fills = [a for a, s in sizes.items() if s == -1]
    if fills:
        if n_devices % fixed:
            raise ConfigError(f"{given}: the {n_devices} devices cannot be split into the fixed axes' {fixed}; "
                              f"choose sizes whose product divides {n_devices}")
        sizes[fills[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"{given} = {fixed} devices, but there are {n_devices}; make the product {n_devices} "
                          f"or set one axis to -1")
    return sizes[DATA], sizes[FSDP], sizes[TENSOR], sizes[EXPERT]


def make_mesh(shape: tuple[int, ...] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor, expert) mesh over `devices` (default: all devices of all processes).

    shape: the axis sizes, trailing ones 1 if left out (default: every device on `data`). `jax.make_mesh` lays the devices
    out (process by process on CPU/GPU, so the inner axes stay within a host; along the physical
    topology on TPU). Axis types are Auto: with Explicit axes the embedding gather fails to shard.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = (len(devices),) if shape is None else tuple(shape)
    shape += (1,) * (len(MESH_AXES) - len(shape))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """Ways the batch is split: data x fsdp x expert."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ---------------------------------------------------------------------------------------------
# Partition rules


def spec_for(names: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh,
             rules: tuple = RULES) -> P:
    """Logical axis names of one parameter -> its PartitionSpec on `mesh` (see the module docstring)."""
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical axes {names} do not match the shape {shape}")
    table = dict(rules)
    used, spec = set(), []
    for name, size in zip(names, shape):
        if name is not None and name not in table:
            raise ValueError(f"no partition rule for logical axis {name!r}; add it to the rules table")
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def param_shardings(params: nnx.State, mesh: Mesh, rules: tuple = RULES) -> dict:
    """An `nnx.State` of params (or its abstract form) -> a pure dict of NamedShardings by `rules`."""
    flat = {path: NamedSharding(mesh, spec_for(v.get_metadata().get("out_sharding"), v.shape, mesh, rules))
            for path, v in nnx.to_flat_state(params)}
    return unflatten_dict(flat) if flat else {}


def shard_params(params: nnx.State, mesh: Mesh, rules: tuple = RULES) -> nnx.State:
    """Place every param of `params` by `rules` (a no-op for params already placed so)."""
    shardings = param_shardings(params, mesh, rules)
    placed = jax.tree.map(lambda x: x, params)  # a new State; the caller's keeps its arrays
    nnx.replace_by_pure_dict(placed, place(nnx.to_pure_dict(params), shardings))
    return placed


def train_state_shardings(state, lora_shardings: dict, optimizer: optax.GradientTransformation):
    """Shardings of a `step.TrainState`: the LoRA params by their rules, every param-shaped leaf of
    the optimizer state (Adam moments, accumulated gradients) like its param, the rest replicated."""
    replicated = NamedSharding(next(iter(jax.tree.leaves(lora_shardings))).mesh, P())
    opt = optax.tree_map_params(optimizer, lambda _, s: s, state.opt_state, lora_shardings,
                                transform_non_params=lambda _: replicated)
    return state.replace(step=replicated, lora=lora_shardings, opt_state=opt)


def activation_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of [batch, seq, width] activations: batch over (data, fsdp, expert), the rest whole."""
    return NamedSharding(mesh, P(BATCH_AXES, None, None))


def place(tree, shardings):
    """Lay out every array of `tree` by `shardings` (a matching tree, or one sharding for all).

    A global array is resharded. A process-local value (numpy, or an array on this process's
    devices, the same on every process: an initial train state, an RNG key) is cut on the host,
    so that each device receives only its own part, also when the mesh spans processes.
    """
    def put(x, sharding):
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def host_copy(tree):
    """Every array of `tree` as a whole numpy array on every process (a collective across processes:
    all must call it), for exports; `jax.device_get` alone cannot read other processes' shards."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def replicate(tree, mesh: Mesh):
    """Put every array of `tree` on every device of `mesh` (RNG keys, small state)."""
    return place(tree, NamedSharding(mesh, P()))


# ---------------------------------------------------------------------------------------------
# Data


@functools.lru_cache(maxsize=None)
def batch_slice(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process loads row slice `index` of `count` equal slices of each global batch.

    count is the number of processes that hold different rows: the process count, unless the
    tensor axis spans processes (processes on one tensor group then load the same rows).
    """
    n = data_parallel_size(mesh)
    indices = NamedSharding(mesh, P(BATCH_AXES)).addressable_devices_indices_map((n,)).values()
    rows = sorted({idx[0].start or 0 for idx in indices})
    size = len(rows)
    if rows != list(range(rows[0], rows[0] + size)) or rows[0] % size or n % size:
        raise ConfigError(f"the mesh gives process {jax.process_index()} the batch slices {rows} of {n}, which are "
                          "not one contiguous block; build the mesh with make_mesh")
    return rows[0] // size, n // size


def global_batch_from_local(local: np.ndarray, mesh: Mesh, spec: P = BATCH_SPEC) -> jax.Array:
    """This process's rows -> the global array sharded by `spec`.

    local: [accum, local_micro_batch, seq] for BATCH_SPEC ([local_micro_batch, seq] for
    EVAL_BATCH_SPEC): slice `batch_slice(mesh)[0]` of the global micro-batch, which has
    local_micro_batch * `batch_slice(mesh)[1]` rows.
    """
    axis = list(spec).index(BATCH_AXES)
    shape = list(local.shape)
    shape[axis] *= batch_slice(mesh)[1]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, tuple(shape))


# ---------------------------------------------------------------------------------------------
# Multi-host


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-process run (`jax.distributed.initialize`); call before anything touches a device.

    Explicit: any of the three arguments, or the environment variables JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID (an argument wins); jax fills what is missing from Slurm,
    Open MPI or Cloud TPU metadata. Automatic: on a Cloud TPU VM (a pod slice's every worker)
    with nothing given. Otherwise a single-process run. Returns whether the process joined.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = _env_int("JAX_PROCESS_ID")
    if address is None and num_processes is None and process_id is None and not _on_cloud_tpu_vm():
        return False
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)
    return True


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(f"the environment variable {name}={os.environ[name]!r} is not an integer") from None


def _on_cloud_tpu_vm() -> bool:
    """Whether jax found TPU chips and libtpu at import (jax's own check, read without touching a device)."""
    from jax._src import cloud_tpu_init  # no public equivalent that leaves the backend uninitialised
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))

