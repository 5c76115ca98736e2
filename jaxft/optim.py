"""The optax chain built from config: warmup + decay schedule, clipping, AdamW with a decay mask.

Which parameters get weight decay is a first-match list of (regex, bool) rules over parameter
paths such as "bert/encoder/layer/0/attention/self/query/kernel": biases and LayerNorm parameters
are not decayed, as in BERT's original recipe.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import optax
from flax import traverse_util

WEIGHT_DECAY_RULES = (
    (r".*bias$", False),
    (r".*(LayerNorm|layer_norm|layernorm|ln).*", False),
    (r".*", True),
)


def param_path(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def first_match(path: str, rules: Sequence[tuple[str, object]]):
  for pattern, value in rules:
    if re.fullmatch(pattern, path):
      return value
  raise ValueError(f"no rule matches parameter {path}")


def weight_decay_mask(params, rules=WEIGHT_DECAY_RULES):
  """A tree of bools like `params`: True where weight decay applies."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {path: first_match(param_path(path), rules) for path in flat})


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


def make_optimizer(train_config, params, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  t = train_config
  schedule = learning_rate_schedule(t.learning_rate, total_steps, t.warmup_ratio, t.lr_schedule)
  chain = []
  if t.max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(t.max_grad_norm))
  chain.append(optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                           weight_decay=t.weight_decay, mask=weight_decay_mask(params)))
  return optax.chain(*chain), schedule
