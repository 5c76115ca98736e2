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
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft import rules as rules_lib, storage
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
def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
  value = env.get(name, "").strip()
  return int(value) if value.isdigit() else None


def wants_distributed(mode: str, env: Mapping[str, str] = os.environ) -> bool:
  """Whether to start jax.distributed: "on", "off", or in "auto" mode when this process really
  is one of several: an explicit coordinator, an srun step of several tasks (not a bare
  SLURM_NTASKS: a script started directly inside `salloc -n 8` or an sbatch allocation is one
  process), or a multi-worker TPU slice."""
  if mode in ("on", "off"):
    return mode == "on"
  return (bool(env.get("JAXFT_COORDINATOR_ADDRESS"))
          or (_env_int(env, "SLURM_STEP_NUM_TASKS") or 1) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def _expand_slurm_counts(text: str) -> list[int]:
  """SLURM's per-node counts, "2(x3),1" -> [2, 2, 2, 1]."""
  counts = []
  for part in filter(None, text.split(",")):
    value, _, repeat = part.partition("(x")
    counts += [int(value)] * (int(repeat.rstrip(")")) if repeat else 1)
  return counts


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int:
  counts = _expand_slurm_counts(env.get("SLURM_STEP_TASKS_PER_NODE", "")
                                or env.get("SLURM_TASKS_PER_NODE", ""))
  node = _env_int(env, "SLURM_NODEID") or 0
  if counts:
    return counts[min(node, len(counts) - 1)]
  return _env_int(env, "SLURM_NTASKS_PER_NODE") or 1


def _visible_gpus(env: Mapping[str, str], device_dir: str = "/dev") -> Optional[int]:
  """How many NVIDIA GPUs this process may use, from the environment SLURM sets, else the
  device files; None where there are none to tell of."""
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible is not None and visible != "NoDevFiles":
    return len([d for d in visible.split(",") if d.strip()])
  for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
    if env.get(name):
      return len([d for d in env[name].split(",") if d.strip()])
  if _env_int(env, "SLURM_GPUS_ON_NODE"):
    return _env_int(env, "SLURM_GPUS_ON_NODE")
  try:
    count = sum(1 for n in os.listdir(device_dir) if n.startswith("nvidia") and n[6:].isdigit())
  except OSError:
    count = 0
  return count or None


def slurm_local_device_ids(env: Mapping[str, str], device_dir: str = "/dev"
                           ) -> Optional[list[int]]:
  """The local GPUs this SLURM task should drive. JAX alone takes [SLURM_LOCALID]: one GPU per
  task, wrong both for one task per node (it would drive 1 GPU of 8) and for tasks bound to
  their own GPUs (each sees its GPU as 0). None leaves JAX's choice (no GPUs, or a layout this
  cannot tell)."""
  visible = _visible_gpus(env, device_dir)
  if not visible:
    return None
  tasks_here = _slurm_tasks_on_this_node(env)
  if tasks_here == 1 or env.get("SLURM_GPUS_PER_TASK") or visible < tasks_here:
    return list(range(visible))  # every GPU this task sees is its own
  if visible % tasks_here == 0:  # all tasks see all GPUs: each takes its share
    share, local = visible // tasks_here, _env_int(env, "SLURM_LOCALID") or 0
    return list(range(local * share, (local + 1) * share))
  return None


def distributed_arguments(env: Mapping[str, str] = os.environ) -> dict:
  """jax.distributed.initialize's arguments from the environment: JAXFT_COORDINATOR_ADDRESS,
  JAXFT_NUM_PROCESSES and JAXFT_PROCESS_ID where set; else, in an srun step, SLURM's task count
  and id and this task's GPUs (the coordinator JAX derives from the step's first node); else
  nothing, and JAX detects Cloud TPU by itself."""
  if env.get("JAXFT_COORDINATOR_ADDRESS"):
    return {"coordinator_address": env["JAXFT_COORDINATOR_ADDRESS"],
            "num_processes": _env_int(env, "JAXFT_NUM_PROCESSES"),
            "process_id": _env_int(env, "JAXFT_PROCESS_ID")}
  if _env_int(env, "SLURM_STEP_NUM_TASKS") is not None and "SLURM_PROCID" in env:
    return {"num_processes": _env_int(env, "SLURM_STEP_NUM_TASKS"),
            "process_id": _env_int(env, "SLURM_PROCID"),
            "local_device_ids": slurm_local_device_ids(env)}
  return {}


def initialize_distributed(mode: str, env: Mapping[str, str] = os.environ) -> None:
  """Starts jax.distributed when asked (or, in auto mode, when the environment says so), with
  `distributed_arguments`."""
  if not wants_distributed(mode, env) or _distributed_started():
    return
  arguments = distributed_arguments(env)
  # CPU processes need a collectives implementation; GPU and TPU backends ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**arguments)
  except (RuntimeError, ValueError) as e:
    described = ", ".join(f"{k}={v}" for k, v in arguments.items()) or "detected by JAX"
    fail(f"cannot start jax.distributed ({described}): {e}; check the coordinator address and "
         "that every process was started")


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
  storage.makedirs(directory)
  marker = storage.join(directory, f".jaxft-host-{jax.process_index()}")
  storage.write_text(marker, "ok")
  multihost_utils.sync_global_devices("jaxft: markers written")
  missing = [i for i in range(jax.process_count())
             if not storage.exists(storage.join(directory, f".jaxft-host-{i}"))]
  multihost_utils.sync_global_devices("jaxft: markers checked")
  storage.remove(marker)
  if missing:
    fail(f"{directory} is not shared by all hosts (process {jax.process_index()} cannot see "
         f"the files of processes {missing}); put --workdir on a file system every host mounts")
