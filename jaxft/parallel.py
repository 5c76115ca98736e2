"""The device mesh, the shardings of state and batches, and moving host batches onto devices.

The mesh has the axes ("data", "fsdp", "tensor"); batches are split along ("data", "fsdp").
The state is replicated in this first version: sharding rules for parameters plug in here.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.errors import fail

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(requested: dict, num_devices: int) -> tuple[int, ...]:
  """Axis sizes for `num_devices`, with at most one -1 meaning "the rest"."""
  sizes = [int(requested.get(a, 1)) for a in AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      fail(f"parallel.mesh {dict(zip(AXES, sizes))} cannot fill {num_devices} devices: "
           f"{num_devices} is not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    fail(f"parallel.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but "
         f"{num_devices} are available; make the axis sizes multiply to {num_devices} or use -1")
  return tuple(sizes)


def make_mesh(requested: dict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(requested, len(devices))
  # jax.sharding.Mesh gives Auto axes (jax.make_mesh would make them Explicit), as flax expects.
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def batch_parallelism(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(name: str, batch_size: int, mesh: Mesh) -> None:
  n = batch_parallelism(mesh)
  if batch_size % n:
    fail(f"config {name}={batch_size} is not divisible by the data-parallel size {n} "
         f"(mesh data x fsdp); use a multiple of {n}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh: Mesh):
  """A sharding for every leaf of the (abstract) state: replicated for now."""
  return jax.tree_util.tree_map(lambda _: replicated(mesh), abstract_state)


def to_devices(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles a global batch from this process's rows (all rows when there is one process)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}
