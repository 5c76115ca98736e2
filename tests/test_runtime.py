"""Process start-up (jaxft.runtime): transformers' import structure kept in jaxft's cache."""

import json
import os
import subprocess
import sys

from jaxft import runtime

from conftest import REPO

_CHILD = """
import sys, time
from jaxft import runtime
runtime.cache_transformers_import_structure()
start = time.perf_counter()
import transformers
from transformers import FlaxAutoModelForSequenceClassification, AutoTokenizer
import transformers.models.bert.modeling_flax_bert
print(time.perf_counter() - start)
"""


def _start(cache_home, **env) -> float:
  out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                       cwd=REPO, timeout=300,
                       env={**os.environ, "XDG_CACHE_HOME": str(cache_home), "USE_TORCH": "0",
                            **env})
  assert out.returncode == 0, out.stderr[-2000:]
  return float(out.stdout.split()[-1])


def test_the_import_structure_round_trips_through_json():
  import transformers
  from transformers.utils import import_utils
  models = os.path.join(os.path.dirname(transformers.__file__), "models")
  original = getattr(import_utils.define_import_structure, "__wrapped__",
                     import_utils.define_import_structure)
  structure = original(models, "models")
  assert len(structure) > 3 and sum(len(m) for m in structure.values()) > 1000
  assert runtime._from_json(json.loads(json.dumps(runtime._to_json(structure)))) == structure


def test_transformers_starts_from_the_cache_and_rebuilds_what_changes(tmp_path):
  cold = _start(tmp_path)
  folder = tmp_path / "jaxft" / "transformers"
  written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
  assert any(name.endswith("-models.json") for name in written)  # transformers' own __init__
  assert oct(folder.stat().st_mode & 0o777) == "0o700"
  warm = _start(tmp_path)
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written  # read, not rebuilt
  print(f"transformers import: cold {cold:.2f} s, from the cache {warm:.2f} s")
  models = next(p for p in folder.iterdir() if p.name.endswith("-models.json"))
  models.write_text("{not json")  # damaged: rebuilt, and the start works
  _start(tmp_path)
  assert json.loads(models.read_text())
  _start(tmp_path / "unused", JAXFT_TRANSFORMERS_CACHE="0")
  assert not (tmp_path / "unused").exists()
  # A file that changes changes the key.
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
  before = runtime._files_signature(str(tmp_path / "pkg"))
  (tmp_path / "pkg" / "a.py").write_text("x = 22\n")
  assert runtime._files_signature(str(tmp_path / "pkg")) != before
