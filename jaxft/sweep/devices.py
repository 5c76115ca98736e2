"""Where each sweep worker runs: its share of this host's CPU cores (CPU-only hosts, through
the CPU layer) or of its GPUs. Imports neither JAX nor Optuna: it runs before JAX loads."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Mapping, Optional

from jaxft import runtime

CORES = "JAXFT_SWEEP_CPUS"  # comma-separated cores a worker pins itself to before JAX loads


def visible_gpus(env: Mapping[str, str]) -> Optional[list[str]]:
  """The NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES, else nvidia-smi's list), or
  None where there are none or they cannot be told."""
  listed = env.get("CUDA_VISIBLE_DEVICES")
  if listed is not None:
    return [d.strip() for d in listed.split(",") if d.strip()] or None
  if shutil.which("nvidia-smi") is None:
    return None
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")] or None


def share_of(items: list, index: int, workers: int) -> list:
  """Worker `index`'s contiguous, near-equal share of `items` (cores, GPUs); one item each,
  round-robin, when there are more workers than items."""
  if workers >= len(items):
    return [items[index % len(items)]]
  share, extra = divmod(len(items), workers)
  start = index * share + min(index, extra)
  return items[start:start + share + (1 if index < extra else 0)]


def worker_environment(index: int, workers: int, env: Mapping[str, str],
                       cores: Optional[list[int]] = None,
                       gpus: Optional[list[str]] = None) -> dict[str, str]:
  """The environment of worker `index` of `workers`: `env` plus its devices. With GPUs
  (`gpus`), its CUDA_VISIBLE_DEVICES. On a CPU-only host where the CPU layer is on, its cores
  (`cores`: this process's), which it pins itself to: XLA sizes its thread pool by the cores a
  process may use, so each worker's steps run on their own cores instead of all workers
  contending for all of them. JAXFT_LOCAL_PROCESSES tells each worker how many share the host
  (the CPU layer's memory caps)."""
  out = dict(env)
  out["JAXFT_LOCAL_PROCESSES"] = str(workers)
  if gpus:
    out["CUDA_VISIBLE_DEVICES"] = ",".join(share_of(gpus, index, workers))
  elif cores and runtime.cpu_layer() is not None:
    out[CORES] = ",".join(str(c) for c in share_of(cores, index, workers))
  return out


def worker_environments(workers: int) -> list[dict[str, str]]:
  """worker_environment for each of this host's `workers`."""
  from jaxft import cpu
  from jaxft.errors import fail
  if workers > 1 and any("tpu" in p for p in cpu.accelerator_plugins()):
    fail(f"--workers={workers}: a TPU host's chips serve one process; run one worker per host "
         "(--workers=1 on each host, all sharing the sweep's --workdir)")
  gpus = None if cpu.cpu_only_host() else visible_gpus(os.environ)
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return [worker_environment(i, workers, os.environ, cores, gpus) for i in range(workers)]


def pin_this_worker() -> None:
  """Pins this process to the cores its environment names (before JAX sizes its threads)."""
  cores = os.environ.get(CORES)
  if cores and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {int(c) for c in cores.split(",")})


def stop_with_parent() -> None:
  """Linux: SIGTERM to this process when the process that started it dies (even by SIGKILL),
  so that a worker saves its trial and stops instead of running on unwatched."""
  import ctypes
  import signal
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # not Linux
    return
  if os.getppid() == 1:  # the parent died before the setting took effect
    os.kill(os.getpid(), signal.SIGTERM)
