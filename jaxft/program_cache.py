"""Compiled train and eval steps kept across runs, so that a repeated run skips tracing too.

JAX's persistent compilation cache skips XLA's compilation, but every run still traces the step
in Python, lowers it, and hashes the lowered module to find the cache entry: ~1.3-2 s per step
function plus ~0.5 s per program (of 7 for SST-2's buckets) on the 2-core CPU, every run. This
cache stores each compiled program (jax.experimental.serialize_executable) under a key made of
everything the trace depends on, and a repeated run loads it directly.

The key (`experiment_key`, then `program_key` per argument shapes) covers the resolved config,
the step's kind and extra inputs (the number of steps, which shapes the learning-rate schedule),
the model folder's config.json and any code in it, the source of jaxft, the versions of the
libraries that build the step, JAX's configuration, XLA_FLAGS and the devices, and every
argument's tree structure, shape, dtype and sharding. What it cannot see: a library edited in
place without a version change; JAX_COMPILATION_CACHE_DIR (or a fresh jax_compilation_cache_dir)
empties both caches. It lives in the JAX cache directory (`jaxft-programs/`), and is used only
where that cache is on, by one process with `jax.jit` steps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import time
import zlib
from typing import Any, Optional

import jax

from jaxft import runtime

VERSION = 2  # bump when the stored format or the key's recipe changes
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "transformers", "numpy", "ml_dtypes")
log = logging.getLogger(__name__)


def directory() -> Optional[str]:
  """`jaxft-programs/` in JAX's persistent cache directory, or None where that cache is off."""
  base = jax.config.jax_compilation_cache_dir
  if not base or not jax.config.jax_enable_compilation_cache or jax.process_count() > 1:
    return None
  return os.path.join(base, "jaxft-programs")


@functools.cache
def _environment() -> str:
  """What the process's programs depend on beyond the experiment: code, libraries, devices."""
  from importlib import metadata
  package = os.path.dirname(os.path.abspath(__file__))
  source = hashlib.sha256()
  for root, dirs, files in os.walk(package):
    dirs.sort()
    for name in sorted(files):
      if name.endswith((".py", ".cc")):  # .cc: jaxft's native kernels (jaxft.native)
        with open(os.path.join(root, name), "rb") as f:
          source.update(name.encode() + b"\0" + f.read())
  versions = {}
  for name in _LIBRARIES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
  return json.dumps({"format": VERSION, "jaxft_source": source.hexdigest(),
                     "versions": versions, "devices": devices,
                     "platform_version": jax.devices()[0].client.platform_version,
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
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


def _path(key: str) -> Optional[str]:
  base = directory()
  return None if base is None else os.path.join(base, f"{key}.bin")


def exists(key: Optional[str]) -> bool:
  path = key and _path(key)
  return bool(path) and os.path.exists(path)


def load(key: str) -> Optional[jax.stages.Compiled]:
  """The stored program, or None when it is missing or cannot be loaded (it is then removed,
  and compiled again)."""
  from jax.experimental import serialize_executable
  path = _path(key)
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
    log.warning("jaxft program cache: %s did not load (%s: %s); compiling", path,
                type(e).__name__, e)
    try:
      os.remove(path)
    except OSError:
      pass
    return None
  runtime.CompileStats.record_load(time.perf_counter() - start)
  return compiled


def compile_program(lowered, key: Optional[str]) -> jax.stages.Compiled:
  """`lowered.compile()`, stored under `key` (when given) if XLA compiled it here.

  A program that JAX loaded from its own cache is not stored: XLA:CPU serialises such a loaded
  executable without some of its kernels, and a later process running it failed with
  "NOT_FOUND: Function wrapped_convert not found" (the next run that compiles it stores it).
  """
  if key is None:
    return lowered.compile()
  compiled, from_jax_cache = runtime.compile_noting_cache_hit(lowered)
  if not from_jax_cache:
    store(key, compiled)
  return compiled


def store(key: str, compiled: jax.stages.Compiled) -> None:
  """Stores `compiled` (compiled by XLA in this process, see compile_program) under `key`,
  atomically: readers see the whole file or none. A program that cannot be serialised, or a
  full disk, only costs the next run a compilation."""
  from jax.experimental import serialize_executable
  path = _path(key)
  if path is None:
    return
  try:
    device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
    data = zlib.compress(pickle.dumps((*serialize_executable.serialize(compiled), device_ids)), 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except Exception as e:  # noqa: BLE001
    log.warning("jaxft program cache: not stored (%s: %s)", type(e).__name__, e)
