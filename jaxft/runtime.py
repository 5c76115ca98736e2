"""Process-wide set-up shared by the entry points: start-up, private caches, JAX's settings,
logging, flag parsing.

Nothing here imports JAX at module level: `start_process` runs before JAX loads.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import stat
import sys
from typing import Callable, Optional

from jaxft.errors import report_and_exit, UserError


# ---- start-up ------------------------------------------------------------------------------
def cpu_layer():
  """jaxft.cpu where it is installed and applies to this process (a CPU-only host, not
  switched off with JAXFT_CPU_TUNING=0), else None."""
  try:
    from jaxft import cpu
  except ImportError:  # the layer's folder was removed: jaxft runs without it
    return None
  return cpu if cpu.applies() else None


def start_process() -> None:
  """What a jaxft command does first, before JAX loads. On a CPU-only host the process restarts
  once with the CPU layer's allocator settings (jaxft.cpu.process); elsewhere, nothing."""
  cpu = cpu_layer()
  if cpu is not None:
    from jaxft.cpu import process
    process.restart_once()


def _command(module: str) -> Callable[[], None]:
  def main() -> None:
    start_process()
    importlib.import_module(f"jaxft.{module}").run()
  main.__name__ = main.__qualname__ = f"{module}_command"
  return main


# Console scripts that run steps (pyproject.toml): start-up first, then the entry point,
# which imports JAX. jaxft-export and jaxft-report run no steps and start as they are.
train_command = _command("train")
evaluate_command = _command("evaluate")
predict_command = _command("predict")


def installed_distributions() -> dict[str, str]:
  """{name: version} of the distributions installed on sys.path, read from the names of their
  metadata folders alone (importlib.metadata parses every METADATA file: a tenth of a second,
  at every start of a command). Names as the folders spell them (jax_cuda12_plugin)."""
  found = {}
  for entry in sys.path:
    try:
      names = os.listdir(entry or ".")
    except OSError:  # a zip file, or a path that does not exist
      continue
    for name in names:
      if name.endswith((".dist-info", ".egg-info")):
        project, _, version = name.rsplit(".", 1)[0].partition("-")
        found.setdefault(project, version)
  return found


# ---- private caches ------------------------------------------------------------------------
@functools.cache
def warn_once(message: str) -> None:
  """One line on stderr, once per process for a given message."""
  print(f"jaxft: warning: {message}", file=sys.stderr, flush=True)


def _not_private(info: os.stat_result, kind: str) -> Optional[str]:
  if not (stat.S_ISDIR(info.st_mode) if kind == "directory" else stat.S_ISREG(info.st_mode)):
    return f"is not a {kind} (a link?)"
  if info.st_uid != os.geteuid():
    return f"is owned by another user (uid {info.st_uid})"
  if info.st_mode & 0o022:
    return f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
  return None


def private_directory(path: str, setting: str) -> Optional[str]:
  """`path` (created owner-only if missing) where this user owns it and nobody else can write
  it, else None with a one-line warning. jaxft loads code from its caches (compiled libraries,
  programs): whoever could write there could run code in every jaxft process. `setting` names
  what moves the directory, for the warning."""
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
    problem = _not_private(os.lstat(path), "directory")
  except OSError as e:
    problem = f"cannot be used ({e.strerror})"
  if problem is None:
    return path
  warn_once(f"not using the cache {path}: it {problem}; remove it (jaxft creates it again, "
             f"private) or set {setting} to a folder only you can write")
  return None


def private_file(path: str) -> bool:
  """Whether `path` is a regular file that this user owns and nobody else can write."""
  try:
    return _not_private(os.lstat(path), "file") is None
  except OSError:
    return False


def cache_root() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxft")


# ---- transformers' import structure ----------------------------------------------------------
# transformers (4.4x-4.5x) builds the lazy import table of its ~400 model folders at every
# import by reading each of their files (transformers.utils.import_utils.define_import_structure):
# one to two seconds of every command's start. The table is kept as JSON in jaxft's cache, keyed
# by the files' names, sizes and modification times, so it is rebuilt only when they change.
_IMPORT_UTILS = "transformers.utils.import_utils"


def _files_signature(folder: str) -> str:
  import hashlib
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      if name.endswith(".py"):
        info = os.stat(os.path.join(root, name))
        digest.update(f"{root}/{name}:{info.st_size}:{info.st_mtime_ns};".encode())
  return digest.hexdigest()[:24]


