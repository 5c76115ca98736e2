"""The train step: padding rows cost nothing, accumulation equals one big batch, eval counts all."""

import contextlib

import jax
import numpy as np
import pytest

from jaxft import compiled, experiment, inference, step as step_lib
from jaxft.data import batching


@pytest.fixture
def exp(tiny_config):
  return experiment.build(tiny_config)


def _run_one_step(exp, batch_np, accum=1, tx=None):
  optimizer, learning_rate = exp.optimizer(10)
  if tx is not None:  # another optimizer: no learning rate to report
    optimizer, learning_rate = tx, lambda state: 0.0
  tx = optimizer
  state = exp.init_state(tx)
  fn = jax.jit(step_lib.make_train_step(exp.model.logits, exp.task.loss, tx, learning_rate, accum))
  new_state, metrics = fn(state, {}, {k: jax.numpy.asarray(v) for k, v in batch_np.items()})
  return jax.device_get(new_state["params"]), jax.device_get(metrics)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def test_weightless_padding_rows_do_not_change_the_update(exp):
  data = exp.train_data
  idx = np.arange(6)
  small = batching.make_batch(data, idx, 8, exp.buckets)   # 6 real rows + 2 padding rows
  large = batching.make_batch(data, idx, 16, exp.buckets)  # 6 real rows + 10 padding rows
  p1, m1 = _run_one_step(exp, small)
  p2, m2 = _run_one_step(exp, large)
  assert m1["examples"] == m2["examples"] == 6
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  np.testing.assert_allclose(_flat(p1), _flat(p2), rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_equals_one_full_batch(exp):
  # The tiny model has dropout off, so micro-batching is the only difference. Plain SGD makes the
  # update the gradient itself: Adam's first step is ~lr * sign(g), which turns float32 rounding
  # of near-zero gradient entries into large relative differences.
  import optax
  batch = batching.make_batch(exp.train_data, np.arange(14), 16, exp.buckets)
  before = _flat(exp.init_state(optax.sgd(1.0))["params"])
  p1, m1 = _run_one_step(exp, batch, accum=1, tx=optax.sgd(1.0))
  p4, m4 = _run_one_step(exp, batch, accum=4, tx=optax.sgd(1.0))
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
  g1, g4 = before - _flat(p1), before - _flat(p4)
  assert np.abs(g1).max() > 1e-3  # a real update, not an empty one
  np.testing.assert_allclose(g4, g1, rtol=1e-3, atol=1e-6 * np.abs(g1).max())


def test_train_step_lowers_the_loss_on_a_repeated_batch(exp):
  tx, learning_rate = exp.optimizer(100)
  state = exp.init_state(tx)
  train_step = compiled.train_step(exp, tx, learning_rate, exp.abstract_state(tx))
  host = batching.make_batch(exp.train_data, np.arange(16), 16, exp.buckets)
  losses = []
  for _ in range(16):
    state, m = train_step(state, {}, train_step.device_batch(host))
    losses.append(float(m["loss"]))
  assert int(state["step"]) == 16
  assert losses[-1] < 0.5 * losses[0]


def test_evaluation_counts_every_example_in_file_order(exp):
  data = exp.load_split("validation")  # 70 examples, eval batch 32: the last batch is partial
  tx, _ = exp.optimizer(1)
  params = exp.init_state(tx)["params"]
  predictor = inference.Predictor(exp)
  logits = np.stack(predictor.outputs(params, data)["logits"])
  assert logits.shape == (70, 2)
  # Reference: each example alone, unpadded.
  for i in (0, 33, 69):
    one = batching.make_batch(data, np.array([i]), 1, (len(data.input_ids[i]),))
    ref = exp.model.logits(params, {k: jax.numpy.asarray(v) for k, v in one.items()}, None, False)
    np.testing.assert_allclose(logits[i], np.asarray(ref)[0], rtol=1e-4, atol=1e-5)
  metrics = predictor.evaluate(params, data)
  expected = float((logits.argmax(-1) == data.labels).mean())
  assert metrics["accuracy"] == pytest.approx(expected)


@contextlib.contextmanager
def _traced_functions():
  """The names of the functions JAX traces inside the block, in order."""
  traced = []
  listener = lambda event, duration, **kw: traced.append(kw.get("fun_name")) if (
      event == "/jax/core/compile/jaxpr_trace_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield traced
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_precompiled_widths_share_one_trace_and_compute_what_per_shape_tracing_does(
    tiny_config, tmp_path, minilm_dir):
  """Several batch widths: the train step is traced once with a symbolic width (jax.export) and
  specialised per width; each program, dropout masks included, computes what the step traced
  for that one shape does (the same loss; updates equal up to float32 rounding, as XLA may
  fuse the two programs differently)."""
  from conftest import make_tiny_model
  config = tiny_config.copy_and_resolve_references()
  config.unlock()
  config.model.name_or_path = make_tiny_model(tmp_path / "tiny_dropout", minilm_dir, dropout=0.1)
  config.lock()
  exp = experiment.build(config)
  tx, learning_rate = exp.optimizer(10)
  widths = (16, 24, 40)
  hosts = [batching.make_batch(exp.train_data, np.arange(16), 16, (w,)) for w in widths]
  with _traced_functions() as traced:
    precompiled = compiled.train_step(exp, tx, learning_rate, exp.abstract_state(tx))
    precompiled.precompile(exp.init_state(tx), {}, hosts)
  assert traced.count("train_step") == 1, traced
  # programs by batch shape: (rows, width, example slots)
  assert sorted(precompiled._programs.compiled) == [(16, w, 16) for w in widths]
  per_shape = compiled.train_step(exp, tx, learning_rate, exp.abstract_state(tx))
  before = _flat(jax.device_get(exp.init_state(tx)["params"]))
  for host in hosts:
    results = []
    for train_step in (precompiled, per_shape):
      state, metrics = train_step(exp.init_state(tx), {}, train_step.device_batch(host))
      results.append((_flat(jax.device_get(state["params"])), float(metrics["loss"])))
    (p1, loss1), (p2, loss2) = results
    assert loss1 == loss2
    u1, u2 = p1 - before, p2 - before
    assert np.abs(u1).max() > 1e-3  # a real update
    np.testing.assert_allclose(u1, u2, rtol=0, atol=1e-3 * np.abs(u1).max())


def test_packed_row_counts_share_one_trace(tiny_config):
  """Packed by examples, steps differ in their number of rows: one trace with symbolic rows,
  and each program computes what the step traced for its one shape does."""
  from jaxft.data import packing
  config = tiny_config.copy_and_resolve_references()
  config.unlock()
  config.data.packing = "examples"
  config.lock()
  exp = experiment.build(config, devices=jax.devices()[:1])
  tx, learning_rate = exp.optimizer(10)
  placement = packing.pack_step(exp.train_data.lengths, np.arange(16), 64, 1, 16)
  counts = [packing.rows_needed(placement) + extra for extra in (0, 1, 3)]
  hosts = [exp.host_packed_batch(exp.train_data, placement, packing.Shape(rows, 64, 16))
           for rows in counts]
  with _traced_functions() as traced:
    precompiled = compiled.train_step(exp, tx, learning_rate, exp.abstract_state(tx))
    precompiled.precompile(exp.init_state(tx), {}, hosts)
  assert traced.count("train_step") == 1, traced
  assert sorted(precompiled._programs.compiled) == [(r, 64, 16) for r in counts]
  per_shape = compiled.train_step(exp, tx, learning_rate, exp.abstract_state(tx))
  losses = []
  for host in hosts:
    pair = [float(step(exp.init_state(tx), {}, step.device_batch(host))[1]["loss"])
            for step in (precompiled, per_shape)]
    assert pair[0] == pytest.approx(pair[1], rel=1e-6)
    losses.append(pair[0])
  # The same 16 examples in more or fewer rows: the same loss (no dropout in the tiny model).
  assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])


