"""Distillation (jaxft.distill) and student initialisation (model.keep_layers) on tiny models."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jaxft import (compiled, config as config_lib, distill, experiment, export, hash_rng, models,
                   rules, tasks)
from jaxft import step as step_lib, train
from jaxft.config import base_config
from jaxft.data import batching
from jaxft.errors import UserError
from jaxft.metrics import read_metrics

from conftest import synthetic_sentiment, write_tsv


def _config(model_dir, files, **values):
  c = base_config()
  c.model.name_or_path = model_dir
  c.data.train_file, c.data.validation_file = files
  c.data.max_seq_length = 64
  c.model.pooling = "mean"
  c.train.batch_size, c.train.eval_batch_size = 16, 32
  c.train.learning_rate, c.train.warmup_ratio = 3e-3, 0.0
  c.train.num_epochs, c.train.log_every = 4.0, 12
  c.checkpoint.async_save = False
  c.lock()
  return config_lib.replace(c, values)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model_dir, sentiment_files):
  """(workdir, exported folder, its validation accuracy) of a tiny teacher."""
  base = tmp_path_factory.mktemp("teacher")
  workdir, folder = str(base / "run"), str(base / "export")
  metrics = train.train_and_evaluate(_config(tiny_model_dir, sentiment_files), workdir)
  export.export(workdir, folder, "hf")
  return workdir, folder, metrics["accuracy"]


def _first_step(config):
  """(loss of the first train step, the step's output state, the teacher) of `config`."""
  exp = experiment.build(config)
  tx, learning_rate = exp.optimizer(10)
  abstract = exp.abstract_state(tx)
  teacher = distill.load_teacher(exp) if config.train.distill.teacher else None
  train_step = compiled.train_step(exp, tx, learning_rate, abstract, teacher=teacher)
  host = batching.make_batch(exp.train_data, np.arange(16), 16, exp.buckets)
  state, metrics = train_step(exp.init_state(tx), exp.frozen(), train_step.device_batch(host))
  return float(metrics["loss"]), state, teacher


# ---- the loss terms -------------------------------------------------------------------------
def test_kl_at_temperature_one_is_the_cross_entropy_gap():
  rng = np.random.default_rng(0)
  student, teacher = (rng.normal(size=(2, 5, 3)) * 2).astype(np.float32)
  p = jax.nn.softmax(teacher)
  gap = optax.softmax_cross_entropy(student, p) - optax.softmax_cross_entropy(teacher, p)
  np.testing.assert_allclose(distill.teacher_term("classification", student, teacher, 1.0), gap,
                             rtol=1e-5, atol=1e-6)
  # Softened by T, scaled by T^2; zero where the student agrees with the teacher.
  q = jax.nn.softmax(teacher / 3)
  gap3 = optax.softmax_cross_entropy(student / 3, q) - optax.softmax_cross_entropy(teacher / 3, q)
  np.testing.assert_allclose(distill.teacher_term("classification", student, teacher, 3.0),
                             9 * gap3, rtol=1e-5, atol=1e-6)
  for kind in ("classification", "multilabel", "regression"):
    np.testing.assert_allclose(distill.teacher_term(kind, teacher, teacher, 2.0), 0, atol=1e-6)
  bce = optax.sigmoid_binary_cross_entropy
  multilabel = (bce(student, jax.nn.sigmoid(teacher)) - bce(teacher, jax.nn.sigmoid(teacher)))
  np.testing.assert_allclose(distill.teacher_term("multilabel", student, teacher, 1.0),
                             multilabel.mean(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(distill.teacher_term("regression", student, teacher, 5.0),
                             (student[:, 0] - teacher[:, 0]) ** 2, rtol=1e-6)


def test_unlabelled_examples_have_no_task_loss_and_finite_gradients():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  task = tasks.make("classification", ("a", "b", "c"))
  got = distill.label_term(task, logits, jnp.asarray([0, -1, 2, -1]))
  full = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray([0, 0, 2, 0]))
  np.testing.assert_allclose(got, [full[0], 0, full[2], 0], rtol=1e-6)
  regression = tasks.make("regression")
  targets = jnp.asarray([1.0, np.nan, 2.0, np.nan])
  grad = jax.grad(lambda x: distill.label_term(regression, x, targets).sum())(logits[:, :1])
  assert np.isfinite(grad).all() and grad[1, 0] == 0 and grad[0, 0] != 0


@pytest.mark.parametrize("kind", ["token_classification", "regression", "multilabel"])
def test_the_objective_weighs_examples_and_scored_tokens_as_the_task_loss(kind):
  """(1 - alpha) x task loss + alpha x teacher term, over what the task loss counts: examples,
  or scored tokens; an unlabelled example keeps only its teacher term."""
  rng = np.random.default_rng(2)
  shape = {"token_classification": (3, 4, 5), "regression": (3, 1), "multilabel": (3, 4)}[kind]
  student = jnp.asarray(rng.normal(size=shape), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=shape), jnp.float32)
  batch = {"weights": jnp.asarray([1.0, 1.0, 0.0]), "attention_mask": jnp.ones((3, 4), jnp.int32)}
  if kind == "token_classification":
    batch["labels"] = jnp.asarray([[1, 2, -1, 0], [-1, -1, -1, -1], [3, 3, 3, 3]])
    batch["label_weights"] = jnp.asarray([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 1]], jnp.float32)
  elif kind == "regression":
    batch["labels"] = jnp.asarray([0.5, np.nan, 2.0])
  else:
    batch["labels"] = jnp.asarray([[1, 0, 1, 0], [np.nan] * 4, [0, 0, 1, 1]], jnp.float32)
  task = tasks.make(kind, ("a", "b", "c", "d", "e")[:shape[-1]] if kind != "regression" else ())
  config = base_config().train.distill
  config.alpha, config.temperature = 0.25, 2.0
  loss = distill.objective(task, lambda *_: student, lambda *_: teacher, config)
  total, weight = loss({}, {}, batch, None)
  weights = task.loss_weights(batch)
  per = (0.75 * distill.label_term(task, student, batch["labels"])
         + 0.25 * distill.teacher_term(kind, student, teacher, 2.0))
  assert float(weight) == float(weights.sum()) == (5.0 if kind == "token_classification" else 2.0)
  np.testing.assert_allclose(total, jnp.sum(per * weights), rtol=1e-6)
  # The unlabelled example's task term is 0, its teacher term is not.
  assert float(distill.label_term(task, student, batch["labels"])[1].sum()) == 0.0
  assert float(distill.teacher_term(kind, student, teacher, 2.0)[1].sum()) > 0.0


