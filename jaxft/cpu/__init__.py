"""CPU tuning: what jaxft does only where XLA runs on the host's CPU, in one layer.

- process.py: a jaxft command restarts itself once at start with glibc's huge-page tunable and
  a preloaded cache of XLA's scratch buffers (scratch_buffers.cc), so that a step does not
  fault its scratch memory in afresh (glibc reads both only when a process starts);
- attention.py: a fused attention kernel, an XLA FFI custom call (attention_cpu.cc), which
  `model.attention=auto` picks for CPU programs;
- native.py: compiles that C++ on first use into a directory only this user can write.

When: on a CPU-only host, decided before JAX is imported (`applies`): JAX_PLATFORMS names the
CPU first, or is unset and no accelerator plugin (jax-cuda*, jax-rocm*, libtpu) is installed.
The kernel itself is chosen later, by the platform JAX actually runs on. `JAXFT_CPU_TUNING=0`
turns the whole layer off; so does deleting this folder. jaxft then runs the same programs with
the same values, only slower on CPUs. The measurements are in benchmarks/README.md.

This module and process.py import only the standard library (and jaxft.runtime, which does
too): they run before JAX loads.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional

from jaxft import runtime

SWITCH = "JAXFT_CPU_TUNING"  # "0": the layer is off
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax-rocm", "libtpu", "jax-metal")


def enabled(env: Mapping[str, str] = os.environ) -> bool:
  """Whether the switch leaves the layer on (anything but JAXFT_CPU_TUNING=0)."""
  return env.get(SWITCH, "1").strip() != "0"


def _normalized(name: str) -> str:
  return name.lower().replace("_", "-").replace(".", "-")


def accelerator_plugins(names: Optional[Iterable[str]] = None) -> list[str]:
  """The installed distributions that give JAX a GPU or TPU backend (default: this Python's)."""
  if names is None:
    names = runtime.installed_distributions()
  return sorted({n for n in names if _normalized(n).startswith(_ACCELERATOR_PLUGINS)})


def cpu_only_host(env: Mapping[str, str] = os.environ,
                  plugins: Optional[Iterable[str]] = None) -> bool:
  """Whether JAX will run on the CPU here: JAX_PLATFORMS names cpu first; or it is unset and no
  accelerator plugin is installed (JAX would pick a GPU or TPU first if one is)."""
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms[0] == "cpu"
  return not accelerator_plugins(plugins)


def applies(env: Mapping[str, str] = os.environ) -> bool:
  """Whether this process gets the CPU layer: switched on and on a CPU-only host."""
  return enabled(env) and cpu_only_host(env)
