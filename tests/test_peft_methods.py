"""PEFT methods on the same trainable/frozen split: IA3, DoRA, bottleneck adapters, prompt and
prefix tuning. Identity at the start, what trains, virtual tokens in every attention path and
packed, checkpoints and resume, and PyTorch PEFT interop of the exports."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxft import evaluate, experiment, export, inference, peft, predict, train
from jaxft.data import batching, tokens
from jaxft.data.encode import Encoded, with_virtual_tokens
from jaxft.errors import UserError
from jaxft.step import combine
from tests import test_packing
from tests.test_peft import _paths, _set

METHODS = {
    "ia3": dict(peft__method="ia3"),
    "dora": dict(peft__method="lora", peft__lora__use_dora=True),
    # Bottlenecks of 8 on the tiny model (width 32): 2 ReLU units could both be dead.
    "houlsby": dict(peft__method="adapter", peft__adapter__reduction_factor=4),
    "pfeiffer": dict(peft__method="adapter", peft__adapter__kind="pfeiffer",
                     peft__adapter__reduction_factor=4),
    "prompt": dict(peft__method="prompt", peft__prompt__num_virtual_tokens=4),
    "prefix": dict(peft__method="prefix", peft__prefix__num_virtual_tokens=4),
    "prefix_mlp": dict(peft__method="prefix", peft__prefix__num_virtual_tokens=4,
                       peft__prefix__projection_dim=16),
}
IDENTITY_AT_START = ("ia3", "dora", "houlsby", "pfeiffer")


def _batch(exp, n=8, split=None):
  data = exp.train_data if split is None else exp.load_split(split)
  host = batching.make_batch(data, np.arange(n), n, exp.buckets)
  return {k: jnp.asarray(v) for k, v in host.items()}, host


def _logits(exp, params, batch):
  return np.asarray(exp.logits(combine(params, exp.frozen_init), batch, None, False))


def _perturbed(tree, seed=0, scale=0.3):
  """The tree with every leaf moved randomly (multiplicatively for scales and magnitudes)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x) + scale * rng.standard_normal(np.shape(x)).astype(np.float32)
      * (np.abs(np.asarray(x)).mean() or 1.0), tree)


@pytest.mark.parametrize("pooling", ["default", "mean"])
@pytest.mark.parametrize("method", IDENTITY_AT_START)
def test_methods_start_as_the_pretrained_function_and_then_change_it(tiny_config, method,
                                                                     pooling):
  base = experiment.build(_set(tiny_config, model__pooling=pooling))
  batch, _ = _batch(base)
  # A head of unit scale, so that the logits show what the encoder does.
  head = {"kernel": np.random.default_rng(0).standard_normal((32, 2)).astype(np.float32),
          "bias": np.zeros((2,), np.float32)}
  want = _logits(base, {**base.trainable_init, "classifier": head}, batch)
  exp = experiment.build(_set(tiny_config, **METHODS[method]))
  got = _logits(exp, {**exp.trainable_init, "classifier": head}, batch)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  # Moving only the method's parameters moves the logits (mean pooling runs the base module
  # alone: its module paths must still find the method's parameters).
  key = peft.LORA_KEY if method == "dora" else peft.IA3_KEY if method == "ia3" else "adapter"
  moved = {**exp.trainable_init, "classifier": head, key: _perturbed(exp.trainable_init[key])}
  assert np.abs(_logits(exp, moved, batch) - want).max() > 1e-3  # float error: 1e-6


