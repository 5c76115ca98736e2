"""The optax chain built from config: warmup + decay schedule, clipping, AdamW, per-parameter rules.

AdamW is spelled out (scale_by_adam, decoupled weight decay, learning rate) so that both the
weight decay and the learning rate can differ per parameter. Which parameters get what is decided
by first-match (regex, value) rules over parameter paths (jaxft.rules):
- weight decay: never on biases, LayerNorm (BERT's recipe), IA3's and DoRA's scales; times
  `optimizer.weight_decay_rules`;
- learning rate: times `optimizer.lr_rules`, times layer-wise decay (`optimizer.layer_lr_decay`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxft import rules as rules_lib

NO_DECAY_RULES = (
    (r".*bias$", 0.0),
    (r".*(LayerNorm|layer_norm|layernorm|ln).*", 0.0),
    # IA3's scales and DoRA's magnitudes start at the pretrained function, not at zero.
    (r".*/(input_scale|output_scale|magnitude)$", 0.0),
)
_LAYER = re.compile(r"(?:^|/)(?:layer|layers|h|block)/(\d+)/")
_EMBEDDINGS = re.compile(r"(?:^|/)embeddings/")


def weight_decay_mask(params) -> Any:
  """A tree of bools like `params`: True where weight decay applies."""
  return rules_lib.map_paths(
      lambda p, _: rules_lib.first_match(p, NO_DECAY_RULES, 1.0) != 0.0, params)


def weight_decay_rates(params, weight_decay: float, rules: Sequence = ()) -> Any:
  """Per-parameter decoupled decay rates: 0 for biases and LayerNorm, else rate x rule."""
  return rules_lib.map_paths(
      lambda p, _: weight_decay * rules_lib.first_match(p, NO_DECAY_RULES, 1.0)
      * rules_lib.first_match(p, rules, 1.0), params)


def layer_decay_factor(path: str, factor: float, num_layers: int) -> float:
  if factor == 1.0 or num_layers <= 0:
    return 1.0
  match = _LAYER.search(path)
  if match:
    return factor ** (num_layers - 1 - int(match.group(1)))
  if _EMBEDDINGS.search(path):
    return factor ** num_layers
  return 1.0  # pooler, head


def lr_multipliers(params, rules: Sequence = (), layer_decay: float = 1.0,
                   num_layers: int = 0) -> Any:
  return rules_lib.map_paths(lambda p, _: rules_lib.first_match(p, rules, 1.0)
                             * layer_decay_factor(p, layer_decay, num_layers), params)


class _Empty(NamedTuple):
  pass


def _scale_per_leaf(factors) -> optax.GradientTransformation:
  """updates * factor, leaf by leaf (static factors: per-parameter rules)."""

  def init(params):
    del params
    return _Empty()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, r: u * r if r != 1.0 else u, updates, factors), state

  return optax.GradientTransformation(init, update)


def _decoupled_weight_decay(factors, rate) -> optax.GradientTransformation:
  """updates + rate * factor * params: AdamW's decay, `rate` a run value, `factors` static."""

  def init(params):
    del params
    return _Empty()

  def update(updates, state, params=None):
    return jax.tree_util.tree_map(
        lambda u, p, f: u + (rate * f) * p if f else u, updates, params, factors), state

  return optax.GradientTransformation(init, update)


# ---- run values: what a step reads without being compiled for it ----------------------------
# The optimizer's numbers live in its state as arrays, not in the program as constants, so runs
# that differ only in them (a sweep's learning rates, seeds, epochs) share compiled programs.
# The config keys they come from; the program cache leaves them out of its keys.
RUN_VALUE_KEYS = ("seed", "train.learning_rate", "train.warmup_ratio", "train.weight_decay",
                  "train.max_grad_norm", "train.num_epochs", "train.num_train_steps")


def _schedule_values(peak: float, total_steps: int, warmup_ratio: float) -> dict[str, float]:
  return {"learning_rate": float(peak), "warmup_steps": float(round(total_steps * warmup_ratio)),
          "total_steps": float(total_steps)}


