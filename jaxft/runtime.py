"""Process-wide set-up shared by the entry points: compilation cache, logging, flag parsing."""

from __future__ import annotations

import logging
import os
import sys

import jax

from jaxft.errors import report_and_exit, UserError


def default_compilation_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxft", "xla")


def configure_jax() -> None:
  """Turns on the persistent compilation cache, so a repeated run skips compiling.

  JAX_COMPILATION_CACHE_DIR, when set, wins (JAX reads it itself).
  """
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", default_compilation_cache_dir())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  for name in ("absl", "orbax", "jax._src.xla_bridge", "jax._src.compilation_cache"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors (unknown --config key, bad value) are one line, exit 2."""
  from absl import flags
  debug = any(a in ("--debug", "--debug=true", "--debug=True") for a in argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    report_and_exit(UserError(f"{e}; see --help for the flags"), debug)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # config_flags raises these for an unknown key or a value of the wrong type.
    report_and_exit(UserError(f"bad --config override: {e}"), debug)
