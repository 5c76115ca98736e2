"""XLA's per-step scratch buffer on Linux with glibc: huge pages, and kept mapped between steps.

Why: XLA's CPU runtime gives each run of a program one temporary buffer that holds all of its
intermediate values (1.45 GB for a MiniLM train step at 32 x 128 tokens). It comes from
posix_memalign, and glibc serves a block that large with a fresh mmap and returns it with
munmap, every step: the kernel then faults in and zeroes 450,000 pages of 4 KB per step. On
this project's 2-core machine that was 1.1 s of kernel time in a 3.1 s step. Two remedies, both
set up when a jaxft command starts:
- glibc's tunable `glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages on such
  mappings (madvise), so the buffer arrives in ~900 faults of 2 MB: the step took 2.4-2.5 s.
  But each step still zeroes the buffer afresh (0.1-0.2 s), and when the kernel has no free
  huge pages left it compacts memory first: 1.2-3.4 s of kernel time in one step of every 2 to
  6 on the same machine.
- jaxft/native/scratch_buffers.cc, preloaded (LD_PRELOAD), keeps such blocks mapped between
  runs, so a step reuses the last step's pages with no fault at all: a MiniLM step at 32 x 128
  then takes 1.8-1.9 s, and no step stalls. What it keeps is bounded by what the process had in
  use at once, and by a quarter of physical memory (the source says how).
(tests/test_hugepages.py checks the fault counts; the README's Speed section has the times.)

glibc reads tunables and the preload list only when a process starts, so jaxft's entry points
(`python -m jaxft.*`, the `jaxft-*` scripts) start themselves again, once, with both added,
before anything else is imported; the library is compiled once per machine (jaxft.native), in
about a second. Importing jaxft as a library never does any of this. Nothing is added where it
cannot help: no glibc, or no C++ compiler for the library; the tunable needs glibc 2.35+ and
transparent huge pages on `madvise` (`always`: already on; `never`: nothing to ask for).
`JAXFT_HUGEPAGES=0` leaves the process as it is.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

from jaxft import native  # standard library only: no JAX before the restart

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXFT_HUGEPAGES"  # "0": no restart, no tunable, no preload
_BEFORE = "JAXFT_GLIBC_TUNABLES_BEFORE"  # the user's own GLIBC_TUNABLES, for baseline_env
_PRELOAD_BEFORE = "JAXFT_LD_PRELOAD_BEFORE"  # the user's own LD_PRELOAD, for baseline_env
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = _THP_ENABLED) -> Optional[str]:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> Optional[tuple[int, int]]:
  """(major, minor) of the C library if it is glibc, else None (musl, macOS, Windows)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):
    return None


def tunables_with_hugepages(env: Mapping[str, str], thp: Optional[str],
                            glibc: Optional[tuple[int, int]]) -> Optional[str]:
  """The GLIBC_TUNABLES value to restart with, or None when a restart would change nothing."""
  if env.get(OPT_OUT) == "0" or thp != "madvise" or glibc is None or glibc < (2, 35):
    return None
  existing = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in existing:  # already set, by a restart or by the user
    return None
  return f"{existing}:{TUNABLE}" if existing else TUNABLE


def is_entry_point(argv: Sequence[str]) -> bool:
  """Whether the interpreter's command line runs jaxft: `python [opts] -m jaxft.X ...` or a
  `jaxft-*` console script."""
  if "-m" in argv[1:]:
    index = list(argv).index("-m", 1)
    return index + 1 < len(argv) and argv[index + 1].startswith("jaxft.")
  return len(argv) > 1 and os.path.basename(argv[1]).startswith("jaxft-")


