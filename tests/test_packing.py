"""Sequence packing (jaxft/data/packing.py) is exact: a packed example's logits, loss and
gradients are its unpacked ones, for BERT, RoBERTa and ELECTRA, in every attention path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import models, step as step_lib, tasks
from jaxft.data import batching, packing
from jaxft.data.encode import Encoded

FAMILIES = ("Bert", "Roberta", "Electra")
ATTENTION = ("jaxft", "kernel", "fused", "hf")


@functools.cache
def _hf_model(family: str, head: str):
  """A random 2-layer model of `family` with `head` ("SequenceClassification",
  "TokenClassification" or "" for the base model), dropout off, 4 heads of depth 16."""
  import transformers
  config = getattr(transformers, f"{family}Config")(
      vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=80, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, num_labels=3, type_vocab_size=2, pad_token_id=1,
      **({"embedding_size": 32} if family == "Electra" else {}))
  name = f"Flax{family}For{head}" if head else f"Flax{family}Model"
  return getattr(transformers, name)(config, seed=0)


def _model(family: str, kind: str, attention_path: str, pooling: str = "default"):
  head = {"token_classification": "TokenClassification"}.get(kind, "SequenceClassification")
  hf = _hf_model(family, "" if pooling == "mean" else head)
  params = hf.params
  if pooling == "mean":
    rng = np.random.default_rng(1)
    params = {hf.base_model_prefix: params,
              "classifier": {"kernel": rng.standard_normal((64, 3)).astype(np.float32) * 0.1,
                             "bias": np.zeros((3,), np.float32)}}
  return models.Model(hf, params, pooling, "", hf.config, attention_path)


def _data(kind: str, n: int = 13, pairs: bool = False, seed: int = 0) -> Encoded:
  """Random examples of odd lengths 3..40 ([CLS]=2 ... [SEP]=3), pairs with type ids 0 then 1;
  labels per example, or per token with some positions unscored."""
  rng = np.random.default_rng(seed)
  ids, types, tags, tag_weights = [], [], [], []
  for _ in range(n):
    length = int(rng.integers(3, 41))
    ids.append(np.concatenate([[2], rng.integers(5, 120, length - 2), [3]]).astype(np.int32))
    t = np.zeros(length, np.int32)
    if pairs:
      t[int(rng.integers(1, length)):] = 1
    types.append(t)
    tags.append(rng.integers(0, 3, length).astype(np.int32))
    w = (rng.random(length) < 0.7).astype(np.float32)
    w[0] = w[-1] = 0
    tag_weights.append(w)
  if kind == "token_classification":
    return Encoded(ids, types, tags, tag_weights)
  return Encoded(ids, types, rng.integers(0, 3, n).astype(np.int32))


@functools.cache
def _reference_logits(family: str, kind: str, pairs: bool, pooling: str) -> list[np.ndarray]:
  """Unpacked logits by Hugging Face's own attention: what every packed path must give."""
  return _unpacked_logits(_model(family, kind, "hf", pooling), _data(kind, pairs=pairs))


def _unpacked_logits(model, data: Encoded) -> list[np.ndarray]:
  idx = np.arange(len(data))
  batch = batching.make_batch(data, idx, len(data), batching.bucket_lengths(48, (48,)))
  logits = np.asarray(model.logits(model.params, batch, None, False))
  if logits.ndim == 3:
    return [logits[i, :len(data.input_ids[i])] for i in idx]
  return list(logits)


def _packed_batch(data: Encoded, length: int = 64, groups: int = 1):
  placement = packing.pack_step(data.lengths, np.arange(len(data)), length, groups, 8)
  rows = packing.rows_needed(placement) * groups
  shape = packing.Shape(rows, length, packing.round_up(len(data) + 3, groups), groups)
  return packing.make_packed_batch(data, placement, shape)


def _packed_logits(model, data: Encoded, batch) -> list[np.ndarray]:
  logits = np.asarray(model.logits(model.params, batch, None, False))
  out = [None] * len(data)
  for slot, i in enumerate(batch["index"]):
    if i < 0:
      continue
    if logits.ndim == 3:
      start, n = batch["example_start"][slot], batch["example_length"][slot]
      out[i] = logits[batch["example_row"][slot], start:start + n]
    else:
      out[i] = logits[slot]
  return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention_path", ATTENTION)
@pytest.mark.parametrize("kind,pairs,pooling", [
    ("classification", False, "default"), ("classification", True, "default"),
    ("token_classification", False, "default"), ("regression", True, "mean")])
def test_packed_logits_equal_unpacked(family, attention_path, kind, pairs, pooling):
  if attention_path == "kernel":
    pytest.importorskip("jaxft.cpu.attention")
  model = _model(family, kind, attention_path, pooling)
  data = _data(kind, pairs=pairs)
  batch = _packed_batch(data)
  assert batch["input_ids"].shape[0] < len(data), "several examples share rows"
  expected = _reference_logits(family, kind, pairs, pooling)
  got = _packed_logits(model, data, batch)
  worst = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected))
  scale = max(float(np.max(np.abs(e))) for e in expected)
  assert worst <= 1e-5 * max(scale, 1.0), (worst, scale)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["classification", "token_classification"])