def _to_json(structure: dict) -> list:
  return [[sorted(backends), {module: sorted(names) for module, names in modules.items()}]
          for backends, modules in structure.items()]


def _from_json(rows: list) -> dict:
  return {frozenset(backends): {module: set(names) for module, names in modules.items()}
          for backends, modules in rows}


def _cached_import_structure(original: Callable) -> Callable:
  import json

  @functools.wraps(original)
  def define_import_structure(module_path, prefix=None):
    try:
      folder = os.path.dirname(str(module_path)) if str(module_path).endswith(".py") else str(
          module_path)
      directory = private_directory(os.path.join(cache_root(), "transformers"),
                                    "XDG_CACHE_HOME")
      path = directory and os.path.join(directory, f"{_files_signature(folder)}-{prefix}.json")
    except OSError:
      return original(module_path, prefix)
    if path and private_file(path):
      try:
        with open(path) as f:
          return _from_json(json.load(f))
      except (OSError, ValueError, TypeError):
        pass  # damaged: built again below
    structure = original(module_path, prefix)
    if path:
      try:
        with open(f"{path}.{os.getpid()}", "w") as f:
          json.dump(_to_json(structure), f)
        os.replace(f"{path}.{os.getpid()}", path)
      except (OSError, TypeError, ValueError):
        pass  # an unwritable cache costs this start only
    return structure

  return define_import_structure


class _ImportStructureCache:
  """A meta-path finder that wraps define_import_structure as soon as its module has run, before
  transformers' own __init__ calls it."""

  def find_spec(self, name, path=None, target=None):
    if name != _IMPORT_UTILS:
      return None
    for finder in sys.meta_path:
      spec = None if finder is self else finder.find_spec(name, path, target)
      if spec is not None:
        break
    else:
      return None
    loader = spec.loader
    if loader is None or not hasattr(loader, "exec_module"):
      return spec
    exec_module = loader.exec_module

    def exec_and_wrap(module):
      exec_module(module)
      original = getattr(module, "define_import_structure", None)
      if callable(original):
        module.define_import_structure = _cached_import_structure(original)

    loader.exec_module = exec_and_wrap
    return spec


def cache_transformers_import_structure() -> None:
  """Installs the import-structure cache, unless transformers is imported already (too late)
  or JAXFT_TRANSFORMERS_CACHE=0."""
  if (_IMPORT_UTILS in sys.modules or os.environ.get("JAXFT_TRANSFORMERS_CACHE") == "0"
      or any(isinstance(f, _ImportStructureCache) for f in sys.meta_path)):
    return
  sys.meta_path.insert(0, _ImportStructureCache())


# ---- JAX -----------------------------------------------------------------------------------
def default_compilation_cache_dir() -> str:
  return os.path.join(cache_root(), "xla")


def configure_jax() -> None:
  """Turns on the persistent compilation cache, so a repeated run skips compiling, and counts
  compilations (jaxft.compiled.CompileStats).

  JAX_COMPILATION_CACHE_DIR, when set, wins (JAX reads it itself; a team may share one on
  purpose). The default one is private to the user (`private_directory`).
  """
  import jax
  from jaxft import compiled
  compiled.count_compilations()
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    default = private_directory(default_compilation_cache_dir(), "JAX_COMPILATION_CACHE_DIR")
    if default is not None:
      jax.config.update("jax_compilation_cache_dir", default)
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
             uses_torch: bool | Callable[[], bool] = False) -> None:
  """Runs an entry point: parses the flags (defined by the caller beforehand), checks that the
  `required` flags (names) are set, then calls `body()`; a user error anywhere is one line and
  exit status 2. `uses_torch` may be a function of the parsed flags."""
  from absl import app, flags
  from jaxft.errors import fail, run_cli
  # jaxft never needs PyTorch (safetensors convert without it), but transformers imports it
  # whenever it is installed, seconds of every command's start. USE_TORCH, when set, wins.
  if uses_torch is False:
    os.environ.setdefault("USE_TORCH", "0")
  cache_transformers_import_structure()
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
      if callable(uses_torch) and not uses_torch():  # parsed flags, transformers not loaded yet
        os.environ.setdefault("USE_TORCH", "0")
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
