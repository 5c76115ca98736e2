"""The CPU layer's C++: compiled on first use for this machine, cached, loaded.

The sources ship beside this file. The first process that needs one compiles it with this
machine's C++ compiler (`CXX`, else c++, g++ or clang++) for this CPU (-march=native) into
`~/.cache/jaxft/native/` (`JAXFT_NATIVE_DIR` wins), under a name that hashes everything the
binary depends on (source, compiler and flags, jaxlib's version for the FFI headers, the CPU),
so a home folder shared by machines with different CPUs gets one build per CPU.

A library is code every jaxft process runs, so it is built and loaded only from a directory
that this user owns and that nobody else can write (jaxft.runtime.private_directory); anything
else is refused with a one-line warning, and the caller runs without it.

Imports only the standard library: process.py builds the preload library before JAX loads.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from jaxft import runtime

_SOURCES = os.path.dirname(os.path.abspath(__file__))
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
_NATIVE_ARCH = "-march=native"
ATTENTION = "attention_cpu"
SCRATCH_BUFFERS = "scratch_buffers"
LIBRARIES = (ATTENTION, SCRATCH_BUFFERS)
_FFI = (ATTENTION,)  # sources that include XLA's FFI headers (from jaxlib)


class BuildError(Exception):
  """A library cannot be built or loaded here; the message says why."""


def cache_dir() -> str:
  return os.environ.get("JAXFT_NATIVE_DIR") or os.path.join(runtime.cache_root(), "native")


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


def _library_path(directory: str, name: str, source: str, command: list[str]) -> str:
  key = hashlib.sha256()
  with open(source, "rb") as f:
    key.update(f.read())
  for part in (*command, _jaxlib_version() if name in _FFI else "", _cpu_identity()):
    key.update(part.encode() + b"\0")
  return os.path.join(directory, f"{name}-{key.hexdigest()[:16]}.so")


def is_ours(path: str) -> bool:
  """Whether `path` names a build of one of these libraries (any key)."""
  return any(os.path.basename(path).startswith(name + "-") for name in LIBRARIES)


def _first_error(stderr: str) -> str:
  """The compiler's first error line (GCC and Clang write "error:"), else its last line."""
  lines = [l.strip() for l in stderr.splitlines() if l.strip()]
  return next((l for l in lines if "error" in l), lines[-1] if lines else "")


def build(name: str) -> str:
  """The path of library `name` (<name>.cc beside this file) compiled for this machine,
  building it if it is not cached; BuildError says why it cannot be."""
  source = os.path.join(_SOURCES, f"{name}.cc")
  cxx = compiler()
  if cxx is None:
    raise BuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
  directory = runtime.private_directory(cache_dir(), "JAXFT_NATIVE_DIR")
  if directory is None:
    raise BuildError(f"its cache directory {cache_dir()} is not private to this user")
  includes = ["-I", _ffi_include_dir()] if name in _FFI else []
  errors = []
  # -march=native where the compiler knows it (GCC, Clang on x86 and ARM), else generic code.
  for arch in ((_NATIVE_ARCH,), ()):
    flags = [cxx, *_FLAGS, *arch]
    path = _library_path(directory, name, source, flags)
    if os.path.exists(path):
      if not runtime.private_file(path):
        raise BuildError(f"{path} is not owned by this user or is writable by others")
      return path
    # Written beside its final name, then renamed: processes building at once never load a
    # half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=directory)
    os.close(fd)
    try:
      run = subprocess.run([*flags, *includes, source, "-o", partial], capture_output=True,
                           text=True, env=_without_preloads(os.environ))
    except OSError as e:
      os.unlink(partial)
      raise BuildError(f"cannot run the C++ compiler {cxx!r}: {e}") from None
    if run.returncode == 0:
      os.chmod(partial, 0o700)
      os.replace(partial, path)
      return path
    os.unlink(partial)
    errors.append(_first_error(run.stderr) or f"exit status {run.returncode}")
  raise BuildError(f"{cxx} failed to compile {source}: {errors[-1]}")


def _without_preloads(env) -> dict:
  """`env` without any of these libraries preloaded: a compiler needs none of them."""
  out = dict(env)
  kept = [p for p in out.get("LD_PRELOAD", "").split(":") if p and not is_ours(p)]
  if kept:
    out["LD_PRELOAD"] = ":".join(kept)
  else:
    out.pop("LD_PRELOAD", None)
  return out


def build_all() -> int:
  """Builds every library, printing where each is or why it is not; the number not built."""
  failed = 0
  for name in LIBRARIES:
    try:
      print(f"{name}: {build(name)}")
    except BuildError as e:
      print(f"{name}: not built: {e}", file=sys.stderr)
      failed += 1
  return failed
