"""The optax chain built from config: warmup + decay schedule, clipping, AdamW, per-parameter rules.

AdamW is spelled out (scale_by_adam, decoupled weight decay, learning rate) so that both the
weight decay and the learning rate can differ per parameter. Which parameters get what is decided
by first-match (regex, value) rules over parameter paths (jaxft.rules):
- weight decay: never on biases and LayerNorm (BERT's recipe), times `optimizer.weight_decay_rules`;
- learning rate: times `optimizer.lr_rules`, times layer-wise decay (`optimizer.layer_lr_decay`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import jax
import optax

from jaxft import rules as rules_lib

NO_DECAY_RULES = (
    (r".*bias$", 0.0),
    (r".*(LayerNorm|layer_norm|layernorm|ln).*", 0.0),
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


def _scale_per_leaf(factors, add_params: bool = False) -> optax.GradientTransformation:
  """updates * factor (or, with add_params, updates + factor * params) leaf by leaf."""

  def init(params):
    del params
    return _Empty()

  def update(updates, state, params=None):
    if add_params:
      updates = jax.tree_util.tree_map(
          lambda u, p, r: u + r * p if r else u, updates, params, factors)
    else:
      updates = jax.tree_util.tree_map(
          lambda u, r: u * r if r != 1.0 else u, updates, factors)
    return updates, state

  return optax.GradientTransformation(init, update)


def learning_rate_schedule(peak: float, total_steps: int, warmup_ratio: float,
                           kind: str) -> optax.Schedule:
  """Linear warmup from 0 to `peak`, then linear or cosine decay to 0 (or constant)."""
  warmup = int(round(total_steps * warmup_ratio))
  decay = max(total_steps - warmup, 1)
  warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
  if kind == "linear":
    rest = optax.linear_schedule(peak, 0.0, decay)
  elif kind == "cosine":
    rest = optax.cosine_decay_schedule(peak, decay)
  else:
    rest = optax.constant_schedule(peak)
  return optax.join_schedules([warm, rest], [warmup])


def make_optimizer(config, params, total_steps: int, num_layers: int = 0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for the trainable `params` (a tree), and its learning-rate schedule."""
  t, o = config.train, config.optimizer
  schedule = learning_rate_schedule(t.learning_rate, total_steps, t.warmup_ratio, t.lr_schedule)
  chain = []
  if t.max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(t.max_grad_norm))
  chain.append(optax.scale_by_adam(b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps))
  if t.weight_decay > 0:
    chain.append(_scale_per_leaf(weight_decay_rates(params, t.weight_decay, o.weight_decay_rules),
                                 add_params=True))
  chain.append(optax.scale_by_learning_rate(schedule))
  multipliers = lr_multipliers(params, o.lr_rules, o.layer_lr_decay, num_layers)
  if any(m != 1.0 for m in jax.tree_util.tree_leaves(multipliers)):
    chain.append(_scale_per_leaf(multipliers))
  return optax.chain(*chain), schedule
