"""A jaxft command on a CPU host restarts itself once, with XLA's scratch buffer kept in huge pages.

Why: XLA's CPU runtime gives every run of a program one scratch buffer for all its intermediate
values (over a gigabyte for a MiniLM train step at 32 x 128), from posix_memalign; glibc maps a
block that large afresh and unmaps it when freed, so the kernel faults it in and zeroes it in
4 KB pages every step. Two remedies, which glibc reads only when a process starts:
- the tunable `glibc.malloc.hugetlb=1` asks for transparent huge pages on such mappings;
- scratch_buffers.cc, preloaded (LD_PRELOAD), keeps those blocks mapped between steps, so a step
  reuses the last step's pages; what it keeps is capped (`scratch_cache_limit`).

So a command's start (jaxft.runtime.start_process) calls `restart_once` before JAX loads: the
process replaces itself by the same command line with both set. The restarted process then
gives the environment back as the user had it, so that its children (compilers, gcloud, a
user's subprocess) inherit neither. Nothing is added where it cannot help: no glibc, no C++
compiler for the library, or glibc older than 2.35 / transparent huge pages not on `madvise`
for the tunable.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping, Optional

from jaxft.cpu import native

TUNABLE = "glibc.malloc.hugetlb=1"
_RESTARTED = "JAXFT_CPU_RESTARTED"  # the user's own GLIBC_TUNABLES and LD_PRELOAD, as JSON
CACHE_LIMIT = "JAXFT_SCRATCH_CACHE_BYTES"  # read by scratch_buffers.cc when it loads
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_PRESERVED = ("GLIBC_TUNABLES", "LD_PRELOAD")

# What this process was started with by `restart_once` (GLIBC_TUNABLES, LD_PRELOAD, the cache
# limit), before the environment was given back; {} where it did not restart.
started_with: dict = {}


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
  """The GLIBC_TUNABLES value to restart with, or None when it would change nothing."""
  if thp != "madvise" or glibc is None or glibc < (2, 35):
    return None
  existing = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in existing:  # the user chose a value of their own
    return None
  return f"{existing}:{TUNABLE}" if existing else TUNABLE


def preload_with(env: Mapping[str, str], library: Optional[str]) -> Optional[str]:
  """The LD_PRELOAD value with `library` added, or None without a library."""
  if library is None:
    return None
  return ":".join([p for p in env.get("LD_PRELOAD", "").split(":") if p] + [library])


# ---- how much the scratch-buffer cache may keep --------------------------------------------
def cgroup_memory_limit(root: str = "/sys/fs/cgroup",
                        membership: str = "/proc/self/cgroup") -> Optional[int]:
  """The lowest memory limit (bytes) of this process's cgroup and its ancestors, v2 or v1;
  None where there is none."""
  try:
    with open(membership) as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  candidates = []
  for line in lines:
    _, controllers, path = line.split(":", 2)
    if controllers == "":  # cgroup v2
      candidates += [os.path.join(root, p, "memory.max") for p in _ancestors(path)]
    elif "memory" in controllers.split(","):  # cgroup v1
      candidates += [os.path.join(root, "memory", p, "memory.limit_in_bytes")
                     for p in _ancestors(path)]
  limits = []
  for candidate in candidates:
    try:
      with open(candidate) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit() and int(text) < 1 << 60:  # "max" (v2) and ~2**63 (v1) mean none
      limits.append(int(text))
  return min(limits) if limits else None


def _ancestors(path: str) -> list[str]:
  """"/a/b" -> ["a/b", "a", ""]: a cgroup and every cgroup above it."""
  parts = [p for p in path.split("/") if p]
  return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def processes_on_this_host(env: Mapping[str, str]) -> int:
  """How many jaxft processes share this host, from the launcher's environment (default 1)."""
  for name in ("JAXFT_LOCAL_PROCESSES", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE"):
    digits = env.get(name, "").split("(")[0]  # SLURM writes "8" or "8(x2)"
    if digits.isdigit() and int(digits) > 0:
      return int(digits)
  return 1


def scratch_cache_limit(physical: int, cgroup: Optional[int], processes: int) -> int:
  """Bytes the scratch-buffer cache of one process may keep: a quarter of the memory the
  process may use (its cgroup's limit where that is lower than the host's), shared by the
  jaxft processes of the host."""
  memory = min(physical, cgroup) if cgroup else physical
  return memory // 4 // max(1, processes)


def _physical_memory() -> int:
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---- the restart ---------------------------------------------------------------------------
def restart_once() -> None:
  """Replaces this process by the same command line with the tunable and the preload set; in
  the restarted process, gives the environment back as the user had it."""
  if _RESTARTED in os.environ:
    _give_back_environment()
    return
  glibc = glibc_version()
  if glibc is None:
    return
  tunables = tunables_with_hugepages(os.environ, thp_mode(), glibc)
  try:
    library = native.build(native.SCRATCH_BUFFERS)
  except native.BuildError:
    library = None  # `python -m jaxft.cpu` says why
  preload = preload_with(os.environ, library)
  if tunables is None and preload is None:
    return
  env = dict(os.environ)
  env[_RESTARTED] = json.dumps({name: os.environ.get(name) for name in _PRESERVED})
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  if preload is not None:
    env["LD_PRELOAD"] = preload
    env[CACHE_LIMIT] = str(scratch_cache_limit(_physical_memory(), cgroup_memory_limit(),
                                               processes_on_this_host(os.environ)))
  argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def _give_back_environment() -> None:
  before = json.loads(os.environ.pop(_RESTARTED))
  started_with.update({name: os.environ.get(name) for name in (*_PRESERVED, CACHE_LIMIT)})
  os.environ.pop(CACHE_LIMIT, None)
  for name in _PRESERVED:
    if before.get(name) is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = before[name]


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


def loaded_libraries() -> list[str]:
  """The shared objects mapped into this process that are jaxft's (jaxft.cpu.native)."""
  try:
    with open("/proc/self/maps") as f:
      paths = {line.split()[-1] for line in f if line.rstrip().endswith(".so")}
  except OSError:
    return []
  return sorted(p for p in paths if native.is_ours(p))