def test_precompiled_eval_widths_share_one_trace_and_match_the_jitted_eval_step(exp):
  """Evaluation shapes compiled before training: the eval step is traced once for all widths,
  and evaluating through those programs gives what the plainly jitted step gives."""
  data = exp.load_split("validation")
  tx, learning_rate = exp.optimizer(1)
  state = exp.init_state(tx)
  hosts = [batching.make_batch(data, np.arange(8), 8, (w,)) for w in (16, 24, 40)]
  train_step = compiled.train_step(exp, tx, learning_rate, exp.abstract_state(tx))
  eval_step = compiled.eval_step(exp)
  with _traced_functions() as traced:
    train_step.precompile(state, {}, [], eval_step, hosts)
    precompiled = [jax.device_get(eval_step(state["params"], {}, train_step.device_batch(h)))
                   for h in hosts]
  assert traced.count("eval_step") == 1, traced  # no trace when the programs run
  assert sorted(eval_step.compiled) == [(8, w, 8) for w in (16, 24, 40)]
  plain = compiled.eval_step(exp)
  for host, outputs in zip(hosts, precompiled):
    expected = jax.device_get(plain(state["params"], {}, train_step.device_batch(host)))
    assert np.abs(expected["logits"]).max() > 1e-3
    np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-5, atol=1e-6)