def run_values(train_config, total_steps: int) -> dict[str, float]:
  """The optimizer's run values for `total_steps` steps of `train_config` (config.train)."""
  t = train_config
  return {**_schedule_values(t.learning_rate, total_steps, t.warmup_ratio),
          "weight_decay": float(t.weight_decay),
          # 0 turns clipping off: an infinite norm clips nothing, in the same program.
          "max_grad_norm": float(t.max_grad_norm) if t.max_grad_norm > 0 else float("inf")}


class RunValuesState(NamedTuple):
  values: dict  # name -> float32 scalar (run_values)
  inner: Any


def _with_run_values(build: Callable[[dict], optax.GradientTransformation], values: dict
                     ) -> optax.GradientTransformation:
  """`build(values)` with `values` kept in the optimizer state, so the step reads them."""

  def init(params):
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
    return RunValuesState(arrays, build(arrays).init(params))

  def update(updates, state, params=None):
    updates, inner = build(state.values).update(updates, state.inner, params)
    return updates, RunValuesState(state.values, inner)

  return optax.GradientTransformation(init, update)


def set_run_values(state: dict, values: dict) -> dict:
  """The train state with the optimizer's run values replaced (a resumed run uses its config's
  learning rate and length, as a fresh one would), each placed as the value it replaces."""
  opt_state = state["opt_state"]
  placed = {k: jax.device_put(jnp.asarray(values[k], jnp.float32), v.sharding)
            for k, v in opt_state.values.items()}
  return {**state, "opt_state": opt_state._replace(values=placed)}


def learning_rate_at(count, values: dict, kind: str):
  """Linear warmup from 0 to the peak over `warmup_steps`, then linear or cosine decay to 0 at
  `total_steps` (or constant). Works on Python numbers and traced arrays alike."""
  peak, warmup, total = values["learning_rate"], values["warmup_steps"], values["total_steps"]
  count = jnp.asarray(count, jnp.float32)
  decayed = jnp.clip((count - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
  if kind == "linear":
    rest = peak * (1.0 - decayed)
  elif kind == "cosine":
    rest = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * decayed))
  else:
    rest = peak * jnp.ones_like(count)
  return jnp.where(count < warmup, peak * count / jnp.maximum(warmup, 1.0), rest)


def learning_rate_schedule(peak: float, total_steps: int, warmup_ratio: float,
                           kind: str) -> optax.Schedule:
  """The schedule of `learning_rate_at` for fixed values."""
  values = _schedule_values(peak, total_steps, warmup_ratio)
  return lambda count: learning_rate_at(count, values, kind)


def make_optimizer(config, params, total_steps: int, num_layers: int = 0
                   ) -> tuple[optax.GradientTransformation, Callable[[dict], jax.Array]]:
  """The optimizer for the trainable `params` (a tree), and train state -> the learning rate of
  its step. Its run values (`run_values`) live in its state."""
  t, o = config.train, config.optimizer
  decay = weight_decay_rates(params, 1.0, o.weight_decay_rules)
  multipliers = lr_multipliers(params, o.lr_rules, o.layer_lr_decay, num_layers)
  scaled = any(m != 1.0 for m in jax.tree_util.tree_leaves(multipliers))

  def build(values: dict) -> optax.GradientTransformation:
    chain = [optax.clip_by_global_norm(values["max_grad_norm"]),
             optax.scale_by_adam(b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps),
             _decoupled_weight_decay(decay, values["weight_decay"]),
             optax.scale_by_learning_rate(
                 lambda count: learning_rate_at(count, values, t.lr_schedule))]
    if scaled:
      chain.append(_scale_per_leaf(multipliers))
    return optax.chain(*chain)

  tx = _with_run_values(build, run_values(t, total_steps))
  learning_rate = lambda state: learning_rate_at(state["step"], state["opt_state"].values,
                                                 t.lr_schedule)
  return tx, learning_rate
