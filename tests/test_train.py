"""End to end on the tiny model: train, evaluate the checkpoint, resume."""

import json
import os

import pytest

from jaxft import evaluate, train
from jaxft.data import batching
from jaxft.errors import UserError
from jaxft.metrics import read_metrics


def test_train_then_evaluate_reproduces_the_training_metrics(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(tiny_config, workdir)
  assert final["accuracy"] > 0.8  # the synthetic task is told by a single word

  records = read_metrics(workdir)
  train_records = [r for r in records if r["split"] == "train"]
  val_records = [r for r in records if r["split"] == "validation"]
  assert [r["step"] for r in train_records] == list(range(12, 97, 12))  # 12 steps per epoch
  assert [r["step"] for r in val_records] == list(range(12, 97, 12))  # once per epoch
  assert train_records[-1]["loss"] < train_records[0]["loss"]
  for key in ("loss", "learning_rate", "examples_per_sec", "tokens_per_sec", "grad_norm"):
    assert key in train_records[0]
  assert os.listdir(os.path.join(workdir, "tb"))
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["data"]["label_names"] == ["0", "1"]

  record = evaluate.evaluate_checkpoint(workdir, "best", "validation")
  best = {r["step"]: r for r in val_records}[record["step"]]
  assert best["accuracy"] == max(r["accuracy"] for r in val_records)
  for key in ("accuracy", "macro_f1", "mcc", "binary_f1"):
    assert record["metrics"][key] == pytest.approx(best[key], abs=1e-6)
  path = os.path.join(workdir, "eval", f"validation-step{best['step']}.json")
  on_disk = json.load(open(path))
  assert on_disk["step"] == best["step"] and on_disk["split"] == "validation"
  assert on_disk["metrics"]["accuracy"] == record["metrics"]["accuracy"]


def test_rerunning_resumes_from_the_latest_checkpoint(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  with tiny_config.unlocked():
    tiny_config.train.num_epochs = 1.0
  train.train_and_evaluate(tiny_config, workdir)
  with tiny_config.unlocked():
    tiny_config.train.num_epochs = 2.0
  train.train_and_evaluate(tiny_config, workdir)
  steps = [r["step"] for r in read_metrics(workdir, "train")]
  assert steps == [12, 24]  # continued from 12, no step logged twice


def test_a_workdir_of_another_run_is_refused(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  with tiny_config.unlocked():
    tiny_config.train.num_train_steps = 2
  train.train_and_evaluate(tiny_config, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with tiny_config.unlocked():
    tiny_config.model.pooling = "default"
  with pytest.raises(UserError, match="holds checkpoints of a run with model.pooling='mean'"):
    train.train_and_evaluate(tiny_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_early_stopping_ends_training(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  with tiny_config.unlocked():
    tiny_config.train.learning_rate = 1e-9  # nothing improves
    tiny_config.train.eval_every = 2
    tiny_config.train.early_stopping_patience = 2
  train.train_and_evaluate(tiny_config, workdir)
  val_steps = [r["step"] for r in read_metrics(workdir, "validation")]
  assert val_steps == [2, 4, 6]  # the first sets the best; two evaluations without improvement


@pytest.mark.parametrize("packing", ["off", "tokens", "examples"])
def test_no_compilation_after_the_first_epoch(tiny_config, tmp_path, packing):
  """Sentences of 3 to ~45 word pieces fall into three bucket lengths (unpacked) or pack into
  one shape (by tokens) or at most four (by examples); every shape is compiled before step 1
  (training and evaluation), none after it, and the logs say how much was padding."""
  import random
  from conftest import FILLER, write_tsv
  rng = random.Random(0)
  rows = [(" ".join(rng.choice(FILLER) for _ in range(rng.choice([1, 2, 5, 12, 20, 40]))) +
           (" good" if y else " bad"), y) for y in [i % 2 for i in range(192)]]
  train_file = write_tsv(tmp_path / "train.tsv", rows)
  config = tiny_config
  with config.unlocked():
    config.data.train_file = config.data.validation_file = train_file
    config.train.num_epochs, config.train.log_every = 3.0, 1
    config.data.packing = packing
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  records = [r for r in read_metrics(workdir) if r["split"] == "train"]
  # Every training and evaluation shape is compiled before step 1, none after.
  assert records[0]["compiles"] == records[-1]["compiles"], [r["compiles"] for r in records]
  if packing == "tokens":
    assert records[-1]["batch_shapes"] == 1
    # 192 examples of ~16 tokens in rows of 64: nearly every position is an example's.
    assert sum(r["padding_fraction"] for r in records) / len(records) < 0.1
    assert sum(r["examples_per_sec"] > 0 for r in records) == len(records)
    return
  if packing == "examples":
    assert 1 <= records[-1]["batch_shapes"] <= 4 and len(records) == 36
    assert sum(r["padding_fraction"] for r in records) / len(records) < 0.3
    return
  assert len(records) == 36 and records[-1]["batch_shapes"] >= 3
  # Mean length ~16 of 64: padded to max_seq_length, 3/4 of the positions would be padding;
  # the fixed 16/32/48/64 ladder left ~0.48, lengths fitted to these batches leave 0.28 (a batch
  # of equal lengths may have none).
  padding = [r["padding_fraction"] for r in records]
  assert 0.0 < max(padding) and sum(padding) / len(padding) < 0.35
  # The fitted bucket lengths are recorded where evaluation and prediction will read them.
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = json.load(f)["data"]["bucket_lengths"]
  with open(os.path.join(workdir, "run.json")) as f:
    assert json.load(f)["bucket_lengths"] == recorded
  assert recorded[-1] == config.data.max_seq_length and len(recorded) <= 5
  assert all(b % 8 == 0 for b in recorded)
  assert all(0.0 <= r["input_wait_fraction"] <= 1.0 for r in records)


def test_bfloat16_compute_trains_with_float32_master_weights(tiny_config, tmp_path):
  """bfloat16 activations, float32 parameters and optimizer state; it still learns the task."""
  import jax
  import numpy as np
  from jaxft import experiment
  config = tiny_config
  with config.unlocked():
    config.train.compute_dtype = "bfloat16"
    config.train.num_epochs = 4.0
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert final["accuracy"] > 0.8
  exp = experiment.build(config, label_names=("0", "1"), read_train=False)
  tx, _ = exp.optimizer(10)
  state = jax.eval_shape(lambda p: {"params": p, "opt": tx.init(p)}, exp.trainable_init)
  assert {np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(state)} <= {
      np.dtype(np.float32), np.dtype(np.int32)}
  batch = exp.host_batch(exp.load_split("validation"), np.arange(4), 4)
  hidden = jax.eval_shape(lambda p: exp.model.hf_model(
      **exp.model._inputs(batch), params=p[exp.model.base_prefix]).last_hidden_state,
      exp.trainable_init)
  assert hidden.dtype == np.dtype("bfloat16")


def test_precompile_shapes_are_the_first_batch_of_each_bucket():
  buckets = (8, 16, 32)
  maxima = [12, 3, 40, 16, 9, 33, 8, 1]
  # The rule it vectorises: the first batch of each bucket_for width, by ascending width
  # (40 and 33 exceed every bucket: the last one).
  expected = {}
  for i, m in enumerate(maxima):
    expected.setdefault(batching.bucket_for(m, buckets), i)
  assert [expected[w] for w in sorted(expected)] == [1, 0, 2]
  assert batching.first_of_each_width(maxima, buckets).tolist() == [1, 0, 2]
  assert batching.first_of_each_width([], buckets).tolist() == []
