"""PEFT as subtree masking: partitions, LoRA, frozen leaves, checkpoints, export and interop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxft import (compiled, config as config_lib, evaluate, experiment, export, inference,
                   models, optim, peft, rules, train)
from jaxft.data import batching
from jaxft.errors import UserError
from jaxft.step import combine


def _paths(tree):
  return sorted("/".join(k) for k in traverse_util.flatten_dict(tree))


def _set(config, **values):
  with config.unlocked():
    for key, value in values.items():
      section, *rest = key.split("__")
      target = config[section]
      for part in rest[:-1]:
        target = target[part]
      target[rest[-1]] = value
  return config


def test_lora_on_the_default_model_trains_under_half_a_percent(tiny_config, minilm_dir):
  _set(tiny_config, model__name_or_path="minilm", model__pooling="default", peft__method="lora",
       data__max_seq_length=32)
  exp = experiment.build(tiny_config)
  counts = exp.param_counts()
  lora_params = 6 * 2 * (384 * 8 + 8 * 384)  # 6 layers x (query, value) x (A + B)
  head_params = 384 * 2 + 2
  assert counts["trainable"] == lora_params + head_params == 74498
  assert counts["trainable"] / counts["total"] < 0.005
  assert counts["total"] == 22713986 + lora_params
  paths = _paths(exp.trainable_init)
  assert all(p.startswith("lora/") or p.startswith("classifier/") for p in paths)
  assert "lora/bert/encoder/layer/5/attention/self/value/lora_b" in paths
  # Optimizer state: Adam's two moments of the trainable leaves only (plus scalar step counts).
  tx, _ = exp.optimizer(10)
  opt_leaves = jax.tree_util.tree_leaves(jax.eval_shape(tx.init, exp.trainable_init))
  assert sum(int(np.prod(x.shape)) for x in opt_leaves if x.shape) == 2 * counts["trainable"]


def test_lora_starts_exactly_at_the_pretrained_function(tiny_config):
  base = experiment.build(tiny_config)
  lora = experiment.build(_set(tiny_config, peft__method="lora"))
  batch = batching.make_batch(base.train_data, np.arange(8), 8, base.buckets)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  want = base.logits(combine(base.trainable_init, base.frozen_init), batch, None, False)
  got = lora.logits(combine(lora.trainable_init, lora.frozen_init), batch, None, False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


def test_no_gradient_is_computed_for_frozen_leaves(tiny_config):
  """The step's outputs hold only trainable shapes, and it does far less work than full FT."""
  def compiled_step(config):
    exp = experiment.build(config)
    tx, learning_rate = exp.optimizer(10)
    abstract = exp.abstract_state(tx)
    train_step = compiled.train_step(exp, tx, learning_rate, abstract)
    host = batching.make_batch(exp.train_data, np.arange(16), 16, exp.buckets)
    batch = train_step.device_batch(host)
    lowered = train_step._programs.jitted.lower(abstract, exp.frozen(), batch)
    out_state = jax.eval_shape(train_step._programs.jitted, abstract, exp.frozen(), batch)[0]
    return exp, out_state, lowered.compile().cost_analysis()

  full_exp, full_state, full_cost = compiled_step(tiny_config)
  lora_exp, lora_state, lora_cost = compiled_step(_set(tiny_config, peft__method="lora"))
  trainable = set(_paths(lora_exp.trainable_init))
  assert set(_paths(lora_state["params"])) == trainable
  frozen_kernel = "bert/encoder/layer/0/intermediate/dense/kernel"
  assert frozen_kernel in _paths(lora_exp.frozen_init)
  opt_paths = [rules.path(kp) for kp, _ in
               jax.tree_util.tree_flatten_with_path(lora_state["opt_state"])[0]]
  assert not any(frozen_kernel in p for p in opt_paths)
  # Weight gradients of frozen kernels are never formed: the LoRA step needs fewer FLOPs.
  full_flops = (full_cost[0] if isinstance(full_cost, list) else full_cost)["flops"]
  lora_flops = (lora_cost[0] if isinstance(lora_cost, list) else lora_cost)["flops"]
  assert lora_flops < 0.8 * full_flops


def test_bitfit_and_freeze_partitions(tiny_config):
  bitfit = experiment.build(_set(tiny_config, peft__method="bitfit"))
  assert all(p.endswith("/bias") or p.startswith("classifier/")
             for p in _paths(bitfit.trainable_init))
  assert "bert/encoder/layer/1/output/dense/bias" in _paths(bitfit.trainable_init)
  top = experiment.build(_set(tiny_config, peft__method="freeze",
                              peft__trainable_rules=((r".*layer/1/.*", True),)))
  paths = _paths(top.trainable_init)
  assert paths and all("layer/1/" in p or p.startswith("classifier/") for p in paths)
  head = experiment.build(_set(tiny_config, peft__method="freeze", peft__trainable_rules=()))
  assert _paths(head.trainable_init) == ["classifier/bias", "classifier/kernel"]


def test_rules_that_match_nothing_name_the_pattern(tiny_config):
  with pytest.raises(UserError, match=r"'.\*layer/17/.\*' matches no parameter; nearby names"):
    experiment.build(_set(tiny_config, peft__method="freeze",
                          peft__trainable_rules=((r".*layer/17/.*", True),)))
  with pytest.raises(UserError, match="peft.lora.targets .* matches no"):
    experiment.build(_set(tiny_config, peft__method="lora", peft__lora__targets=r".*/qkv/kernel",
                          peft__trainable_rules=()))
  with pytest.raises(UserError, match="leaves no parameter trainable"):
    experiment.build(_set(tiny_config, peft__method="freeze", peft__train_head=False,
                          peft__lora__targets=config_lib.DEFAULT_LORA_TARGETS))


