"""Process-wide set-up shared by the entry points: compilation cache, logging, flag parsing."""

from __future__ import annotations

import logging
import os
import sys
import threading

import jax

from jaxft.errors import report_and_exit, UserError


def default_compilation_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxft", "xla")


class CompileStats:
  """XLA compilations in this process, counted through jax.monitoring.

  `programs`/`seconds`: every program handed to XLA and the time it took, loads from JAX's
  persistent cache and from jaxft's program cache (jaxft.program_cache) included (`cache_hits`
  of them). Training logs these cumulatively, so a new shape compiled mid-run shows up as a
  jump (tests/test_train.py checks that none do after epoch 1).
  """
  programs = 0
  seconds = 0.0
  cache_hits = 0

  @classmethod
  def record_load(cls, seconds: float) -> None:
    """A program loaded from jaxft's program cache (JAX reports its own cache's loads)."""
    cls.programs += 1
    cls.cache_hits += 1
    cls.seconds += seconds

  @classmethod
  def snapshot(cls) -> dict:
    return {"compiles": cls.programs, "compile_seconds": cls.seconds,
            "compile_cache_hits": cls.cache_hits}


def _count_compile(event: str, duration: float, **_) -> None:
  if event == "/jax/core/compile/backend_compile_duration":
    CompileStats.programs += 1
    CompileStats.seconds += duration


_thread = threading.local()  # .jax_cache_hit: this thread's compile was a JAX cache load


def _count_cache_hit(event: str, **_) -> None:
  if event == "/jax/compilation_cache/cache_hits":
    CompileStats.cache_hits += 1
    _thread.jax_cache_hit = True  # JAX records the event in the thread that compiles


_listening = False


def count_compilations() -> None:
  global _listening
  if not _listening:
    jax.monitoring.register_event_duration_secs_listener(_count_compile)
    jax.monitoring.register_event_listener(_count_cache_hit)
    _listening = True


def compile_noting_cache_hit(lowered) -> tuple:
  """(`lowered.compile()`, whether JAX loaded it from its persistent cache instead)."""
  count_compilations()
  _thread.jax_cache_hit = False
  compiled = lowered.compile()
  return compiled, _thread.jax_cache_hit


def configure_jax() -> None:
  """Turns on the persistent compilation cache, so a repeated run skips compiling, and counts
  compilations (CompileStats).

  JAX_COMPILATION_CACHE_DIR, when set, wins (JAX reads it itself).
  """
  count_compilations()
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", default_compilation_cache_dir())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  for name in ("jax._src.xla_bridge", "jax._src.compilation_cache"):
    logging.getLogger(name).setLevel(logging.WARNING)
  # Orbax logs the error of a failed background save with a traceback, then raises it where
  # jaxft waits for the save, which reports it in one line: the log would only duplicate it.
  quiet = logging.WARNING if _debug else logging.CRITICAL
  for name in ("absl", "orbax"):
    logging.getLogger(name).setLevel(quiet)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR if _debug else absl_logging.FATAL)


_debug = False  # --debug given: library logs are shown too


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors (unknown --config key, bad value) are one line, exit 2."""
  from absl import flags
  global _debug
  debug = _debug = any(a in ("--debug", "--debug=true", "--debug=True") for a in argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    report_and_exit(UserError(f"{e}; see --help for the flags"), debug)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # config_flags raises these for an unknown key or a value of the wrong type.
    report_and_exit(UserError(f"bad --config override: {_unquote(e)}"), debug)
  except SyntaxError as e:
    report_and_exit(UserError(f"the --config file {e.filename} has a syntax error on line "
                              f"{e.lineno}: {e.msg}"), debug)
  except Exception as e:  # anything else raised while loading the config file
    report_and_exit(UserError(f"cannot load the --config file: {type(e).__name__}: {e}"), debug)


def _unquote(error: Exception) -> str:
  """KeyError messages arrive repr-quoted, sometimes twice; show the plain text."""
  import ast
  text = str(error.args[0]) if error.args else str(error)
  for _ in range(3):
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      try:
        text = ast.literal_eval(text)
        continue
      except (ValueError, SyntaxError):
        pass
    break
  return text


def run_main(body, required: tuple = (), example: str = "--workdir=DIR",
             uses_torch: bool = False) -> None:
  """Runs an entry point: parses the flags (defined by the caller beforehand), checks that the
  `required` flags (names) are set, then calls `body()`; a user error anywhere is one line and
  exit status 2."""
  from absl import app, flags
  from jaxft.errors import fail, run_cli
  # jaxft never needs PyTorch (safetensors convert without it), but transformers imports it
  # whenever it is installed: ~3 s of every command's start. USE_TORCH, when set, wins.
  if not uses_torch:
    os.environ.setdefault("USE_TORCH", "0")
  # --debug is filed under the calling entry point's module (absl's name for it), so that its
  # --help lists it with the entry point's own flags.
  caller = sys._getframe(1).f_globals["__name__"]
  module = sys.argv[0] if caller == "__main__" else caller
  flags.DEFINE_bool("debug", False, "Show tracebacks for user errors.", module_name=module)
  if module != sys.argv[0]:  # a console script (jaxft-train): its --help shows sys.argv[0]'s
    for flag in flags.FLAGS.get_key_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

  def main(argv) -> None:
    def checked_body():
      if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags look like {example}")
      missing = [f"--{name}" for name in required if not flags.FLAGS[name].value]
      if missing:
        fail(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required; see "
             "--help")
      body()

    run_cli(checked_body, flags.FLAGS["debug"].value)

  app.run(main, flags_parser=parse_flags_or_exit)


def loaded_config(config_flag):
  """The ConfigDict of a `--config` flag; a missing or broken config file is a user error.

  config_flags loads the file lazily and reports a failure only on first use.
  """
  config = config_flag.value
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/sst2_minilm.py")
  try:
    config.keys()
  except OSError as e:
    first = str(e).split("\n")
    reason = " ".join(line.strip() for line in first if "Errno" in line) or first[0]
    raise UserError(f"cannot load the --config file: {reason}; pass a configs/*.py file") from e
  return config
