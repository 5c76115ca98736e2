"""Devices: the mesh, sharding rules for the state, batches onto devices, pmap mode, multi-host.

`jit` mode (the main path): one `jax.jit` step over a `jax.sharding.Mesh` with axes
("data", "fsdp", "tensor"). Every parameter gets a PartitionSpec from the first matching rule
over its path (`parallel.param_rules`, jaxft.rules); optimizer moments take their parameter's.
Batches are split over ("data", "fsdp"). XLA inserts the collectives: FSDP gathers weights where
they are used, tensor parallelism splits attention heads and the MLP.

`pmap` mode: classic data parallelism for users who expect it. Replicated state, the same step
function with its gradient sums reduced by `lax.psum` over the "batch" axis.

Multi-host: `initialize_distributed` starts JAX's distributed runtime; every process computes the
same global batch indices and feeds only its rows (`batching.host_rows`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft import rules as rules_lib
from jaxft.config import MESH_AXES as AXES
from jaxft.errors import fail

BATCH_AXES = ("data", "fsdp")
PMAP_AXIS = "batch"

# ---- mesh ------------------------------------------------------------------------------------
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


def make_mesh(requested: dict, devices: Optional[Sequence] = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(requested, len(devices))
  # jax.sharding.Mesh gives Auto axes (jax.make_mesh would make them Explicit), as flax expects.
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def batch_parallelism(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(name: str, batch_size: int, mesh: Mesh) -> None:
  n = batch_parallelism(mesh)
  if batch_size % n:
    fail(f"config {name}={batch_size} is not divisible by the data-parallel size {n} "
         f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple "
         f"of {n}")
  if batch_size % jax.process_count():
    fail(f"config {name}={batch_size} is not divisible by the {jax.process_count()} processes")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---- state shardings from rules ----------------------------------------------------------------
def spec_for(path: str, shape: tuple, rules: Sequence, mesh: Mesh) -> P:
  """The PartitionSpec of the first rule matching `path`, fitted to `shape` and the mesh."""
  axes = tuple(rules_lib.first_match(path, rules, key="parallel.param_rules"))
  if len(axes) != len(shape):  # e.g. a LoRA factor under a kernel's rule
    return P()
  fitted = []
  for axis, dim in zip(axes, shape):
    size = mesh.shape[axis] if axis else 1
    fitted.append(axis if axis and size > 1 and dim % size == 0 else None)
  return P(*fitted)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Sequence) -> Any:
  """A NamedSharding for every parameter (leaf of shape-carrying `abstract_params`)."""
  return rules_lib.map_paths(
      lambda path, leaf: NamedSharding(mesh, spec_for(path, leaf.shape, rules, mesh)),
      abstract_params)


def state_shardings(abstract_state: dict, mesh: Mesh, rules: Sequence,
                    tx: optax.GradientTransformation) -> dict:
  """Shardings of the train state {"step", "params", "opt_state", "rng"}: parameters by the
  rules, each optimizer moment as its parameter, everything else replicated."""
  params = param_shardings(abstract_state["params"], mesh, rules)
  whole = replicated(mesh)
  # tx.init traced abstractly (eval_shape): run eagerly it would compile its zeros.
  opt_state = optax.tree_map_params(lambda p: jax.eval_shape(tx.init, p),
                                    lambda _, sharding: sharding, abstract_state["opt_state"],
                                    params, transform_non_params=lambda _: whole)
  rest = {k: jax.tree_util.tree_map(lambda _: whole, v) for k, v in abstract_state.items()
          if k not in ("params", "opt_state")}
  return {**rest, "params": params, "opt_state": opt_state}


# ---- batches onto devices ----------------------------------------------------------------------
def to_devices(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles a global batch from this process's rows (all rows when there is one process)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


def to_pmap_devices(host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[rows, ...] -> [local devices, rows / local devices, ...] for a pmapped step."""
  n = jax.local_device_count()
  return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in host_batch.items()}


def replicate(tree: Any) -> Any:
  """A copy of `tree` on every local device, stacked on a leading axis (the pmap layout)."""
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding),
      jax.device_get(tree))


def unreplicate(tree: Any) -> Any:
  """The first replica of a pmap-layout tree, as host arrays."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), tree)


# ---- multi-host ----------------------------------------------------------------------------------
def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def wants_distributed(mode: str) -> bool:
  if mode == "on":
    return True
  if mode == "off":
    return False
  # auto: an explicit coordinator, a multi-task SLURM job, or a multi-worker TPU slice.
  slurm_tasks = _env_int("SLURM_NTASKS") or 1
  tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return bool(os.environ.get("JAXFT_COORDINATOR_ADDRESS")) or slurm_tasks > 1 or "," in tpu_workers


def initialize_distributed(mode: str, coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts jax.distributed when asked (or, in auto mode, when the environment says so).

  Arguments left unset come from JAXFT_COORDINATOR_ADDRESS, JAXFT_NUM_PROCESSES and
  JAXFT_PROCESS_ID; when those are unset too, JAX detects SLURM and Cloud TPU by itself.
  """
  if not wants_distributed(mode) or _distributed_started():
    return
  coordinator_address = coordinator_address or os.environ.get("JAXFT_COORDINATOR_ADDRESS")
  num_processes = num_processes if num_processes is not None else _env_int("JAXFT_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAXFT_PROCESS_ID")
  # CPU processes need a collectives implementation; GPU and TPU backends ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except (RuntimeError, ValueError) as e:
    fail(f"cannot start jax.distributed (coordinator {coordinator_address}, {num_processes} "
         f"processes, this is {process_id}): {e}; check the coordinator address and that every "
         "process was started")


def _distributed_started() -> bool:
  try:
    from jax._src import distributed
    return distributed.global_state.client is not None
  except Exception:  # private API moved: assume not started
    return False


def check_shared_directory(directory: str) -> None:
  """Every process must see the same checkpoint directory (a shared file system)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  os.makedirs(directory, exist_ok=True)
  marker = os.path.join(directory, f".jaxft-host-{jax.process_index()}")
  with open(marker, "w") as f:
    f.write("ok")
  multihost_utils.sync_global_devices("jaxft: markers written")
  missing = [i for i in range(jax.process_count())
             if not os.path.exists(os.path.join(directory, f".jaxft-host-{i}"))]
  multihost_utils.sync_global_devices("jaxft: markers checked")
  os.remove(marker)
  if missing:
    fail(f"{directory} is not shared by all hosts (process {jax.process_index()} cannot see "
         f"the files of processes {missing}); put --workdir on a file system every host mounts")
