"""Config defaults, locking, validation and the config.json round trip."""

import pytest

from jaxft import config as config_lib
from jaxft.errors import UserError


def _valid():
  c = config_lib.base_config()
  c.data.train_file = "train.tsv"
  c.lock()
  return c


def test_locked_config_rejects_a_misspelt_key():
  c = _valid()
  with pytest.raises(AttributeError):
    c.train.learning_rat = 1.0


def test_type_safety_rejects_wrong_types():
  c = _valid()
  with pytest.raises(TypeError):
    c.train.batch_size = "big"


@pytest.mark.parametrize("key, value, message", [
    ("train.learning_rate", 0.0, "train.learning_rate=0.0 must be a positive"),
    ("train.learning_rate", -1e-4, "must be a positive"),
    ("train.batch_size", 0, "train.batch_size=0 must be a positive"),
    ("train.grad_accum_steps", 3, "divisible by train.grad_accum_steps=3"),
    ("train.lr_schedule", "step", "train.lr_schedule='step' is not supported"),
    ("train.warmup_ratio", 1.5, "warmup_ratio"),
    ("model.pooling", "max", "model.pooling='max'"),
    ("task.kind", "translation", "task.kind='translation'"),
    ("data.max_seq_length", 4, "at least 8"),
    ("checkpoint.best_mode", "up", "best_mode"),
    ("parallel.mode", "spmd", "parallel.mode='spmd'"),
])
def test_validate_names_the_bad_key(key, value, message):
  c = _valid()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(UserError, match=message.replace("(", "\\(").replace("[", "\\[")):
    config_lib.validate(c)


def test_missing_train_file_is_an_error():
  c = config_lib.base_config()
  with pytest.raises(UserError, match="data.train_file is not set"):
    config_lib.validate(c)


def test_json_round_trip_restores_every_value():
  c = _valid()
  with c.unlocked():
    c.data.label_names = ("neg", "pos")
    c.data.text_fields = ("a", "b")
    c.train.learning_rate = 3e-4
  back = config_lib.from_json(config_lib.to_json(c))
  assert back.to_dict() == c.to_dict()


def test_shipped_configs_load_and_validate():
  import os
  root = os.path.join(os.path.dirname(__file__), "..", "configs")
  for name in sorted(os.listdir(root)):
    if not name.endswith(".py"):
      continue
    c = config_lib.load_config_file(os.path.join(root, name))
    if c.data.train_file is None:
      with c.unlocked():
        c.data.train_file = "x.tsv"
    config_lib.validate(c)
    with pytest.raises(AttributeError):
      c.no_such_key = 1


def test_the_config_module_and_start_up_import_no_jax():
  """Entry points read configs and start the process before JAX loads (jaxft.runtime)."""
  import subprocess
  import sys
  code = ("import sys, jaxft.config, jaxft.runtime, jaxft.report; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'optax'}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[]"


def test_replace_returns_a_new_locked_config_and_leaves_the_old_one():
  c = _valid()
  d = config_lib.replace(c, {"train.batch_size": 8, "parallel.mesh": {"data": 2, "fsdp": 4,
                                                                       "tensor": 1}})
  assert d.train.batch_size == 8 and c.train.batch_size == 32
  assert dict(d.parallel.mesh) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert c.parallel.mesh.data == -1
  with pytest.raises(AttributeError):
    d.train.learning_rat = 1.0  # locked
  resolved = config_lib.with_task_defaults(c)
  assert (resolved.checkpoint.best_metric, resolved.checkpoint.best_mode) == ("accuracy", "max")
  assert c.checkpoint.best_metric is None


def test_an_experiment_resolves_its_config_once_without_changing_the_given_one(tiny_config):
  from jaxft import experiment
  before = tiny_config.to_json()
  exp = experiment.build(tiny_config)
  assert tiny_config.to_json() == before
  assert exp.config.data.label_names == ("0", "1")
  assert tuple(exp.config.data.bucket_lengths) == exp.buckets
  assert exp.config.checkpoint.best_metric == "accuracy"