def test_packed_step_equals_unpacked(family, kind):
  """One training step's loss and gradients (dropout off) from packed rows, in two groups and
  two accumulated micro-batches, equal the unpacked step's."""
  model = _model(family, kind, "jaxft")
  task = tasks.make(kind, ("a", "b", "c"))
  data = _data(kind, n=16, pairs=True, seed=3)
  import optax
  # An "optimizer" whose state is the last gradient: the step's gradient, read back exactly.
  keep_grads = optax.GradientTransformation(
      lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
      lambda g, s, p=None: (jax.tree_util.tree_map(jnp.zeros_like, g), g))

  def run(batch, accum):
    fn = step_lib.make_train_step(model.logits, task.loss, keep_grads, lambda s: 0.0, accum,
                                  nonfinite_guard="select")
    state, metrics = jax.jit(fn)(step_lib.init_state(model.params, keep_grads, 0), {}, batch)
    return float(metrics["loss"]), state["opt_state"]

  unpacked = batching.make_batch(data, np.arange(16), 16, batching.bucket_lengths(48, (48,)))
  loss, grads = run(unpacked, 1)
  packed = _packed_batch(data, groups=2)
  packed_loss, packed_grads = run(packed, 2)
  assert packed_loss == pytest.approx(loss, rel=1e-5)
  largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads))
  diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads,
                                 packed_grads)
  assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5 * largest


def test_first_fit_decreasing_places_every_example_once():
  lengths = np.random.default_rng(0).integers(3, 40, 200)  # short sentences, rows of 128
  rows = packing.first_fit_decreasing(lengths, 128, 12)
  placed = sorted(i for row in rows for i in row)
  assert placed == list(range(200))
  assert all(sum(lengths[row]) <= 128 and len(row) <= 12 for row in rows)
  assert len(rows) <= -(-sum(lengths) // 128) + 1  # at most one row more than the tokens need


def test_token_budget_steps_cover_the_epoch_deterministically():
  lengths = np.random.default_rng(1).integers(3, 70, 1000)
  shape = packing.token_budget_shape(lengths, 32, 128, groups=2)
  steps = packing.token_budget_steps(lengths, shape, packing.max_per_row(lengths, 128), 0, 0)
  again = packing.token_budget_steps(lengths, shape, packing.max_per_row(lengths, 128), 0, 0)
  assert steps == again
  other = packing.token_budget_steps(lengths, shape, packing.max_per_row(lengths, 128), 0, 1)
  assert steps != other
  placed = sorted(i for s in steps for g in s for r in g for i in r)
  assert placed == list(range(1000))
  tokens = sum(lengths)
  assert tokens / (len(steps) * shape.rows * shape.length) > 0.9
  mean_examples = 1000 / len(steps)
  assert 24 <= mean_examples <= 40, mean_examples


@pytest.mark.parametrize("kind", ["classification", "token_classification", "mlm"])
def test_packed_evaluation_gives_the_unpacked_metrics(tiny_config, tmp_path, kind):
  """Every example scored once, outputs back in input order: the metrics of packed evaluation
  are the unpacked ones (counts exactly, losses and perplexity to float32 rounding)."""
  from jaxft import config as config_lib, experiment, inference
  from test_tasks import _tagged_sentences, _write_conll
  values = {"model.pooling": "default"}
  if kind == "token_classification":
    values.update({"task.kind": kind, "data.format": "conll",
                   "data.train_file": _write_conll(tmp_path / "t.conll", _tagged_sentences(40, 0)),
                   "data.validation_file": _write_conll(tmp_path / "d.conll",
                                                        _tagged_sentences(30, 1)),
                   "data.max_seq_length": 16})  # long sentences become several windows
  elif kind == "mlm":
    values.update({"task.kind": kind})
  results = {}
  for mode in ("off", "tokens"):
    config = config_lib.replace(tiny_config, {**values, "data.packing": mode})
    exp = experiment.build(config, devices=jax.devices()[:1])
    data = exp.load_split("validation")
    results[mode] = inference.Predictor(exp).evaluate(exp.trainable_init, data)
  off, packed = results["off"], results["tokens"]
  assert set(off) == set(packed)
  for name, value in off.items():
    if isinstance(value, (list, dict, int)) or name in ("accuracy", "f1", "precision", "recall"):
      assert packed[name] == value, name  # counts and the metrics computed from them
    else:
      assert packed[name] == pytest.approx(value, rel=1e-5), name


def test_a_run_keeps_its_packing_groups_and_refuses_a_mesh_that_cannot_split_them(tiny_config):
  from jaxft import config as config_lib, experiment
  from jaxft.errors import UserError
  built = experiment.build(config_lib.replace(tiny_config, {
      "data.packing": "tokens", "train.grad_accum_steps": 2}), devices=jax.devices()[:1])
  assert built.config.data.packing_groups == 2  # recorded: 1 device x 2 micro-batches
  assert built.train_order(built.train_data).shape.groups == 2
  resumed = experiment.build(config_lib.replace(tiny_config, {
      "data.packing": "tokens", "data.packing_groups": 3, "train.grad_accum_steps": 2}),
      devices=jax.devices()[:1])
  with pytest.raises(UserError, match=r"data.packing_groups=3 .* not a multiple of .* = 2"):
    resumed.train_order(resumed.train_data)
