"""The program cache (jaxft.compiled): compiled steps kept across runs, loaded without tracing,
keyed safely, private to the user, bounded."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from jaxft import compiled, experiment, inference, train
from jaxft.data import batching
from jaxft.metrics import read_metrics


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  """A fresh JAX cache directory for this test (the cache reads the setting on each use)."""
  path = str(tmp_path / "xla")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", path)  # else configure_jax sets the default
  original = jax.config.values["jax_compilation_cache_dir"]
  jax.config.update("jax_compilation_cache_dir", path)
  yield os.path.join(path, "jaxft-programs")
  jax.config.update("jax_compilation_cache_dir", original)


def _stored(cache_dir):
  return sorted(glob.glob(os.path.join(cache_dir, "*.bin")))


def _no_tracing(monkeypatch):
  """Fails the test if any step is traced or lowered for a precompiled width."""
  def refuse(*args, **kwargs):
    raise AssertionError("a cached program was traced again")
  monkeypatch.setattr(compiled.WidthPrograms, "lowering", refuse)


def test_a_repeated_run_loads_every_program_and_trains_identically(tiny_config, tmp_path,
                                                                    cache_dir, monkeypatch):
  with tiny_config.unlocked():
    tiny_config.train.num_epochs = 1.0
  first = str(tmp_path / "first")
  train.train_and_evaluate(tiny_config, first)
  stored = _stored(cache_dir)
  widths = set(tiny_config.data.bucket_lengths) if tiny_config.data.bucket_lengths else None
  assert len(stored) >= 2  # at least one train and one eval program
  if widths:
    assert len(stored) <= 2 * len(widths)

  loads = []
  real_load = compiled.load
  monkeypatch.setattr(compiled, "load", lambda key: loads.append(key) or real_load(key))
  _no_tracing(monkeypatch)
  second = str(tmp_path / "second")
  train.train_and_evaluate(tiny_config, second)
  assert len(loads) == len(stored) and _stored(cache_dir) == stored
  strip = lambda records: [{k: v for k, v in r.items() if not k.endswith(("_per_sec", "seconds",
                                                                          "fraction"))
                            and not k.startswith("compile")} for r in records]
  assert strip(read_metrics(second)) == strip(read_metrics(first))


def test_a_loaded_train_step_donates_its_state_and_matches_a_compiled_one(tiny_config,
                                                                          cache_dir, monkeypatch):
  loaded = []
  real_load = compiled.load
  monkeypatch.setattr(compiled, "load", lambda key: loaded.append(key) or real_load(key))
  exp = experiment.build(tiny_config)
  tx, learning_rate = exp.optimizer(10)
  prefix = exp.program_cache_key("train")
  hosts = [batching.make_batch(exp.train_data, np.arange(16), 16, (w,)) for w in (16, 24)]
  results = []
  for _ in range(2):  # compiles and stores, then loads
    train_step = compiled.train_step(exp, tx, learning_rate, exp.abstract_state(tx), prefix)
    state = exp.init_state(tx)
    train_step.precompile(state, {}, hosts)
    batch = train_step.device_batch(hosts[1])
    new_state, metrics = train_step(state, {}, batch)
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state["params"]))
    results.append((float(metrics["loss"]), jax.device_get(new_state["params"])))
  assert len(_stored(cache_dir)) == 2 and len(loaded) == 2  # the second trainer's two widths
  (loss1, p1), (loss2, p2) = results
  assert loss1 == loss2
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_array_equal(a, b)


RUN_VALUES = {"train.learning_rate": 3e-3, "seed": 7, "train.num_epochs": 2.0,
              "train.warmup_ratio": 0.3, "train.weight_decay": 0.1, "train.max_grad_norm": 0.5}


def test_runs_that_differ_in_run_values_share_programs_and_use_their_own_values(
    tiny_config, tmp_path, cache_dir, monkeypatch):
  """A sweep's trials: another learning rate, seed, length, decay and clipping run on the
  programs the first run stored, and train exactly as a run that compiled its own."""
  from jaxft import config as config_lib
  train.train_and_evaluate(tiny_config, str(tmp_path / "first"))
  stored = _stored(cache_dir)
  other = config_lib.replace(tiny_config, RUN_VALUES)
  assert (experiment.build(other).program_cache_key("train")
          == experiment.build(tiny_config).program_cache_key("train"))

  loads = []
  real_load = compiled.load
  monkeypatch.setattr(compiled, "load", lambda key: loads.append(key) or real_load(key))
  shared = str(tmp_path / "shared")
  train.train_and_evaluate(other, shared)
  assert len(loads) == len(stored) and _stored(cache_dir) == stored  # nothing compiled
  monkeypatch.undo()
  monkeypatch.setenv("JAXFT_PROGRAM_CACHE", "0")
  own = str(tmp_path / "own")
  train.train_and_evaluate(other, own)
  keep = lambda records: [(r["step"], r.get("loss"), r.get("learning_rate"), r.get("accuracy"))
                          for r in records]
  assert keep(read_metrics(shared)) == keep(read_metrics(own))
  assert keep(read_metrics(shared)) != keep(read_metrics(str(tmp_path / "first")))
  peak = max(r["learning_rate"] for r in read_metrics(shared, "train"))
  assert 0.5 * 3e-3 < peak <= 3e-3


def test_loop_only_keys_share_programs_and_program_keys_do_not(tiny_config, cache_dir,
                                                               sentiment_files):
  from jaxft import config as config_lib
  key = experiment.build(tiny_config).program_cache_key("train")
  loop_only = config_lib.replace(tiny_config, {
      "train.log_every": 5, "train.eval_every": 7, "checkpoint.keep_latest": 3,
      "checkpoint.async_save": True, "data.validation_file": sentiment_files[0],
      "data.max_train_examples": 190})
  assert experiment.build(loop_only).program_cache_key("train") == key
  for values in ({"model.attention": "hf"}, {"peft.method": "lora"},
                 {"train.grad_accum_steps": 2}, {"data.max_seq_length": 32}):
    other = config_lib.replace(tiny_config, values)
    assert experiment.build(other).program_cache_key("train") != key, values


def test_a_damaged_entry_is_compiled_again_and_replaced(tiny_config, cache_dir, capsys):
  exp = experiment.build(tiny_config)
  data = exp.load_split("validation")
  params = exp.init_state(exp.optimizer(1)[0])["params"]
  reference = inference.Predictor(exp).outputs(params, data)["logits"]
  for path in _stored(cache_dir):
    with open(path, "wb") as f:
      f.write(b"not a program")
  outputs = inference.Predictor(exp).outputs(params, data)["logits"]
  np.testing.assert_allclose(np.stack(outputs), np.stack(reference), rtol=1e-6)
  assert "did not load" in capsys.readouterr().err
  assert all(os.path.getsize(p) > 1000 for p in _stored(cache_dir))


def test_the_key_changes_with_what_builds_the_step(tiny_config, tiny_model_dir, tmp_path,
                                                   cache_dir):
  key = lambda config, kind="train", model_dir=tiny_model_dir, **extra: (
      compiled.experiment_key(config, model_dir, kind, **extra))
  base = key(tiny_config)
  assert key(tiny_config.copy_and_resolve_references()) == base
  assert key(tiny_config, width=11) != base
  assert key(tiny_config, "eval") != base
  changed = tiny_config.copy_and_resolve_references()
  with changed.unlocked():
    changed.train.adam_b2 = 0.98  # compiled in; the learning rate is not (the next test)
  assert key(changed) != base
  other_model = tmp_path / "model"
  other_model.mkdir()
  with open(os.path.join(tiny_model_dir, "config.json")) as f:
    text = f.read()
  (other_model / "config.json").write_text(text.replace('"hidden_dropout_prob": 0.0',
                                                        '"hidden_dropout_prob": 0.1'))
  assert '"hidden_dropout_prob": 0.0' in text
  assert key(tiny_config, model_dir=str(other_model)) != base

  x = jax.numpy.zeros((4, 16), jax.numpy.int32)
  shapes = {compiled.program_key(base, {"ids": y}) for y in
            (x, jax.numpy.zeros((4, 24), jax.numpy.int32), x.astype(jax.numpy.float32))}
  assert len(shapes) == 3
  assert compiled.program_key(base, {"ids": x}) == compiled.program_key(
      base, {"ids": jax.numpy.ones((4, 16), jax.numpy.int32)})  # values do not matter


def test_off_without_a_jax_cache_directory(tiny_config, monkeypatch):
  original = jax.config.values["jax_compilation_cache_dir"]
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert compiled.cache_directory() is None
    assert experiment.build(tiny_config).program_cache_key("eval") is None
  finally:
    jax.config.update("jax_compilation_cache_dir", original)


@pytest.mark.slow  # 30-70 s: the default run stays under 15 minutes
def test_programs_loaded_from_jax_cache_are_not_stored(tiny_config, tmp_path, cache_dir):
  """XLA:CPU serialises an executable that JAX loaded from its own cache without some kernels
  (a later process failed: "NOT_FOUND: Function wrapped_convert not found"). Runs in separate
  processes: one fills both caches; with jaxft's emptied, the next loads everything from JAX's
  and stores nothing; the one after still runs (from JAX's cache)."""
  import shutil
  import subprocess
  import sys
  from conftest import write_config_file
  config = write_config_file(tmp_path / "cfg.py", tiny_config.model.name_or_path,
                             tiny_config.data.train_file, tiny_config.data.validation_file,
                             num_train_steps=2)
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.dirname(cache_dir)}
  run = lambda name: subprocess.run(
      [sys.executable, "-m", "jaxft.train", f"--config={config}",
       f"--workdir={tmp_path / name}"], capture_output=True, text=True, env=env, timeout=600)
  first = run("first")
  assert first.returncode == 0, first.stderr[-2000:]
  assert len(_stored(cache_dir)) >= 2
  shutil.rmtree(cache_dir)
  for name in ("second", "third"):
    result = run(name)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _stored(cache_dir) == [], name
    assert read_metrics(str(tmp_path / name), "validation")


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(tmp_path):
  directory = tmp_path / "programs"
  directory.mkdir()
  for i, name in enumerate("abcd"):
    path = directory / f"{name}.bin"
    path.write_bytes(b"x" * 1000)
    os.utime(path, (100 + i, 100 + i))
  os.utime(directory / "a.bin", (200, 200))  # loaded recently
  removed = compiled.evict(str(directory), 2500)
  assert sorted(os.path.basename(p) for p in removed) == ["b.bin", "c.bin"]
  assert sorted(os.listdir(directory)) == ["a.bin", "d.bin"]
  assert compiled.evict(str(directory), 2500) == []