def test_layer_mapping_takes_the_last_layer_of_each_share():
  assert distill._layer_mapping(3, 6) == [(0, 1), (1, 3), (2, 5)]
  assert distill._layer_mapping(2, 2) == [(0, 0), (1, 1)]
  assert distill._layer_mapping(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]


# ---- student initialisation -------------------------------------------------------------------
def test_keep_layers_builds_a_shallower_model_from_chosen_layers(minilm_dir):
  task = tasks.make("classification", ("0", "1"))
  full = models.load_model(minilm_dir, task, "default", 0)
  student = models.load_model(minilm_dir, task, "default", 0, keep_layers=(0, 2, 4))
  assert student.hf_config.num_hidden_layers == 3
  layers = student.params["bert"]["encoder"]["layer"]
  assert sorted(layers) == ["0", "1", "2"]
  for new, old in enumerate((0, 2, 4)):
    want = traverse_util.flatten_dict(full.params["bert"]["encoder"]["layer"][str(old)])
    got = traverse_util.flatten_dict(layers[str(new)])
    assert set(got) == set(want)
    for path, x in got.items():
      np.testing.assert_array_equal(x, want[path], err_msg=str(path))
  np.testing.assert_array_equal(student.params["bert"]["embeddings"]["word_embeddings"]["embedding"],
                                full.params["bert"]["embeddings"]["word_embeddings"]["embedding"])
  with pytest.raises(UserError, match=r"keep_layers=\(0, 6\) names layer 6.*layers 0..5"):
    models.load_model(minilm_dir, task, "default", 0, keep_layers=(0, 6))


