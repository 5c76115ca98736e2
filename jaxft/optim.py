"""The optimizer built from config: warmup + decay schedule, clipping, AdamW, per-parameter rules.

AdamW is spelled out (`adamw`: clipping, Adam, decoupled weight decay, learning rate, in one
pass per parameter) so that both the weight decay and the learning rate can differ per
parameter. Which parameters get what is decided by first-match (regex, value) rules over
parameter paths (jaxft.rules):
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
  """A stateless slot of the optimizer state (the decay's, the per-leaf scale's): kept so that
  the state's layout, and so every checkpoint's, stays what it has been."""


def adamw(decay_factors, lr_multipliers, values: dict, b1: float, b2: float, eps: float,
          schedule: Callable) -> optax.GradientTransformationExtraArgs:
  """Clipping by global norm, Adam, decoupled weight decay, the learning rate and the
  per-parameter rules, in one pass over each parameter's gradient, moments and value.

  The same updates as optax.chain(clip_by_global_norm, scale_by_adam, decoupled decay,
  scale_by_learning_rate, per-leaf scale), and the same state (checkpoints of either restore
  into the other); but XLA:CPU ran that chain as five passes over memory per parameter (the
  clipped gradient and the moments each written out and read back), this as three. `values`
  (run values, arrays): learning_rate, warmup_steps, total_steps, weight_decay, max_grad_norm;
  `schedule(count, values)` the learning rate of a step. `update(..., grad_norm=)` takes the
  gradient's global norm where the caller has it (the train step does), else computes it.
  """
  scaled = any(m != 1.0 for m in jax.tree_util.tree_leaves(lr_multipliers))

  def init(params):
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)
    state = (optax.EmptyState(),
             optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros()),
             _Empty(), optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)))
    return state + (_Empty(),) if scaled else state

  def update(grads, state, params=None, *, grad_norm=None, **extra):
    del extra
    clip_state, adam, decay_state, schedule_state, *rest = state
    if grad_norm is None:
      grad_norm = optax.tree.norm(grads)
    max_norm = values["max_grad_norm"]
    clip = jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)
    count = optax.safe_increment(adam.count)
    # Bias corrections, by an integer power as optax takes them (1 - b2 ** t cancels digits:
    # a float power's rounding moved updates by 1e-5).
    first, second = (1 - jax.lax.pow(jnp.float32(b), count) for b in (b1, b2))
    step_size = -schedule(schedule_state.count, values)

    def leaf(g, mu, nu, p, decay, multiplier):
      g = g * clip
      mu = (1 - b1) * g + b1 * mu
      nu = (1 - b2) * (g * g) + b2 * nu
      u = (mu / first) / (jnp.sqrt(nu / second) + eps)
      if decay:
        u = u + (values["weight_decay"] * decay) * p
      return u * (step_size * multiplier if multiplier != 1.0 else step_size), mu, nu

    out = jax.tree_util.tree_map(leaf, grads, adam.mu, adam.nu, params, decay_factors,
                                 lr_multipliers)
    treedef = jax.tree_util.tree_structure(grads)
    updates, mu, nu = (treedef.unflatten(parts) for parts in zip(*treedef.flatten_up_to(out)))
    adam = optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
    schedule_state = optax.ScaleByScheduleState(count=optax.safe_increment(schedule_state.count))
    return updates, (clip_state, adam, decay_state, schedule_state, *rest)

  return optax.GradientTransformationExtraArgs(init, update)


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


def _with_run_values(build: Callable[[dict], optax.GradientTransformationExtraArgs],
                     values: dict) -> optax.GradientTransformationExtraArgs:
  """`build(values)` with `values` kept in the optimizer state, so the step reads them."""

  def init(params):
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
    return RunValuesState(arrays, build(arrays).init(params))

  def update(updates, state, params=None, **extra_args):
    updates, inner = build(state.values).update(updates, state.inner, params, **extra_args)
    return updates, RunValuesState(state.values, inner)

  return optax.GradientTransformationExtraArgs(init, update)


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

  def build(values: dict) -> optax.GradientTransformationExtraArgs:
    return adamw(decay, multipliers, values, t.adam_b1, t.adam_b2, t.adam_eps,
                 lambda count, values: learning_rate_at(count, values, t.lr_schedule))

  tx = _with_run_values(build, run_values(t, total_steps))
  learning_rate = lambda state: learning_rate_at(state["step"], state["opt_state"].values,
                                                 t.lr_schedule)
  return tx, learning_rate