def test_on_for_cpu_backends_only_unless_asked(cache_dir, monkeypatch):
  assert compiled.cache_directory() == cache_dir  # this machine: the CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert compiled.cache_directory() is None  # not measured there: off
  monkeypatch.setenv(compiled.CACHE_SETTING, "1")
  assert compiled.cache_directory() == cache_dir
  monkeypatch.setenv(compiled.CACHE_SETTING, "0")
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert compiled.cache_directory() is None


def test_the_key_covers_accelerator_runtimes_and_their_settings(tmp_path, monkeypatch):
  environment = compiled._environment.__wrapped__  # not the process's cached value
  base = json.loads(environment())
  monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_async_all_gather=true")
  assert json.loads(environment())["environment"] != base["environment"]
  site = tmp_path / "site"
  for name, version in (("libtpu", "0.0.21"), ("jax_cuda12_plugin", "0.10.2"),
                        ("nvidia_cudnn_cu12", "9.8.0.87")):
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
  monkeypatch.syspath_prepend(str(site))
  versions = json.loads(environment())["versions"]
  assert versions["libtpu"] == "0.0.21" and versions["jax-cuda12-plugin"] == "0.10.2"
  assert versions["nvidia-cudnn-cu12"] == "9.8.0.87" and versions["jax"] == jax.__version__