def test_all_linear_targets_every_dense_kernel_but_the_head(tiny_config):
  exp = experiment.build(_set(tiny_config, peft__method="lora", peft__lora__targets="all-linear"))
  lora = _paths(exp.trainable_init[peft.LORA_KEY])
  assert len(lora) == 2 * (2 * 6 + 1)  # 2 layers x 6 Dense + pooler, A and B each
  assert not any("classifier" in p for p in lora)


def test_layer_wise_learning_rate_decay():
  params = {"bert": {"embeddings": {"word_embeddings": {"embedding": 0}},
                     "encoder": {"layer": {str(i): {"k": 0} for i in range(3)}}},
            "classifier": {"kernel": 0}}
  m = optim.lr_multipliers(params, layer_decay=0.5, num_layers=3)
  assert m["bert"]["encoder"]["layer"]["2"]["k"] == 1.0
  assert m["bert"]["encoder"]["layer"]["0"]["k"] == 0.25
  assert m["bert"]["embeddings"]["word_embeddings"]["embedding"] == 0.125
  assert m["classifier"]["kernel"] == 1.0
  m = optim.lr_multipliers(params, rules=((r"classifier/.*", 10.0),))
  assert m["classifier"]["kernel"] == 10.0 and m["bert"]["encoder"]["layer"]["0"]["k"] == 1.0


def _train_lora(tiny_config, workdir):
  _set(tiny_config, peft__method="lora", model__pooling="default", train__learning_rate=1e-2,
       train__num_epochs=2.0)
  final = train.train_and_evaluate(tiny_config, workdir)
  return final


def test_lora_checkpoint_holds_only_the_trainable_subtree(tiny_config, tmp_path):
  workdir = str(tmp_path / "lora")
  final = _train_lora(tiny_config, workdir)
  exp, step, params = inference.restore(workdir, "best")
  assert _paths(params) == _paths(exp.trainable_init)
  record = evaluate.evaluate_checkpoint(workdir, "best")
  for key in ("accuracy", "macro_f1", "mcc", "loss"):
    assert record["metrics"][key] == pytest.approx(final[key], abs=1e-6)
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(os.path.join(workdir, "checkpoints")) for f in files)
  assert size < 0.1 * 4 * models.count_params(exp.frozen_init)  # far below the frozen weights
  # Prediction from the LoRA checkpoint gives evaluation's per-example labels.
  from jaxft import predict
  out = predict.predict(workdir, tiny_config.data.validation_file, str(tmp_path / "p.jsonl"))
  evaluated = [json.loads(line) for line in open(os.path.join(
      workdir, "eval", f"validation-step{record['step']}-predictions.jsonl"))]
  assert [r["label"] for r in out] == [r["label"] for r in evaluated] and len(out) == 70


def test_restoring_on_a_different_base_model_is_refused(tiny_config, tmp_path):
  workdir = str(tmp_path / "lora")
  _train_lora(_set(tiny_config, train__num_train_steps=2), workdir)
  import json, shutil
  config_path = os.path.join(workdir, "config.json")
  saved = json.load(open(config_path))
  other = tmp_path / "other_base"
  shutil.copytree(saved["model"]["name_or_path"], other)
  from flax import serialization
  params = serialization.msgpack_restore(open(other / "flax_model.msgpack", "rb").read())
  params["pooler"]["dense"]["bias"] = params["pooler"]["dense"]["bias"] + 1.0
  (other / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
  saved["model"]["name_or_path"] = str(other)
  json.dump(saved, open(config_path, "w"))
  with pytest.raises(UserError, match="different base model"):
    inference.restore(workdir, "latest")


def test_exports_match_the_unmerged_model(tiny_config, tmp_path):
  workdir = str(tmp_path / "lora")
  _train_lora(tiny_config, workdir)
  exp, _, params = inference.restore(workdir, "best")
  host = batching.make_batch(exp.load_split("validation"), np.arange(32), 32, exp.buckets)
  batch = {k: jnp.asarray(v) for k, v in host.items()}
  ours = np.asarray(exp.logits(combine(jax.device_get(params), exp.frozen_init), batch, None,
                               False))
  assert np.abs(ours).max() > 0.1  # trained, not the zero-init head

  merged = str(tmp_path / "merged")
  export.export(workdir, merged, "hf")
  from transformers import FlaxAutoModelForSequenceClassification
  flax_model = FlaxAutoModelForSequenceClassification.from_pretrained(merged)
  assert flax_model.config.id2label == {0: "0", 1: "1"}
  flax_logits = np.asarray(flax_model(host["input_ids"], host["attention_mask"],
                                      host["token_type_ids"]).logits)
  np.testing.assert_allclose(flax_logits, ours, atol=1e-5)

  adapter = str(tmp_path / "adapter")
  export.export(workdir, adapter, "peft")
  assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
  with pytest.raises(UserError, match="exists and is not empty"):
    export.export(workdir, adapter, "peft")

  torch = pytest.importorskip("torch", reason="torch is not installed (launch/setup.sh adds it)")
  peft_lib = pytest.importorskip("peft", reason="peft is not installed")
  from transformers import AutoModelForSequenceClassification
  inputs = {k: torch.tensor(host[k]).long() for k in ("input_ids", "attention_mask",
                                                       "token_type_ids")}
  with torch.no_grad():
    torch_merged = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    np.testing.assert_allclose(torch_merged(**inputs).logits.numpy(), ours, atol=1e-4)
    base = AutoModelForSequenceClassification.from_pretrained(exp.model_dir, num_labels=2)
    with_adapter = peft_lib.PeftModel.from_pretrained(base, adapter).eval()
    np.testing.assert_allclose(with_adapter(**inputs).logits.numpy(), ours, atol=1e-4)
