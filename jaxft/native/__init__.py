"""jaxft's C++ for the CPU: compiled on first use, cached, loaded.

Why: some of a CPU step's time goes where no arrangement of jax.numpy reaches, and there C++
does the work (the README's Speed section has the numbers):
- attention_cpu.cc: the attention core as an XLA FFI kernel (forward and backward), called with
  `jax.ffi.ffi_call` inside the same compiled program as everything else (jaxft.attention);
- scratch_buffers.cc: a library preloaded into jaxft's commands that keeps XLA's per-run
  scratch buffers mapped between steps instead of faulting them in afresh (jaxft.hugepages).

How: the sources ship in this folder. The first process that needs one compiles it with this
machine's C++ compiler (`CXX`, else c++, g++ or clang++) for this CPU (-march=native), in 1-5 s,
into `~/.cache/jaxft/native/` (`JAXFT_NATIVE_DIR` wins) under a name that hashes everything the
binary depends on: the source, the compiler and its flags, jaxlib's version (whose FFI headers
the kernels use) and the CPU, so a home folder shared by machines with different CPUs gets one
build per CPU. Later processes load it. `python -m jaxft.native` builds them all ahead
(launch/setup.sh does). Where there is no compiler or a build fails, the callers keep their
pure-JAX path and say why once; nothing else changes.

This module imports nothing heavy at import time: jaxft.hugepages builds the preload library
before a command has imported JAX.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

_SOURCES = os.path.dirname(os.path.abspath(__file__))
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
_NATIVE_ARCH = "-march=native"
ATTENTION = "attention_cpu"
SCRATCH_BUFFERS = "scratch_buffers"
_FFI = (ATTENTION,)  # sources that include XLA's FFI headers (from jaxlib)


class BuildError(Exception):
  """A library could not be built here (no compiler, or it refused the source)."""


def cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.environ.get("JAXFT_NATIVE_DIR") or os.path.join(base, "jaxft", "native")


def compiler() -> Optional[str]:
  """The C++ compiler to use: `CXX` if set (even if missing: the user asked for it), else the
  first of c++, g++, clang++ on the PATH."""
  if os.environ.get("CXX"):
    return os.environ["CXX"]
  return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _cpu_identity() -> str:
  """What -march=native compiles for: the CPU's model and feature flags."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def _ffi_include_dir() -> str:
  import jax.ffi  # only for the FFI kernels: the preload library is built before JAX loads
  return jax.ffi.include_dir()


def _jaxlib_version() -> str:
  from importlib import metadata
  return metadata.version("jaxlib")


def _library_path(name: str, source: str, command: list[str]) -> str:
  key = hashlib.sha256()
  with open(source, "rb") as f:
    key.update(f.read())
  for part in (*command, _jaxlib_version() if name in _FFI else "", _cpu_identity()):
    key.update(part.encode() + b"\0")
  return os.path.join(cache_dir(), f"{name}-{key.hexdigest()[:16]}.so")


def _first_error(stderr: str) -> str:
  """The compiler's first error line (GCC and Clang write "error:"), else its last line."""
  lines = [l.strip() for l in stderr.splitlines() if l.strip()]
  return next((l for l in lines if "error" in l), lines[-1] if lines else "")


def build(name: str) -> str:
  """The path of library `name` (jaxft/native/<name>.cc) compiled for this machine, building
  it if it is not cached; BuildError says why it cannot be."""
  source = os.path.join(_SOURCES, f"{name}.cc")
  cxx = compiler()
  if cxx is None:
    raise BuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
  includes = ["-I", _ffi_include_dir()] if name in _FFI else []
  errors = []
  # -march=native where the compiler knows it (GCC, Clang on x86 and ARM), else generic code.
  for arch in ((_NATIVE_ARCH,), ()):
    flags = [cxx, *_FLAGS, *arch]
    path = _library_path(name, source, flags)
    if os.path.exists(path):
      return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written beside its final name, then renamed: processes building at once never load a
    # half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=os.path.dirname(path))
    os.close(fd)
    try:
      run = subprocess.run([*flags, *includes, source, "-o", partial], capture_output=True,
                           text=True, env=_without_our_preload(os.environ))
    except OSError as e:
      os.unlink(partial)
      raise BuildError(f"cannot run the C++ compiler {cxx!r}: {e}") from None
    if run.returncode == 0:
      os.replace(partial, path)
      return path
    os.unlink(partial)
    errors.append(_first_error(run.stderr) or f"exit status {run.returncode}")
  raise BuildError(f"{cxx} failed to compile {source}: {errors[-1]}")


def _preload_list(env) -> list[str]:
  return [p for p in env.get("LD_PRELOAD", "").split(":") if p]


def _is_scratch_buffers(path: str) -> bool:
  """Whether `path` is a build of the scratch-buffer library (any key: see _library_path)."""
  return os.path.basename(path).startswith(SCRATCH_BUFFERS + "-")


def scratch_buffers_preloaded(env) -> bool:
  """Whether `env`'s LD_PRELOAD holds the scratch-buffer library."""
  return any(_is_scratch_buffers(p) for p in _preload_list(env))


def _without_our_preload(env) -> dict:
  """`env` without jaxft's preload library: a compiler needs none of it."""
  out = dict(env)
  kept = [p for p in _preload_list(out) if not _is_scratch_buffers(p)]
  if kept:
    out["LD_PRELOAD"] = ":".join(kept)
  else:
    out.pop("LD_PRELOAD", None)
  return out


# ---- the attention kernel ----------------------------------------------------------------------
_ATTENTION_TARGETS = ("jaxft_attention_cpu_forward", "jaxft_attention_cpu_backward")


@functools.cache
def _register_attention() -> Optional[BuildError]:
  try:
    library = ctypes.cdll.LoadLibrary(build(ATTENTION))
  except BuildError as e:
    return e
  import jax.ffi
  for target, symbol in zip(_ATTENTION_TARGETS,
                            ("JaxftAttentionForward", "JaxftAttentionBackward")):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  _loaded.append(library)
  return None


_loaded = []  # libraries whose handlers XLA holds: kept alive for the process


def attention_targets() -> tuple[str, str]:
  """The FFI target names of the fused attention (forward, backward), registered with XLA for
  the CPU, once per process; BuildError where the kernel cannot be built (remembered, so a
  process tries once)."""
  error = _register_attention()
  if error is not None:
    raise error
  return _ATTENTION_TARGETS


def registered_targets() -> tuple[str, ...]:
  """The FFI targets of jaxft's kernels registered in this process so far."""
  registered = _register_attention.cache_info().currsize and _register_attention() is None
  return _ATTENTION_TARGETS if registered else ()


def main() -> None:
  """`python -m jaxft.native`: builds every library for this machine and says where it is."""
  status = 0
  for source in sorted(os.listdir(_SOURCES)):
    if source.endswith(".cc"):
      name = source[:-3]
      try:
        print(f"{name}: {build(name)}")
      except BuildError as e:
        print(f"{name}: not built: {e}", file=sys.stderr)
        status = 1
  sys.exit(status)
