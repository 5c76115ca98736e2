"""The compiled steps: jit (or pmap) with shardings and donation, per-width programs compiled
ahead of time, and the program cache that keeps them across runs.

The training loop calls a `TrainStep` (jit or pmap mode) and an `EvalStep`; each holds a
`WidthPrograms`, the one place that calls jax.jit / jax.pmap, lowers and compiles:
- Every batch width the data can produce (one per bucket length) is compiled before the first
  step, in compiler threads (XLA releases the GIL), each program as soon as it is lowered, so
  tracing the next overlaps compiling the last. No shape compiles mid-run.
- A jit step is traced once for all its widths: exported with a symbolic width (jax.export),
  then specialised per width, which costs a fraction of tracing the model again.
- The program cache stores each compiled program (jax.experimental.serialize_executable) under
  a key of everything its trace depends on, so a repeated run loads it without tracing,
  lowering or hashing anything (JAX's own persistent cache still needs all three).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import pickle
import sys
import threading
import time
import zlib
from typing import Any, Callable, Optional, Sequence

import jax

from jaxft import attention, parallel, runtime, step as step_lib

# ---- counting compilations ---------------------------------------------------------------
class CompileStats:
  """XLA compilations in this process, counted through jax.monitoring.

  `programs`/`seconds`: every program handed to XLA and the time it took, loads from JAX's
  persistent cache and from the program cache included (`cache_hits` of them). Training logs
  them cumulatively, so a shape compiled mid-run shows up as a jump.
  """
  programs = 0
  seconds = 0.0
  cache_hits = 0

  @classmethod
  def record_load(cls, seconds: float) -> None:
    """A program loaded from the program cache (JAX reports its own cache's loads)."""
    cls.programs += 1
    cls.cache_hits += 1
    cls.seconds += seconds

  @classmethod
  def reset(cls) -> None:
    """Counts from zero (a process that runs several trainings, e.g. a sweep's worker)."""
    cls.programs, cls.seconds, cls.cache_hits = 0, 0.0, 0

  @classmethod
  def snapshot(cls) -> dict:
    return {"compiles": cls.programs, "compile_seconds": cls.seconds,
            "compile_cache_hits": cls.cache_hits}


_thread = threading.local()  # .jax_cache_hit: this thread's compile was a JAX cache load


def _count_compile(event: str, duration: float, **_) -> None:
  if event == "/jax/core/compile/backend_compile_duration":
    CompileStats.programs += 1
    CompileStats.seconds += duration


def _count_cache_hit(event: str, **_) -> None:
  if event == "/jax/compilation_cache/cache_hits":
    CompileStats.cache_hits += 1
    _thread.jax_cache_hit = True  # JAX records the event in the thread that compiles


@functools.cache
def count_compilations() -> None:
  jax.monitoring.register_event_duration_secs_listener(_count_compile)
  jax.monitoring.register_event_listener(_count_cache_hit)


# ---- the program cache -------------------------------------------------------------------
CACHE_VERSION = 3  # bump when the stored format or the key's recipe changes
CACHE_SETTING = "JAXFT_PROGRAM_CACHE"  # "1": on, "0": off; default: on where it was measured
CACHE_MEGABYTES = "JAXFT_PROGRAM_CACHE_MB"  # size bound; least recently used programs go first
_CACHE_DEFAULT_MB = 1024
_VERSIONED = ("jax", "libtpu", "nvidia-", "flax", "optax", "transformers", "numpy", "ml-dtypes")
_ENVIRONMENT = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")


def cache_directory() -> Optional[str]:
  """`jaxft-programs/` in JAX's persistent cache directory, private to this user; None where the
  cache is off. Default: on for CPU backends only, where a warm start is measured to gain
  (benchmarks/README.md); JAXFT_PROGRAM_CACHE=1 turns it on elsewhere. One process only."""
  setting = os.environ.get(CACHE_SETTING, "")
  wanted = setting == "1" or (setting != "0" and jax.default_backend() == "cpu")
  base = jax.config.jax_compilation_cache_dir
  if (not wanted or not base or not jax.config.jax_enable_compilation_cache
      or jax.process_count() > 1 or "://" in base):
    return None
  return runtime.private_directory(os.path.join(base, "jaxft-programs"), CACHE_SETTING)


@functools.cache
def _environment() -> str:
  """What the process's programs depend on beyond the experiment: code, libraries, devices."""
  package = os.path.dirname(os.path.abspath(__file__))
  source = hashlib.sha256()
  for root, dirs, files in os.walk(package):
    dirs.sort()
    for name in sorted(files):
      if name.endswith((".py", ".cc")):  # .cc: the CPU layer's kernels
        with open(os.path.join(root, name), "rb") as f:
          source.update(name.encode() + b"\0" + f.read())
  versions = {}
  for name, version in runtime.installed_distributions().items():
    name = name.lower().replace("_", "-")
    if name.startswith(_VERSIONED):
      versions[name] = version
  devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
  return json.dumps({"format": CACHE_VERSION, "jaxft_source": source.hexdigest(),
                     "versions": dict(sorted(versions.items())), "devices": devices,
                     "platform_version": jax.devices()[0].client.platform_version,
                     "environment": {k: os.environ.get(k, "") for k in _ENVIRONMENT},
                     "jax_config": {k: repr(v) for k, v in sorted(jax.config.values.items())}},
                    sort_keys=True)


def _model_files(model_dir: str) -> str:
  """config.json and any Python (trust_remote_code models) of the model folder, hashed."""
  digest = hashlib.sha256()
  for name in sorted(os.listdir(model_dir)):
    if name == "config.json" or name.endswith(".py"):
      with open(os.path.join(model_dir, name), "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  return digest.hexdigest()


def experiment_key(config, model_dir: str, kind: str, **extra) -> str:
  """The part of every program key that one experiment's `kind` of step ("train", "eval")
  shares: its config, model and environment, plus `extra` inputs of its construction."""
  recipe = json.dumps({"kind": kind, "extra": extra, "config": config.to_json_best_effort(
      sort_keys=True), "model": _model_files(model_dir), "environment": _environment()},
                      sort_keys=True, default=repr)
  return hashlib.sha256(recipe.encode()).hexdigest()


def _leaf_signature(x) -> list:
  sharding = getattr(x, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  devices = getattr(mesh, "device_ids", None)
  return [list(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), repr(sharding),
          None if devices is None else devices.tolist()]


def program_key(prefix: str, args: Any) -> str:
  """The key of the program that `prefix`'s step compiles for these arguments."""
  leaves, treedef = jax.tree_util.tree_flatten(args)
  signature = json.dumps([str(treedef), [_leaf_signature(x) for x in leaves]])
  return hashlib.sha256((prefix + signature).encode()).hexdigest()


def _cache_path(key: Optional[str]) -> Optional[str]:
  base = cache_directory() if key else None
  return None if base is None else os.path.join(base, f"{key}.bin")


def _warn(message: str) -> None:
  print(f"jaxft: warning: program cache: {message}", file=sys.stderr, flush=True)


def load(key: Optional[str]) -> Optional[jax.stages.Compiled]:
  """The stored program, or None when there is none or it cannot be loaded (it is then
  removed, and compiled again)."""
  from jax.experimental import serialize_executable
  path = _cache_path(key)
  if path is None or not os.path.exists(path):
    return None
  if not runtime.private_file(path):
    _warn(f"{path} is not owned by this user or is writable by others; not loaded")
    return None
  start = time.perf_counter()
  try:
    with open(path, "rb") as f:
      payload, in_tree, out_tree, device_ids = pickle.loads(zlib.decompress(f.read()))
    by_id = {d.id: d for d in jax.devices()}
    # The program's own devices, in its order: by default it would expect a shard on every
    # device of the backend (a one-device run among 8 CPU devices, say).
    compiled = serialize_executable.deserialize_and_load(
        payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
  except Exception as e:  # noqa: BLE001 - a damaged or stale entry only costs a compilation
    _warn(f"{path} did not load ({type(e).__name__}: {e}); compiling")
    _remove(path)
    return None
  os.utime(path)  # recently used: evicted last
  CompileStats.record_load(time.perf_counter() - start)
  return compiled


def compile_and_store(lowered, key: Optional[str]) -> jax.stages.Compiled:
  """`lowered.compile()`, stored under `key` if XLA compiled it here.

  A program that JAX loaded from its own cache is not stored: XLA:CPU serialises such a loaded
  executable without some of its kernels, and a later process running it failed with
  "NOT_FOUND: Function wrapped_convert not found" (the next run that compiles it stores it).
  """
  count_compilations()
  _thread.jax_cache_hit = False
  compiled = lowered.compile()
  path = _cache_path(key)
  if path is not None and not _thread.jax_cache_hit:
    _store(path, compiled)
  return compiled


def _store(path: str, compiled: jax.stages.Compiled) -> None:
  """Writes `compiled` atomically (readers see the whole file or none), then evicts the least
  recently used programs beyond the size bound. A program that cannot be serialised, or a full
  disk, only costs the next run a compilation."""
  from jax.experimental import serialize_executable
  try:
    device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
    data = zlib.compress(pickle.dumps((*serialize_executable.serialize(compiled), device_ids)), 1)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except Exception as e:  # noqa: BLE001
    _warn(f"not stored ({type(e).__name__}: {e})")
    return
  evict(os.path.dirname(path), _megabytes_allowed() << 20)


def _megabytes_allowed() -> int:
  value = os.environ.get(CACHE_MEGABYTES, "")
  return int(value) if value.isdigit() else _CACHE_DEFAULT_MB


def evict(directory: str, limit_bytes: int) -> list[str]:
  """Removes the least recently used programs of `directory` until the rest fit `limit_bytes`;
  returns the removed paths."""
  entries = []
  for name in os.listdir(directory):
    if name.endswith(".bin"):
      try:
        info = os.stat(os.path.join(directory, name))
      except OSError:  # removed by another process meanwhile
        continue
      entries.append((info.st_mtime, info.st_size, os.path.join(directory, name)))
  total = sum(size for _, size, _ in entries)
  removed = []
  for _, size, path in sorted(entries):
    if total <= limit_bytes:
      break
    _remove(path)
    total -= size
    removed.append(path)
  return removed


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


# ---- programs per batch width --------------------------------------------------------------
def _batch_shape(batch: dict) -> tuple:
  """What tells a batch's programs apart (the key of WidthPrograms.compiled): the token ids' shape ([rows, width], or pmap's
  [devices, rows per device, width]) and, for packed batches, the example slots'."""
  return tuple(batch["input_ids"].shape) + tuple(batch["weights"].shape)


class WidthPrograms:
  """`transform(fn, **jit_kwargs)` (jax.jit or jax.pmap) for a step `fn(*fixed_args, batch)`,
  with a program per batch shape (width, or a packed batch's rows) compiled ahead of time
  (`pending`, `compile_all`): a call runs the program of its batch's shape, else the jitted
  function (which compiles on first use)."""

  def __init__(self, fn: Callable, transform: Callable = jax.jit,
               cache_prefix: Optional[str] = None, **jit_kwargs):
    """`cache_prefix` (experiment_key): keep the compiled programs across runs (jit only)."""
    self._transform = transform
    self._cache_prefix = cache_prefix if transform is jax.jit else None
    self._jit_kwargs = jit_kwargs
    self.jitted = transform(fn, **jit_kwargs)
    self.compiled: dict[tuple, Any] = {}  # _batch_shape(batch) -> compiled program

  def __call__(self, *args):
    return self.compiled.get(_batch_shape(args[-1]), self.jitted)(*args)

  def pending(self, host_batches: Sequence[dict], to_device: Callable, fixed_args: tuple
              ) -> list[tuple["WidthPrograms", int, Callable, Optional[str]]]:
    """(self, width, () -> the step lowered for that width, its cache key or None) for each
    width of `host_batches` without a program yet; one batch per width goes to the devices.
    Lowering happens on the first call, so that `compile_all` compiles one step's programs
    while it traces the next (and never traces a width whose program is cached)."""
    by_width = {}
    for host_batch in host_batches:
      batch = to_device(host_batch)  # keyed as calls are: by the global batch's shape
      width = _batch_shape(batch)
      if width not in self.compiled and width not in by_width:
        by_width[width] = batch
    lowering = functools.cache(lambda: self.lowering(fixed_args, list(by_width.values())))
    key = lambda batch: (None if self._cache_prefix is None else
                         program_key(self._cache_prefix, (fixed_args, batch)))
    return [(self, width, lambda batch=batch: lowering()(batch), key(batch))
            for width, batch in by_width.items()]

  def lowering(self, fixed_args: tuple, batches: list[dict]) -> Callable:
    """batch -> the step lowered for its shape. With several widths, the step is traced once
    with a symbolic width and each width only specialises that trace. Falls back to tracing
    each shape where that does not apply (one width, several processes, pmap, a model whose
    code needs a constant width)."""
    per_shape = lambda batch: self.jitted.lower(*fixed_args, batch)
    if len(batches) < 2 or jax.process_count() > 1 or self._transform is not jax.jit:
      return per_shape
    try:
      exported = _export_over_batch_shape(self.jitted, fixed_args, batches)
    except Exception:  # noqa: BLE001 - any failure only costs the faster path
      return per_shape
    call = jax.jit(exported.call, **self._jit_kwargs)
    return lambda batch: call.lower(*fixed_args, batch)


def _export_over_batch_shape(jitted, fixed_args: tuple, batches: list[dict]):
  """`jitted(*fixed_args, batch)` exported (jax.export) with every batch dimension whose size
  differs between `batches` symbolic: the padded width, or a packed batch's rows; dimensions
  that vary alike share one symbol."""
  from jax import export
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  symbols: dict = {}

  def dimension(name, axis, size):
    sizes = tuple(b[name].shape[axis] for b in batches)
    if len(set(sizes)) == 1:
      return size
    if sizes not in symbols:
      (symbols[sizes],) = export.symbolic_shape(f"d{len(symbols)}")
    return symbols[sizes]

  def symbolic(name, x):
    shape = tuple(dimension(name, axis, size) for axis, size in enumerate(x.shape))
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=x.sharding)

  batch = {name: symbolic(name, x) for name, x in batches[0].items()}
  # jaxft's own kernels are custom calls that export refuses by default: the exported program
  # is only ever run here, in this process.
  ours = [export.DisabledSafetyCheck.custom_call(t) for t in attention.custom_call_targets()]
  return export.export(jitted, disabled_checks=ours)(
      *jax.tree_util.tree_map(abstract, fixed_args), batch)


def compile_all(pending: list[tuple[WidthPrograms, int, Callable, Optional[str]]]) -> None:
  """Compiles each (programs, width, lower, key) of `WidthPrograms.pending` into
  programs.compiled, in parallel threads: lowering, in this thread, goes in order, so each
  program compiles while the next is traced. A cached program is loaded instead."""
  threads = max(1, min(len(pending), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    jobs = []
    for programs, width, lower, key in pending:
      if _cache_path(key) is not None and os.path.exists(_cache_path(key)):
        job = pool.submit(load, key)
      else:
        job = pool.submit(compile_and_store, lower(), key)
      jobs.append((programs, width, lower, key, job))
    for programs, width, lower, key, job in jobs:
      compiled = job.result()
      if compiled is None:  # a stored program that did not load: compile it after all
        compiled = compile_and_store(lower(), key)
      programs.compiled[width] = compiled


# ---- the train and eval steps of an experiment ---------------------------------------------
def eval_step(exp, cache_prefix: Optional[str] = None) -> WidthPrograms:
  """The jitted eval step of `exp` (jaxft.experiment.Experiment): (params, frozen, batch) ->
  the task's per-row outputs, split over the mesh's batch axes like the batch."""
  return WidthPrograms(step_lib.make_eval_step(exp.logits, exp.task.eval_outputs),
                       cache_prefix=cache_prefix,
                       out_shardings=parallel.batch_sharding(exp.mesh))


def train_step(exp, tx, learning_rate, abstract_state: dict, cache_prefix: Optional[str] = None,
               teacher=None, objective: Optional[tuple] = None) -> "JitTrainStep | PmapTrainStep":
  """The train step for `parallel.mode`, with how its state and batches are laid out.
  `cache_prefix` (experiment_key of "train"): keep its programs across runs (jit only).
  `teacher` (jaxft.distill.Teacher): distil from it. `objective`: (outputs function, loss
  function) in place of the task's (exp.logits, exp.task.loss), e.g. contrastive training's."""
  objective = objective or (exp.logits, exp.task.loss)
  if exp.config.parallel.mode == "pmap":
    return PmapTrainStep(exp, tx, learning_rate, abstract_state, teacher, objective)
  return JitTrainStep(exp, tx, learning_rate, abstract_state, cache_prefix, teacher, objective)


def _step_function(exp, tx, learning_rate, teacher, objective: tuple,
                   reduce_axis: Optional[str] = None):
  return step_lib.make_train_step(*objective, tx, learning_rate,
                                  exp.config.train.grad_accum_steps, reduce_axis=reduce_axis,
                                  dropout_rng=exp.config.train.dropout_rng,
                                  nonfinite_guard=step_lib.nonfinite_guard_for(exp.platform),
                                  teacher_loss=teacher and teacher.loss)


class _TrainStep:
  """What both modes share: every train and eval shape compiled before training starts."""
  teacher = None

  def _with_teacher(self, frozen: dict) -> dict:
    if self.teacher is None:
      return frozen
    return {**frozen, step_lib.TEACHER_KEY: self.teacher.params}

  def precompile(self, state: dict, frozen: dict, host_batches: list[dict],
                 eval_programs: Optional[WidthPrograms] = None,
                 eval_host_batches: Sequence[dict] = ()) -> None:
    """Compiles the train step for each batch shape and the eval step for each evaluation
    shape, all at once (compile_all)."""
    pending = self._programs.pending(host_batches, self.device_batch,
                                     (state, self._step_frozen(frozen)))
    if eval_programs is not None:
      pending += eval_programs.pending(eval_host_batches, self.exp.to_mesh,
                                       (self.params(state), frozen))
    compile_all(pending)


class JitTrainStep(_TrainStep):
  """`parallel.mode=jit`: one jitted step; state and batches carry their NamedShardings."""

  def __init__(self, exp, tx, learning_rate, abstract_state: dict,
               cache_prefix: Optional[str] = None, teacher=None, objective: tuple = ()):
    self.exp, self.teacher = exp, teacher
    fn = _step_function(exp, tx, learning_rate, teacher, objective)
    self.state_shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract_state)
    frozen_shardings = exp.frozen_shardings()
    if teacher is not None:
      frozen_shardings = {**frozen_shardings, step_lib.TEACHER_KEY: teacher.shardings}
    in_shardings = (self.state_shardings, frozen_shardings, parallel.batch_sharding(exp.mesh))
    out_shardings = (self.state_shardings, parallel.replicated(exp.mesh))
    self._programs = WidthPrograms(fn, cache_prefix=cache_prefix, in_shardings=in_shardings,
                                   out_shardings=out_shardings, donate_argnums=(0,))

  def place(self, state: dict) -> dict:
    """A fresh or restored state (already laid out by the abstract state's shardings)."""
    return state

  def device_batch(self, host_batch: dict) -> dict:
    return self.exp.to_mesh(host_batch)

  def _step_frozen(self, frozen: dict) -> dict:
    """The frozen parameters as the train step takes them (with the teacher's)."""
    return self._with_teacher(frozen)

  def __call__(self, state: dict, frozen: dict, batch: dict):
    return self._programs(state, self._step_frozen(frozen), batch)

  def savable(self, state: dict) -> dict:
    return state

  def params(self, state: dict) -> dict:
    return state["params"]


class PmapTrainStep(_TrainStep):
  """`parallel.mode=pmap`: the same step under jax.pmap, state replicated on local devices."""

  def __init__(self, exp, tx, learning_rate, abstract_state: dict, teacher=None,
               objective: tuple = ()):
    self.exp, self.teacher = exp, teacher
    fn = _step_function(exp, tx, learning_rate, teacher, objective,
                        reduce_axis=parallel.PMAP_AXIS)
    self.state_shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract_state)
    self._programs = WidthPrograms(fn, transform=jax.pmap, axis_name=parallel.PMAP_AXIS,
                                   in_axes=(0, 0, 0), donate_argnums=(0,))
    self._frozen = None

  def place(self, state: dict) -> dict:
    return parallel.replicate(state)

  def device_batch(self, host_batch: dict) -> dict:
    return parallel.to_pmap_devices(host_batch)

  def _step_frozen(self, frozen: dict) -> dict:
    if self._frozen is None:  # replicated once, then reused by every step
      self._frozen = parallel.replicate(self._with_teacher(frozen))
    return self._frozen

  def __call__(self, state: dict, frozen: dict, batch: dict):
    state, metrics = self._programs(state, self._step_frozen(frozen), batch)
    return state, jax.tree_util.tree_map(lambda m: m[0], metrics)  # identical on every device

  def savable(self, state: dict) -> dict:
    """The first replica as global arrays on the mesh, the layout checkpoints are written in."""
    return _on_mesh(parallel.unreplicate(state), self.state_shardings)

  def params(self, state: dict) -> dict:
    return _on_mesh(parallel.unreplicate(state["params"]), self.state_shardings["params"])


def _on_mesh(host_tree, shardings):
  return jax.tree_util.tree_map(jax.make_array_from_process_local_data, shardings, host_tree)