def test_parameter_counts_on_the_default_model(tiny_config, minilm_dir):
  """Exact counts for all-MiniLM-L6-v2 (6 layers, width 384, FFN 1536) and the 2-label head."""
  head = 384 * 2 + 2
  expected = {
      "ia3": 6 * (384 + 384 + 384 + 1536),  # key, value out; attention and FFN output in
      "dora": 6 * 2 * (384 * 8 + 8 * 384 + 384),  # query, value: A, B, magnitude
      "houlsby": 12 * (384 * 24 + 24 + 24 * 384 + 384),  # 2 per layer, bottleneck 384 / 16
      "pfeiffer": 6 * (384 * 24 + 24 + 24 * 384 + 384),
      "prompt": 20 * 384,
      "prefix": 6 * 2 * 20 * 384,
  }
  for method, count in expected.items():
    values = {**METHODS[method], "peft__prompt__num_virtual_tokens": 20,
              "peft__prefix__num_virtual_tokens": 20, "peft__adapter__reduction_factor": 16}
    exp = experiment.build(_set(tiny_config, model__name_or_path="minilm",
                                model__pooling="default", data__max_seq_length=64, **values))
    counts = exp.param_counts()
    assert counts["trainable"] == count + head, method
    assert counts["total"] == 22713986 + count, method
    key = {"dora": "lora", "houlsby": "adapter", "pfeiffer": "adapter"}.get(method, method)
    assert set(exp.trainable_init) == {key, "classifier"}, method
    # Optimizer state: Adam's two moments of the trainable leaves only.
    tx, _ = exp.optimizer(10)
    moments = jax.tree_util.tree_leaves(jax.eval_shape(tx.init, exp.trainable_init))
    assert sum(int(np.prod(x.shape)) for x in moments if x.shape) == 2 * counts["trainable"]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_parameter_receives_a_gradient(tiny_config, method):
  exp = experiment.build(_set(tiny_config, model__pooling="default", **METHODS[method]))
  batch, _ = _batch(exp, 16)
  key = next(k for k in exp.trainable_init if k in peft.METHOD_KEYS)
  start = {**exp.trainable_init, key: _perturbed(exp.trainable_init[key], scale=0.05)}

  def loss(params):
    logits = exp.logits(combine(params, exp.frozen_init), batch, None, False)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), batch["labels"]])

  grads = traverse_util.flatten_dict(jax.grad(loss)(start)[key])
  assert grads and all(float(jnp.abs(g).max()) > 0 for g in grads.values()), method


def test_virtual_tokens_take_their_places_within_the_length(tiny_config):
  prompt = experiment.build(_set(tiny_config, data__max_seq_length=12, **METHODS["prompt"]))
  prefix = experiment.build(_set(tiny_config, data__max_seq_length=12, **METHODS["prefix"]))
  base = experiment.build(_set(tiny_config, data__max_seq_length=8, peft__method="none"))
  for exp in (prompt, prefix):
    assert max(len(x) for x in exp.train_data.input_ids) <= 12
  for p, q, b in zip(prompt.train_data.input_ids, prefix.train_data.input_ids,
                     base.train_data.input_ids):
    assert list(p) == [-1, -2, -3, -4] + list(b)  # before the text: its positions shift
    assert list(q) == list(b) + [-1, -2, -3, -4]  # after: the text keeps its positions


def test_virtual_tokens_shift_token_labels_and_the_word_map():
  words = tokens.WordMap([["a", "b"]], None, np.asarray([0]), [np.asarray([-1, 0, 1, -1])])
  data = Encoded([np.asarray([101, 7, 8, 102], np.int32)], [np.zeros(4, np.int32)],
                 [np.asarray([0, 3, 4, 0], np.int32)], [np.asarray([0, 1, 1, 0], np.float32)],
                 words)
  prompt = with_virtual_tokens(data, 2, before=True)
  assert list(prompt.input_ids[0]) == [-1, -2, 101, 7, 8, 102]
  assert list(prompt.labels[0]) == [0, 0, 0, 3, 4, 0]
  assert list(prompt.label_weights[0]) == [0, 0, 0, 1, 1, 0]
  assert list(prompt.words.position_word[0]) == [-1, -1, -1, 0, 1, -1]
  # Per-word predictions read back from the shifted positions.
  logits = np.arange(6)[:, None] * np.ones((1, 3))
  (sentence,) = prompt.words.sentence_predictions([logits])
  assert sentence.tolist() == [[3, 3, 3], [4, 4, 4]]  # words "a" and "b": positions 3 and 4
  prefix = with_virtual_tokens(data, 2, before=False)
  assert list(prefix.input_ids[0]) == [101, 7, 8, 102, -1, -2]
  assert list(prefix.words.position_word[0]) == [-1, 0, 1, -1, -1, -1]


def test_methods_compose_through_the_rules(tiny_config):
  exp = experiment.build(_set(tiny_config, peft__method="lora+bitfit"))
  paths = _paths(exp.trainable_init)
  assert "lora/bert/encoder/layer/1/attention/self/value/lora_b" in paths
  assert "bert/encoder/layer/1/output/dense/bias" in paths
  assert "bert/encoder/layer/1/output/dense/kernel" not in paths
  assert {p.split("/")[0] for p in paths} == {"lora", "bert", "classifier"}
  exp = experiment.build(_set(tiny_config, peft__method="prefix+ia3",
                              peft__prefix__num_virtual_tokens=4))
  assert set(exp.trainable_init) == {"prefix", "ia3", "classifier"}


