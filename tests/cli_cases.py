"""Runs many jaxft command lines quickly: heavy modules are imported once, then each command
runs in a forked child, as `python -m jaxft.<module> ...` would, with its own flags, exit status
and stderr. Used by tests/test_bad_input.py (36 command lines in seconds each, not 10).

  python tests/cli_cases.py FOLDER < cases.json > results.json
  cases: [["jaxft.train", "--config=...", ...], ...];
  results: [{"returncode", "stderr", "digest"}, ...], digest: FOLDER's content after the case.
"""

import importlib
import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

# Import what every command needs before forking, so that no child pays for it. Nothing here
# starts a JAX backend (that happens in the child, on first use).
import jax  # noqa: E402,F401
import transformers  # noqa: E402,F401
from transformers import FlaxAutoModel  # noqa: E402,F401
import orbax.checkpoint  # noqa: E402,F401
import datasets  # noqa: E402,F401
from jaxft import evaluate, export, predict, train  # noqa: E402,F401


def run_one(argv: list) -> dict:
  with tempfile.TemporaryFile() as err:
    pid = os.fork()
    if pid == 0:  # the child: a fresh command line
      code = 1
      try:
        os.dup2(err.fileno(), 2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        module = importlib.import_module(argv[0])
        sys.argv = [argv[0], *argv[1:]]
        module.run()
        code = 0
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:  # noqa: BLE001  (a traceback is what the tests look for)
        import traceback
        traceback.print_exc()
        code = 1
      finally:
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    err.seek(0)
    return {"returncode": os.waitstatus_to_exitcode(status),
            "stderr": err.read().decode("utf-8", "replace")}


def digest(folder: str) -> str:
  """Paths and bytes of every file below `folder`."""
  import hashlib
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(path.encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


if __name__ == "__main__":
  cases = json.load(sys.stdin)
  results = []
  for argv in cases:
    result = run_one(argv)
    result["digest"] = digest(sys.argv[1])
    results.append(result)
  json.dump(results, sys.stdout)
