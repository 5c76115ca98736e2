"""Transparent huge pages for XLA's per-step scratch buffer (Linux with glibc).

Why: XLA's CPU runtime gives each run of a program one temporary buffer that holds all of its
intermediate values (1.8 GB for a MiniLM train step at 32 x 128 tokens). It comes from malloc,
and glibc serves a block that large with a fresh mmap and returns it with munmap, every step:
the kernel then faults in and zeroes 450,000 pages of 4 KB per step. On this project's 2-core
machine that was 1.1 s of kernel time in a 3.1 s step. glibc's tunable `glibc.malloc.hugetlb=1`
makes malloc ask for transparent huge pages on such mappings (madvise), so the same buffer
arrives in ~900 faults of 2 MB: the step took 2.4-2.5 s (tests/test_hugepages.py checks the
fault counts; the README's Speed section has the step times).

glibc reads tunables only when a process starts, so jaxft's entry points (`python -m jaxft.*`,
the `jaxft-*` scripts) start themselves again, once, with the tunable added, before anything
else is imported. Importing jaxft as a library never does. Nothing happens where it cannot help:
no glibc 2.35+, or transparent huge pages set to `never` (nothing to ask for) or `always`
(already on). `JAXFT_HUGEPAGES=0` leaves the process as it is.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXFT_HUGEPAGES"  # "0": no restart, no tunable
_BEFORE = "JAXFT_GLIBC_TUNABLES_BEFORE"  # the user's own GLIBC_TUNABLES, for baseline_env
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


def restart_entry_point_with_hugepages() -> None:
  """Replaces this process by the same command with the tunable set (see the module doc)."""
  argv = getattr(sys, "orig_argv", None)
  if not argv or not is_entry_point(argv):
    return
  value = tunables_with_hugepages(os.environ, thp_mode(), glibc_version())
  if value is None:
    return
  env = {**os.environ, "GLIBC_TUNABLES": value,
         _BEFORE: os.environ.get("GLIBC_TUNABLES", "")}
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def baseline_env(env: Mapping[str, str]) -> dict:
  """`env` as a user's own process would have it: without the tunable jaxft added, and with
  the opt-out set so that a `python -m jaxft.*` child does not add it again. The benchmark runs
  its baselines (plain jit, PyTorch) with it."""
  out = {k: v for k, v in env.items() if k != _BEFORE}
  if _BEFORE in env:
    if env[_BEFORE]:
      out["GLIBC_TUNABLES"] = env[_BEFORE]
    else:
      out.pop("GLIBC_TUNABLES", None)
  out[OPT_OUT] = "0"
  return out


def faults_per_gigabyte(megabytes: int = 256) -> float:
  """Minor page faults per GB for writing a fresh malloc block (ctypes, so that no library's
  own huge-page advice, such as NumPy's, is measured instead of malloc's)."""
  import ctypes
  import resource
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  size = megabytes << 20
  faults = []
  for _ in range(2):  # twice, as a step reuses the size: glibc maps and unmaps it each time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
  return max(faults) * 1024 / megabytes


def main() -> None:
  """`python -m jaxft.hugepages`: one JSON line saying what this machine does (an entry point,
  so it has restarted itself with the tunable where that helps)."""
  import json
  print(json.dumps({"thp": thp_mode(), "glibc": glibc_version(),
                    "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
                    "faults_per_gb": faults_per_gigabyte()}))


if __name__ == "__main__":
  restart_entry_point_with_hugepages()
  main()