def preload_with_scratch_buffers(env: Mapping[str, str], glibc: Optional[tuple[int, int]],
                                 library: Optional[str]) -> Optional[str]:
  """The LD_PRELOAD value to restart with (`library` added), or None when a restart would
  change nothing: opted out, not glibc (the library calls glibc's own allocator), no library,
  or it is preloaded already."""
  if (env.get(OPT_OUT) == "0" or glibc is None or library is None
      or native.scratch_buffers_preloaded(env)):
    return None
  return ":".join([p for p in env.get("LD_PRELOAD", "").split(":") if p] + [library])


def scratch_buffer_library() -> Optional[str]:
  """The preload library (jaxft/native/scratch_buffers.cc) built for this machine, or None
  where it cannot be built (`python -m jaxft.hugepages` says why)."""
  try:
    return native.build(native.SCRATCH_BUFFERS)
  except native.BuildError:
    return None


def restart_entry_point_with_hugepages() -> None:
  """Replaces this process by the same command with the tunable and the preload library set
  (see the module doc)."""
  argv = getattr(sys, "orig_argv", None)
  if not argv or not is_entry_point(argv) or os.environ.get(OPT_OUT) == "0":
    return
  glibc = glibc_version()
  tunables = tunables_with_hugepages(os.environ, thp_mode(), glibc)
  preload = None
  if glibc is not None and not native.scratch_buffers_preloaded(os.environ):  # else no build
    preload = preload_with_scratch_buffers(os.environ, glibc, scratch_buffer_library())
  if tunables is None and preload is None:
    return
  env = dict(os.environ)
  if tunables is not None:
    env.update({"GLIBC_TUNABLES": tunables, _BEFORE: os.environ.get("GLIBC_TUNABLES", "")})
  if preload is not None:
    env.update({"LD_PRELOAD": preload, _PRELOAD_BEFORE: os.environ.get("LD_PRELOAD", "")})
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def baseline_env(env: Mapping[str, str]) -> dict:
  """`env` as a user's own process would have it: without the tunable and the preload that
  jaxft added, and with the opt-out set so that a `python -m jaxft.*` child does not add them
  again. The benchmark runs its baselines (plain jit, PyTorch) with it."""
  out = {k: v for k, v in env.items() if k not in (_BEFORE, _PRELOAD_BEFORE)}
  for name, before in (("GLIBC_TUNABLES", _BEFORE), ("LD_PRELOAD", _PRELOAD_BEFORE)):
    if before in env:
      if env[before]:
        out[name] = env[before]
      else:
        out.pop(name, None)
  out[OPT_OUT] = "0"
  return out


def faults_per_gigabyte(megabytes: int = 256) -> dict:
  """Minor page faults per GB for writing a fresh block, and for writing one again after
  freeing the first, as a step does with its scratch buffer: from malloc, and from
  posix_memalign (what XLA uses, and what the preload library keeps). ctypes, so that no
  library's own huge-page advice, such as NumPy's, is measured instead of malloc's."""
  import ctypes
  import resource
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = [ctypes.c_size_t]
  libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                                  ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  size = megabytes << 20

  def aligned(n):
    out = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(out), 64, n) == 0
    return out.value

  result = {}
  for name, allocate in (("malloc", libc.malloc), ("posix_memalign", aligned)):
    faults = []
    for _ in range(2):  # twice, as a step reuses the size
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = allocate(size)
      ctypes.memset(block, 1, size)
      faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 1024
                    / megabytes)
      libc.free(block)
    result[name] = {"first": faults[0], "again": faults[1]}
  return result


def main() -> None:
  """`python -m jaxft.hugepages`: one JSON line saying what this machine does (an entry point,
  so it has restarted itself with the tunable and the library where they help)."""
  import json
  try:
    library = native.build(native.SCRATCH_BUFFERS)
  except native.BuildError as e:
    library = f"not built: {e}"
  print(json.dumps({"thp": thp_mode(), "glibc": glibc_version(),
                    "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
                    "LD_PRELOAD": os.environ.get("LD_PRELOAD"), "library": library,
                    "faults_per_gb": faults_per_gigabyte()}))


if __name__ == "__main__":
  restart_entry_point_with_hugepages()
  main()
