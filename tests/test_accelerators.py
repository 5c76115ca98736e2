"""The accelerator path, proven on the CPU: platform defaults resolved at start and recorded,
the GPU train step lowered for CUDA without a conditional, and a run on GPU defaults trained
here end to end (bfloat16, the fused attention path, the select guard)."""

import json
import os

import jax
import numpy as np
import pytest
from jax import export

from jaxft import (attention, compiled, config as config_lib, experiment, step as step_lib,
                   train)


def _built(config, platform, **changes):
  return experiment.build(config_lib.replace(config, changes) if changes else config,
                          platform=platform)


@pytest.mark.parametrize("platform, dtype, attention, dropout", [
    ("cpu", "float32", "kernel", 0.0), ("gpu", "bfloat16", "fused", 0.0),
    ("tpu", "bfloat16", "fused", 0.0)])
def test_platform_defaults_are_resolved_at_start(tiny_config, platform, dtype, attention,
                                                 dropout):
  """The tiny model's checkpoint drops nothing (attention_probs_dropout_prob=0.0), so the
  resolved attention dropout is 0.0 everywhere here; the next test changes it."""
  exp = _built(tiny_config, platform)
  assert exp.config.train.compute_dtype == dtype
  assert exp.model.attention == attention
  assert exp.config.model.attention_dropout == dropout
  assert exp.platform == platform
  recorded = json.loads(config_lib.to_json(exp.config))
  assert recorded["train"]["compute_dtype"] == dtype  # what config.json holds


def test_attention_dropout_is_zero_on_the_fused_path_else_the_checkpoints(tiny_config, tmp_path,
                                                                         minilm_dir):
  from conftest import make_tiny_model
  dropping = make_tiny_model(tmp_path / "dropping", minilm_dir, dropout=0.1)
  config = config_lib.replace(tiny_config, {"model.name_or_path": dropping})
  assert _built(config, "gpu").config.model.attention_dropout == 0.0
  assert _built(config, "cpu").config.model.attention_dropout == pytest.approx(0.1)
  explicit = _built(config, "gpu", **{"model.attention_dropout": 0.05,
                                      "train.compute_dtype": "float32"})
  assert explicit.config.model.attention_dropout == pytest.approx(0.05)  # explicit wins
  assert explicit.config.train.compute_dtype == "float32"
  assert explicit.model.hf_config.attention_probs_dropout_prob == pytest.approx(0.05)


def _lowered_train_step(exp, platforms):
  tx, learning_rate = exp.optimizer(10)
  abstract = exp.abstract_state(tx)
  step = compiled.train_step(exp, tx, learning_rate, abstract)
  batch = step.device_batch(exp.host_batch(exp.train_data, np.arange(16), 16))
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  ours = [export.DisabledSafetyCheck.custom_call(t) for t in attention.custom_call_targets()]
  return export.export(step._programs.jitted, platforms=platforms, disabled_checks=ours)(
      abstract, jax.tree_util.tree_map(spec, exp.frozen()),
      jax.tree_util.tree_map(spec, batch)).mlir_module()


def test_the_gpu_train_step_has_no_conditional(tiny_config):
  """Lowered for CUDA on this machine (jax.export): no stablehlo.if/case, which XLA:GPU would
  run by copying the predicate to the host every step. The CPU step keeps its lax.cond. (cuDNN's
  attention cannot be lowered without a GPU runtime: 'cuDNN is not detected'.)"""
  assert step_lib.nonfinite_guard_for("gpu") == "select"
  gpu = _lowered_train_step(_built(tiny_config, "gpu"), ["cuda"])
  assert "stablehlo.if" not in gpu and "stablehlo.case" not in gpu
  assert "bf16" in gpu  # it computes in bfloat16
  cpu = _lowered_train_step(_built(tiny_config, "cpu"), ["cpu"])
  assert "stablehlo.case" in cpu or "stablehlo.if" in cpu


def test_a_run_on_gpu_defaults_trains_here_and_a_resume_keeps_its_choices(tiny_config, tmp_path):
  """The GPU path end to end on the CPU: bfloat16, fused attention (XLA's), the select guard.
  config.json records the resolved values, and resuming on the CPU keeps them."""
  workdir = str(tmp_path / "run")
  config = config_lib.replace(tiny_config, {"train.num_epochs": 4.0})
  final = train.train_and_evaluate(config, workdir, platform="gpu")
  assert final["accuracy"] > 0.8
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = json.load(f)
  assert recorded["train"]["compute_dtype"] == "bfloat16"
  assert recorded["model"]["attention_dropout"] == 0.0
  with open(os.path.join(workdir, "run.json")) as f:
    assert json.load(f)["attention"] == "fused"
  longer = config_lib.replace(config, {"train.num_epochs": 5.0})
  train.train_and_evaluate(longer, workdir)  # resumed on this machine's defaults
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["compute_dtype"] == "bfloat16"
