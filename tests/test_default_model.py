"""The real default model (all-MiniLM-L6-v2) end to end, short; the full SST-2 check is `slow`."""

import os

import numpy as np
import pytest

from jaxft import evaluate, models, tasks, train
from jaxft.config import load_config_file
from jaxft.metrics import read_metrics
from tests.conftest import REPO, SHARED_DATA


def _config(name):
  return load_config_file(os.path.join(REPO, "configs", f"{name}.py"))


def test_safetensors_are_converted_like_transformers_does(minilm_dir):
  from flax import traverse_util
  from transformers import FlaxAutoModel
  ours = models.load_model(minilm_dir, tasks.make("classification", ("a", "b")), "mean",
                           seed=0)
  reference = FlaxAutoModel.from_pretrained(minilm_dir, from_pt=True)
  a = traverse_util.flatten_dict(ours.params["bert"])
  b = traverse_util.flatten_dict(reference.params)
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], np.asarray(b[key]))


def test_short_demo_run_and_checkpoint_evaluation(tmp_path):
  c = _config("demo")
  with c.unlocked():
    c.train.num_train_steps = 6
    c.train.batch_size = 16
    c.train.eval_every = 6
    c.data.max_seq_length = 32
    c.data.max_eval_examples = 64
  workdir = str(tmp_path / "demo")
  final = train.train_and_evaluate(c, workdir)
  train_losses = [r["loss"] for r in read_metrics(workdir, "train")]
  assert len(train_losses) == 2 and np.isfinite(train_losses).all()
  record = evaluate.evaluate_checkpoint(workdir, "best")
  assert record["step"] == 6
  for key, value in final.items():
    if key == "confusion_matrix":
      assert record["metrics"][key] == value
    elif key != "eval_seconds":
      assert record["metrics"][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is not present")
def test_sst2_2000_examples_one_epoch_reaches_080(tmp_path):
  c = _config("sst2_minilm")
  with c.unlocked():
    c.data.train_file = os.path.join(SHARED_DATA, "sst2", "train.tsv")
    c.data.validation_file = os.path.join(SHARED_DATA, "sst2", "dev.tsv")
    c.data.max_train_examples = 2000
  final = train.train_and_evaluate(c, str(tmp_path / "sst2"))
  assert final["accuracy"] >= 0.80
  record = evaluate.evaluate_checkpoint(str(tmp_path / "sst2"), "best")
  assert record["metrics"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)