def test_merged_weights_give_the_unmerged_logits_when_methods_share_a_layer(tiny_config):
  """DoRA on every linear layer with IA3 (whose input scales sit on the output/dense layers
  DoRA also edits): folding both into the weights, as --format=hf does, changes no logit."""
  exp = experiment.build(_set(tiny_config, peft__method="lora+ia3", peft__lora__use_dora=True,
                              peft__lora__targets="all-linear"))
  batch, _ = _batch(exp)
  head = {"kernel": np.random.default_rng(0).standard_normal((32, 2)).astype(np.float32),
          "bias": np.zeros((2,), np.float32)}
  methods = {key: _perturbed(exp.trainable_init[key], seed=i)
             for i, key in enumerate((peft.LORA_KEY, peft.IA3_KEY))}
  want = _logits(exp, {**exp.trainable_init, **methods, "classifier": head}, batch)
  full = combine({"classifier": head}, exp.frozen_init)
  merged = peft.merge(full, methods, peft.settings(exp.config.peft))
  plain = experiment.build(_set(tiny_config, peft__method="none"))
  got = np.asarray(plain.logits(merged, batch, None, False))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["Bert", "Roberta", pytest.param("Electra",
                                                                    marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_packed_equal_unpacked_in_every_attention_path(family, method):
  """Prompt and prefix tuning on BERT, RoBERTa and ELECTRA, sentences and token tags: every
  attention path, packed or not, gives Hugging Face's unpacked logits."""
  count, before = 3, method == "prompt"
  s = peft.Settings(virtual_tokens=count)
  for kind in ("classification", "token_classification"):
    data = with_virtual_tokens(test_packing._data(kind), count, before)
    reference = None
    for path in test_packing.ATTENTION:
      if path == "kernel":
        pytest.importorskip("jaxft.cpu.attention")
      model = test_packing._model(family, kind, path)
      width = model.params[model.base_prefix]["embeddings"]["word_embeddings"][
          "embedding"].shape[1]
      cfg = model.hf_config
      rng = np.random.default_rng(5)  # the same method parameters for every path
      tree = ({"prompt": {"embeddings": rng.standard_normal((count, width)).astype(np.float32)}}
              if before else {"prefix": {"keys": rng.standard_normal(
                  (cfg.num_hidden_layers, count, cfg.hidden_size)).astype(np.float32),
                  "values": rng.standard_normal(
                      (cfg.num_hidden_layers, count, cfg.hidden_size)).astype(np.float32)}})
      model = types.SimpleNamespace(logits=peft.with_methods(model.logits, s),
                                    params={**model.params, **tree})
      if reference is None:
        reference = test_packing._unpacked_logits(model, data)
        continue
      for got in (test_packing._unpacked_logits(model, data),
                  test_packing._packed_logits(model, data, test_packing._packed_batch(data))):
        worst = max(float(np.max(np.abs(g - e))) for g, e in zip(got, reference))
        assert worst <= 1e-5 * max(1.0, max(float(np.abs(e).max()) for e in reference)), (
            kind, path, worst)


def _train(config, workdir, **values):
  _set(config, model__pooling="default", train__learning_rate=1e-2, train__num_epochs=2.0,
       **values)
  return train.train_and_evaluate(config, workdir)


# Prompt tuning (virtual tokens through data, packing and the interceptor) in the default run;
# the others with `-m slow` (about 15 s each).
@pytest.mark.parametrize("method", ["prompt"] + [
    pytest.param(m, marks=pytest.mark.slow) for m in METHODS if m != "prompt"])
def test_each_method_resumes_exactly_and_its_checkpoint_holds_what_trains(tiny_config, tmp_path,
                                                                          method):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  # A constant rate: stopping the first part at step 10 leaves the schedule as it was.
  _set(tiny_config, train__lr_schedule="constant")
  final = _train(tiny_config, straight, **METHODS[method])
  _train(_set(tiny_config, train__num_train_steps=10), resumed, **METHODS[method])
  _set(tiny_config, train__num_train_steps=None)
  _train(tiny_config, resumed, **METHODS[method])
  exp, _, a = inference.restore(straight, "latest")
  _, _, b = inference.restore(resumed, "latest")
  key = next(k for k in exp.trainable_init if k in peft.METHOD_KEYS)
  assert {p.split("/")[0] for p in _paths(a)} == {key, "classifier"}
  assert _paths(a) == _paths(exp.trainable_init)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  record = evaluate.evaluate_checkpoint(straight, "latest")
  assert record["metrics"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)
  out = predict.predict(straight, tiny_config.data.validation_file, str(tmp_path / "p.jsonl"))
  assert len(out) == 70


def test_exports_that_cannot_hold_a_method_say_what_to_use(tiny_config, tmp_path):
  adapter = str(tmp_path / "adapter")
  _train(_set(tiny_config, train__num_train_steps=2), adapter, **METHODS["houlsby"])
  with pytest.raises(UserError, match="no PEFT format for BERT-family models: jaxft-evaluate"):
    export.export(adapter, str(tmp_path / "a_peft"), "peft")
  with pytest.raises(UserError, match="bottleneck adapters add layers"):
    export.export(adapter, str(tmp_path / "a_hf"), "hf")
  prompt = str(tmp_path / "prompt")
  _train(_set(tiny_config, train__num_train_steps=2), prompt, **METHODS["prompt"])
  with pytest.raises(UserError, match=r"use --format=peft \(loadable by PEFT's PeftModel\)"):
    export.export(prompt, str(tmp_path / "p_onnx"), "onnx")
  assert not os.path.exists(tmp_path / "a_peft") and not os.path.exists(tmp_path / "p_onnx")


@pytest.mark.parametrize("method", ["ia3", "dora", "prompt", "prefix_mlp"])
def test_peft_exports_load_in_pytorch_peft_with_jaxft_logits(tiny_config, tmp_path, method):
  torch = pytest.importorskip("torch", reason="torch is not installed (launch/setup.sh adds it)")
  peft_lib = pytest.importorskip("peft", reason="peft is not installed")
  from transformers import AutoModelForSequenceClassification
  workdir = str(tmp_path / method)
  _train(tiny_config, workdir, **METHODS[method])
  exp, _, params = inference.restore(workdir, "best")
  batch, host = _batch(exp, 32, "validation")
  ours = _logits(exp, jax.device_get(params), batch)
  moved = jax.tree_util.tree_leaves(params[next(k for k in params if k in peft.METHOD_KEYS)])
  start = jax.tree_util.tree_leaves(exp.trainable_init[next(
      k for k in params if k in peft.METHOD_KEYS)])
  assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(moved, start)) > 1e-3  # the method's parameters trained

  adapter = str(tmp_path / "adapter")
  export.export(workdir, adapter, "peft")
  config = json.load(open(os.path.join(adapter, "adapter_config.json")))
  assert config["peft_type"] == {"ia3": "IA3", "dora": "LORA", "prompt": "PROMPT_TUNING",
                                 "prefix_mlp": "PREFIX_TUNING"}[method]
  # The text's tokens (and padding) only: PEFT adds the virtual tokens itself.
  real = host["input_ids"] >= 0
  inputs = {k: torch.tensor(host[k][real].reshape(32, -1)).long()
            for k in ("input_ids", "attention_mask", "token_type_ids")}
  with torch.no_grad():
    base = AutoModelForSequenceClassification.from_pretrained(exp.model_dir, num_labels=2)
    with_adapter = peft_lib.PeftModel.from_pretrained(base, adapter).eval()
    theirs = with_adapter(**inputs).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  if method in ("ia3", "dora"):  # merged into a plain model too
    merged = str(tmp_path / "merged")
    export.export(workdir, merged, "hf")
    with torch.no_grad():
      plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
      np.testing.assert_allclose(plain(**inputs).logits.numpy(), ours, atol=1e-4)


def test_resuming_with_another_method_shape_is_refused(tiny_config, tmp_path):
  workdir = str(tmp_path / "prompt")
  _train(_set(tiny_config, train__num_train_steps=2), workdir, **METHODS["prompt"])
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(UserError, match="peft.prompt.num_virtual_tokens=4, not 6"):
    _train(tiny_config, workdir, **{**METHODS["prompt"], "peft__prompt__num_virtual_tokens": 6})
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