# ---- the step ---------------------------------------------------------------------------------
def test_a_student_equal_to_its_teacher_has_zero_distillation_loss(teacher, sentiment_files):
  """Started from the exported teacher, the student's outputs and hidden states are the
  teacher's: with alpha 1 the first step's loss is 0; with alpha 0 it is the task loss."""
  _, folder, _ = teacher
  distilled = _config(folder, sentiment_files, **{
      "train.distill.teacher": folder, "train.distill.alpha": 1.0,
      "train.distill.hidden_weight": 1.0})
  loss, state, teacher_state = _first_step(distilled)
  assert abs(loss) < 1e-6
  # The teacher is frozen: the state holds the student's parameters and moments only.
  student_paths = {rules.path(k) for k, _ in jax.tree_util.tree_flatten_with_path(
      state["params"])[0]}
  assert not any("distillation_teacher" in p for p in student_paths)
  assert len(jax.tree_util.tree_leaves(state["params"])) == len(
      jax.tree_util.tree_leaves(teacher_state.params))
  task_only, _, _ = _first_step(config_lib.replace(distilled, {"train.distill.alpha": 0.0,
                                                               "train.distill.hidden_weight": 0.0}))
  plain, _, _ = _first_step(_config(folder, sentiment_files))
  assert task_only == pytest.approx(plain, rel=1e-6) and plain > 0.01


def test_the_teacher_gets_no_gradient(teacher, sentiment_files, tiny_model_dir):
  _, folder, _ = teacher
  exp = experiment.build(_config(tiny_model_dir, sentiment_files,
                                 **{"train.distill.teacher": folder}))
  loaded = distill.load_teacher(exp)
  host = batching.make_batch(exp.train_data, np.arange(8), 8, exp.buckets)
  batch = exp.to_mesh(host)
  params = step_lib.combine(exp.trainable_init, exp.frozen_init)
  key = hash_rng.dropout_key(jax.random.PRNGKey(0), "hash", 0)
  to_teacher = jax.jit(jax.grad(lambda t: loaded.loss(params, t, batch, key)[0]))(loaded.params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(to_teacher))
  states = []
  with distill._layer_outputs(states):
    exp.logits(params, batch, None, False)
  assert [s.shape for s in states] == [batch["input_ids"].shape + (32,)] * 2  # both layers
  to_student = jax.jit(jax.grad(lambda p: loaded.loss(p, loaded.params, batch, key)[0]))(params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(to_student)) > 0


# ---- end to end -------------------------------------------------------------------------------
def test_a_one_layer_student_learns_from_the_teacher_alone(teacher, sentiment_files, tmp_path):
  """alpha 1: no labels are used, the student still learns the task; the unlabelled transfer
  examples join the training data."""
  workdir, folder, teacher_accuracy = teacher
  transfer = write_tsv(tmp_path / "transfer.tsv", [(s,) for s, _ in synthetic_sentiment(64, 7)],
                       header=("sentence",))
  config = _config(folder, sentiment_files, **{
      "model.keep_layers": (1,), "train.distill.teacher": workdir, "train.distill.alpha": 1.0,
      "train.distill.transfer_file": transfer, "train.distill.max_transfer_examples": 48})
  student_dir = str(tmp_path / "student")
  final = train.train_and_evaluate(config, student_dir)
  assert teacher_accuracy > 0.8
  assert final["accuracy"] > 0.8
  # 4 epochs of 192 labelled and 48 transfer examples, 16 a step
  assert read_metrics(student_dir, "train")[-1]["step"] == 4 * (192 + 48) // 16
  saved = experiment.build(config_lib.from_json(open(os.path.join(student_dir,
                                                                  "config.json")).read()),
                           read_train=False)
  assert saved.model.hf_config.num_hidden_layers == 1


def test_bad_teachers_are_one_line_errors(teacher, sentiment_files, tiny_model_dir, tmp_path):
  workdir, folder, _ = teacher
  cases = [
      ({"train.distill.teacher": str(tmp_path / "nowhere")}, "neither a jaxft workdir"),
      ({"train.distill.teacher": workdir, "data.label_names": ("1", "0")},
       r"predicts labels \['0', '1'\], this run's are \['1', '0'\]"),
      ({"train.distill.teacher": folder, "task.kind": "regression",
        "data.label_field": "label"}, "task.kind=classification, this run is task.kind=regression"),
  ]
  for values, message in cases:
    with pytest.raises(UserError, match=message):
      train.train_and_evaluate(_config(tiny_model_dir, sentiment_files, **values),
                               str(tmp_path / "run"))
  with pytest.raises(UserError, match="transfer_file is set without train.distill.teacher"):
    config_lib.validate(_config(tiny_model_dir, sentiment_files,
                                **{"train.distill.transfer_file": sentiment_files[0]}))
  with pytest.raises(UserError, match="alpha=1.5 must be in"):
    config_lib.validate(_config(tiny_model_dir, sentiment_files, **{
        "train.distill.teacher": folder, "train.distill.alpha": 1.5}))
