"""Few-shot sampling, SetFit's contrastive method and zero-shot label descriptions
(jaxft.fewshot), on synthetic data and a tiny random BERT."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import config as config_lib, evaluate, experiment, export, fewshot, inference, predict
from jaxft import train
from jaxft.errors import UserError
from jaxft.metrics import read_metrics

from conftest import synthetic_sentiment, write_tsv

LABELS = np.array([0] * 30 + [1] * 12 + [2] * 9)


# ---- sampling ---------------------------------------------------------------------------------
def test_sampling_is_balanced_deterministic_and_seeded():
  a = fewshot.sample_per_class(LABELS, 8, seed=3, label_names=("a", "b", "c"), path="f")
  assert len(a) == 24 and np.array_equal(np.bincount(LABELS[a]), [8, 8, 8])
  assert np.array_equal(a, np.sort(a)) and len(set(a.tolist())) == 24
  assert np.array_equal(a, fewshot.sample_per_class(LABELS, 8, 3, ("a", "b", "c"), "f"))
  b = fewshot.sample_per_class(LABELS, 8, 4, ("a", "b", "c"), "f")
  assert not np.array_equal(a, b)


def test_sampling_more_than_a_class_has_is_an_error():
  with pytest.raises(UserError, match=r"label 'c' has 9 example\(s\) in f; lower "
                     r"data.examples_per_class to at most 9"):
    fewshot.sample_per_class(LABELS, 10, 0, ("a", "b", "c"), "f")


# ---- pairs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(8, 8), (64, 64), (4, 5, 3)])
def test_oversampled_pairs_count_every_pair_once_and_balance_the_kinds(sizes):
  labels = np.repeat(np.arange(len(sizes)), sizes)
  pairs, targets = fewshot.contrastive_pairs(labels, seed=0, num_iterations=None)
  positive = sum(n * (n + 1) // 2 for n in sizes)  # an example with itself counts, as in setfit
  negative = sum(sizes[i] * sizes[j] for i in range(len(sizes)) for j in range(i + 1, len(sizes)))
  assert len(pairs) == 2 * max(positive, negative)
  assert np.array_equal(targets[0::2], np.ones(len(pairs) // 2))  # positives and negatives
  assert np.array_equal(targets[1::2], np.zeros(len(pairs) // 2))  # alternate
  assert np.array_equal(labels[pairs[:, 0]] == labels[pairs[:, 1]], targets == 1.0)
  unique = {tuple(p) for p in pairs.tolist()}
  assert len(unique) == positive + negative  # the rarer kind repeats, nothing is missing


def test_num_iterations_sets_the_pair_count():
  labels = np.repeat([0, 1], 8)
  pairs, targets = fewshot.contrastive_pairs(labels, 0, num_iterations=20)
  assert len(pairs) == 2 * 20 * 16 and targets.sum() == 20 * 16


def _train_config(batch_size=16, num_iterations=None, num_epochs=1.0):
  return config_lib.replace(config_lib.base_config(), {
      "train.batch_size": batch_size, "train.contrastive.num_iterations": num_iterations,
      "train.num_epochs": num_epochs}).train


def test_pair_steps_take_every_pair_once_per_epoch_in_a_seeded_order():
  from jaxft.data.encode import Encoded
  data = Encoded([np.zeros(5, np.int32)] * 16, [np.zeros(5, np.int32)] * 16, np.repeat([0, 1], 8))
  steps = fewshot.PairSteps(data, _train_config(), seed=0, packed=False, groups=1)
  assert steps.steps_per_epoch == 9  # 144 pairs
  epoch = np.concatenate([steps.step(i) for i in range(9)])
  assert np.array_equal(np.sort(epoch), np.arange(144))
  assert not np.array_equal(epoch, np.concatenate([steps.step(i) for i in range(9, 18)]))
  again = fewshot.PairSteps(data, _train_config(), 0, packed=False, groups=1)
  assert np.array_equal(again.step(11), steps.step(11))


def _embedded_slots(batch, data):
  """The token ids of each example slot of a padded or packed batch."""
  if "segment_ids" not in batch:
    return [batch["input_ids"][r][batch["attention_mask"][r] > 0]
            for r in range(len(batch["weights"]))]
  return [batch["input_ids"][r, s:s + n] for r, s, n in
          zip(batch["example_row"], batch["example_start"], batch["example_length"])]


@pytest.mark.parametrize("packing, groups", [("off", 1), ("tokens", 1), ("tokens", 2)])
def test_a_pair_batch_holds_each_pair_in_two_neighbouring_slots(tiny_config, packing, groups):
  config = config_lib.replace(tiny_config, {"data.examples_per_class": 4,
                                            "train.method": "contrastive",
                                            "data.packing": packing,
                                            "data.packing_groups": groups})
  exp = experiment.build(config)
  data = exp.train_data
  steps = fewshot.PairSteps(data, _train_config(num_epochs=2.0), 0, packing != "off", groups)
  shapes = set()
  for step in range(2 * steps.steps_per_epoch):  # 40 pairs: 16, 16 and 8 a step
    batch = steps.host_batch(exp, data, step)
    shapes.add(batch["input_ids"].shape)
    chosen = steps.step(step)
    if packing != "off":  # packed, a step's pairs are in the order they fill the rows
      placed = steps._placement(chosen, steps.shape.length)[1]
      assert sorted(placed) == sorted(chosen)
      chosen = placed
    slots = _embedded_slots(batch, data)
    real = np.flatnonzero(batch["weights"])
    assert len(real) == 2 * len(chosen)
    for i, pair in enumerate(steps.pairs[chosen]):
      first, second = real[2 * i], real[2 * i + 1]
      assert first % 2 == 0 and second == first + 1  # pairs never straddle two slots' halves
      for slot, example in zip((first, second), pair):
        assert np.array_equal(slots[slot], data.input_ids[example])
        assert batch["labels"][slot] == steps.targets[chosen[i]]
    if groups == 2:  # each group's block of slots holds half the pairs
      half = len(batch["weights"]) // 2
      assert batch["weights"][:half].sum() == batch["weights"][half:].sum() == len(chosen)
  if packing != "off":
    assert len(shapes) == 1
    # rows hold the longest pair (the longest sentence with itself: setfit pairs those too)
    assert steps.shape.length == -(-(2 * max(data.lengths)) * 3 // 2 // 8) * 8


def test_cosine_similarity_loss_is_the_squared_error_of_each_pairs_cosine():
  rng = np.random.default_rng(0)
  e = rng.standard_normal((6, 5)).astype(np.float32)
  batch = {"labels": np.array([1, 1, 0, 0, 1, 1], np.float32),
           "weights": np.array([1, 1, 1, 1, 0, 0], np.float32)}
  total, count = fewshot.cosine_similarity_loss(jnp.asarray(e), batch)
  cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  expected = (cos(e[0], e[1]) - 1) ** 2 + cos(e[2], e[3]) ** 2
  assert float(count) == 2.0 and abs(float(total) - expected) < 1e-5


# ---- heads --------------------------------------------------------------------------------------
def test_the_fitted_head_gives_the_logistic_regressions_probabilities():
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(0)
  for classes in (2, 3):
    x = rng.standard_normal((60, 7)).astype(np.float32)
    y = np.arange(60) % classes
    head = fewshot.fit_head(x, y, classes, inverse_l2=1.0)
    logits = x @ head["kernel"] + head["bias"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(probs, reference, atol=1e-5)


def test_the_description_head_picks_the_most_similar_description():
  rng = np.random.default_rng(1)
  descriptions = rng.standard_normal((3, 8)) * np.array([[1.0], [5.0], [0.2]])  # unequal norms
  x = rng.standard_normal((50, 8)) * rng.uniform(0.1, 10, (50, 1))
  head = fewshot.description_head(descriptions.astype(np.float32))
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  assert np.array_equal((x @ head["kernel"] + head["bias"]).argmax(1),
                        (unit(x) @ unit(descriptions).T).argmax(1))


def test_a_contrastive_head_adds_the_description_head_as_a_prior(tiny_config):
  config = config_lib.replace(tiny_config, {
      "train.method": "contrastive", "data.examples_per_class": 8,
      "data.label_descriptions": {"0": "bad awful", "1": "good great"}})
  exp = experiment.build(config)
  params = jax.device_put(exp.trainable_init, exp.param_shardings())
  head = fewshot.HeadFitter(exp, exp.train_data).head(params, step=0)
  embed = fewshot.Embedder(exp)
  fitted = fewshot.fit_head(embed(params, exp.train_data), exp.train_data.labels, 2, 1.0)
  prior = fewshot.description_head(embed(params, exp.encode_texts(["bad awful", "good great"])))
  for k in ("kernel", "bias"):
    np.testing.assert_allclose(head[k], fitted[k] + prior[k], atol=1e-6)
  assert np.abs(prior["kernel"]).max() > 0.1 * np.abs(fitted["kernel"]).max()


def test_descriptions_are_keyed_by_label_name_or_index():
  names = ("negative", "positive")
  assert fewshot.descriptions_by_label({"0": "bad", "positive": "good"}, names) == ["bad", "good"]
  with pytest.raises(UserError, match="no description for label 'positive'"):
    fewshot.descriptions_by_label({"negative": "bad"}, names)
  with pytest.raises(UserError, match=r"names \['neutral'\]"):
    fewshot.descriptions_by_label({"0": "a", "1": "b", "neutral": "c"}, names)


# ---- runs ---------------------------------------------------------------------------------------
def _contrastive_config(model_dir, files):
  """The tiny model on 16 examples per label, 4 epochs of 8 contrastive steps."""
  from jaxft.config import base_config
  c = base_config()
  c.model.name_or_path = model_dir
  c.model.pooling = "mean"
  c.data.train_file, c.data.validation_file = files
  c.data.max_seq_length = 64
  c.data.examples_per_class = 16
  c.train.method = "contrastive"
  c.train.contrastive.num_iterations = 4  # 128 + 128 pairs, 8 steps of 32 an epoch
  c.train.batch_size, c.train.eval_batch_size = 32, 32
  c.train.learning_rate, c.train.warmup_ratio = 3e-3, 0.0
  c.train.num_epochs, c.train.log_every = 4.0, 8
  c.checkpoint.async_save = False
  c.lock()
  return c


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory, tiny_model_dir, sentiment_files):
  """(workdir, final metrics) of the tiny contrastive run."""
  workdir = str(tmp_path_factory.mktemp("contrastive") / "run")
  return workdir, train.train_and_evaluate(
      _contrastive_config(tiny_model_dir, sentiment_files), workdir)


def test_contrastive_training_lowers_the_pair_loss_and_fits_a_useful_head(contrastive_run):
  workdir, final = contrastive_run
  losses = [r["loss"] for r in read_metrics(workdir, "train")]
  assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
  with open(os.path.join(workdir, "run.json")) as f:
    run = json.load(f)
  assert run["train_method"] == "contrastive" and len(run["few_shot_examples"]) == 32
  assert run["num_train_steps"] == 32
  assert final["accuracy"] >= 0.65, final  # a random tiny BERT (0.76 when written)


def test_the_fitted_head_round_trips_through_evaluate_predict_and_export(contrastive_run,
                                                                          sentiment_files,
                                                                          tmp_path):
  workdir, final = contrastive_run
  record = evaluate.evaluate_checkpoint(workdir)
  assert record["step"] == 32 and record["metrics"]["accuracy"] == final["accuracy"]
  records = predict.predict(workdir, sentiment_files[1], str(tmp_path / "p.jsonl"))
  exp, params = inference.load(workdir, None)
  data = exp.load_split("validation")
  logits = np.asarray(inference.Predictor(exp).outputs(params, data)["logits"])
  assert [r["label"] for r in records] == [exp.label_names[i] for i in logits.argmax(-1)]
  export.export(workdir, str(tmp_path / "hf"), "hf")
  exp2, params2 = inference.load_exported(str(tmp_path / "hf"))
  exported = np.asarray(inference.Predictor(exp2).outputs(params2, data)["logits"])
  np.testing.assert_allclose(exported, logits, atol=1e-5)


def test_zero_shot_scores_the_most_similar_description(tmp_path, tiny_config, sentiment_files):
  config = config_lib.replace(tiny_config, {
      "train.method": "zero_shot",
      "data.label_descriptions": {"0": "bad awful terrible", "1": "good great wonderful"}})
  workdir = str(tmp_path / "zero")
  final = train.train_and_evaluate(config, workdir)
  exp, step, params = inference.restore(workdir)
  assert step == 0
  # by hand: cosine similarity of each dev sentence's embedding to each description's
  data = exp.load_split("validation")
  embed = fewshot.Embedder(exp)
  x = embed(params, data)
  d = embed(params, exp.encode_texts(["bad awful terrible", "good great wonderful"]))
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  expected = np.mean((unit(x) @ unit(d).T).argmax(1) == np.asarray(data.labels))
  assert abs(final["accuracy"] - expected) < 1e-9 and final["accuracy"] > 0.5
  assert [r["step"] for r in read_metrics(workdir, "validation")] == [0]


def test_a_stopped_contrastive_run_resumes_to_the_same_encoder_and_head(
    contrastive_run, tiny_model_dir, sentiment_files, tmp_path):
  from flax import traverse_util
  config = _contrastive_config(tiny_model_dir, sentiment_files)
  workdir = str(tmp_path / "stopped")
  train.train_and_evaluate(config, workdir, on_evaluation=lambda step, n, m: step == 16)
  assert inference.restore(workdir, "latest")[1] == 16
  final = train.train_and_evaluate(config, workdir)
  without_time = lambda m: {k: v for k, v in m.items() if k != "eval_seconds"}
  assert without_time(final) == without_time(contrastive_run[1])
  resumed = traverse_util.flatten_dict(inference.restore(workdir, "latest")[2])
  whole = traverse_util.flatten_dict(inference.restore(contrastive_run[0], "latest")[2])
  assert resumed.keys() == whole.keys()
  for key in whole:
    assert np.array_equal(np.asarray(resumed[key]), np.asarray(whole[key])), key
