"""Orbax checkpoints: round trip, and latest + best both kept (the max_to_keep pitfall)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.checkpoint import Checkpoints
from jaxft.config import base_config, with_task_defaults
from jaxft.errors import UserError


def _ckpt_config(keep_latest=1, keep_best=1):
  full = with_task_defaults(base_config())  # accuracy / max for classification
  full.unlock()
  c = full.checkpoint
  c.keep_latest, c.keep_best, c.async_save = keep_latest, keep_best, True
  return c


def _state(value):
  return {"step": jnp.asarray(value, jnp.int32), "params": {"w": jnp.full((3, 2), float(value))},
          "rng": jax.random.PRNGKey(value)}


def _abstract():
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      _state(0))


def test_round_trip_restores_state_and_meta(tmp_path):
  ckpts = Checkpoints(str(tmp_path), _ckpt_config())
  ckpts.save(5, _state(5), {"step": 5, "note": "x"}, metrics={"accuracy": 0.5})
  ckpts.close()
  state, meta = Checkpoints(str(tmp_path), _ckpt_config(), read_only=True).restore(5, _abstract())
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 5.0))
  assert int(state["step"]) == 5 and meta == {"step": 5, "note": "x"}
  np.testing.assert_array_equal(state["rng"], jax.random.PRNGKey(5))


def test_best_and_latest_are_both_kept(tmp_path):
  ckpts = Checkpoints(str(tmp_path), _ckpt_config(keep_latest=1, keep_best=1))
  for step, acc in [(10, 0.6), (20, 0.9), (30, 0.7), (40, None), (50, 0.8)]:
    ckpts.save(step, _state(step), {"step": step},
               metrics=None if acc is None else {"accuracy": acc})
  ckpts.wait()
  assert ckpts.steps() == [20, 50]
  assert ckpts.best_step() == 20 and ckpts.latest_step() == 50
  assert ckpts.resolve("best") == 20 and ckpts.resolve("latest") == 50 and ckpts.resolve("50") == 50
  with pytest.raises(UserError, match="no checkpoint at step 30"):
    ckpts.resolve("30")
  ckpts.close()


def test_min_mode_keeps_the_lowest(tmp_path):
  c = _ckpt_config(keep_latest=1, keep_best=1)
  c.best_metric, c.best_mode = "loss", "min"
  ckpts = Checkpoints(str(tmp_path), c)
  for step, loss in [(1, 0.5), (2, 0.2), (3, 0.4)]:
    ckpts.save(step, _state(step), {}, metrics={"loss": loss})
  ckpts.close()
  assert ckpts.steps() == [2, 3] and ckpts.best_step() == 2


def test_missing_best_metric_is_a_clear_error(tmp_path):
  ckpts = Checkpoints(str(tmp_path), _ckpt_config())
  with pytest.raises(UserError, match="best_metric='accuracy' is not among"):
    ckpts.save(1, _state(1), {}, metrics={"f1": 0.3})
  ckpts.close()


def test_read_only_on_an_empty_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match="holds no checkpoints"):
    Checkpoints(str(tmp_path), _ckpt_config(), read_only=True)


def test_closed_event_loop_noise_is_dropped_and_other_errors_are_not():
  """tensorstore's late completions into orbax's closed loop print only noise; nothing else is
  swallowed by the hooks that drop it."""
  import sys
  import threading
  import types
  from jaxft.checkpoint import drop_closed_loop_tracebacks
  saved = sys.excepthook, threading.excepthook, sys.unraisablehook
  reached = []  # what the hooks underneath (Python's printers) were given
  try:
    sys.excepthook = lambda kind, value, tb: reached.append(("main", str(value)))
    threading.excepthook = lambda args: reached.append(("thread", str(args.exc_value)))
    sys.unraisablehook = lambda u: reached.append(("unraisable", str(u.exc_value)))
    drop_closed_loop_tracebacks()
    drop_closed_loop_tracebacks()  # idempotent: one filter, not a chain of them
    for error in (RuntimeError("Event loop is closed"), ValueError("a real problem"),
                  RuntimeError("Event loop is closed while writing")):
      sys.excepthook(type(error), error, None)
      threading.excepthook(types.SimpleNamespace(exc_value=error))
      sys.unraisablehook(types.SimpleNamespace(exc_value=error))
    assert reached == [(hook, message) for message in
                       ("a real problem", "Event loop is closed while writing")
                       for hook in ("main", "thread", "unraisable")]
  finally:
    sys.excepthook, threading.excepthook, sys.unraisablehook = saved
