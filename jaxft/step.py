"""The train step and the eval step: pure functions of (state, frozen params, batch).

The state is a plain dict {"step", "params", "opt_state", "rng"}: `params` holds the trainable
parameters only. Parameters that are not trained (PEFT) live in a separate `frozen` tree that is
passed as its own argument, so it is never differentiated, never donated and has no optimizer
state. Full fine-tuning is the case `frozen == {}`.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxft import hash_rng
from jaxft.data.packing import is_packed

LogitsFn = Callable[[dict, dict, jax.Array, bool], jax.Array]
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask",
                # packed batches (jaxft.data.packing)
                "position_ids", "segment_ids", "example_row", "example_start")


def combine(trainable: dict, frozen: dict) -> dict:
  """The full parameter tree from its trainable and frozen parts."""
  if not frozen:
    return trainable
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


LossFn = Callable[[jax.Array, dict], tuple[jax.Array, jax.Array]]  # -> (loss sum, weight sum)
# Distillation (jaxft.distill.objective): (student params, teacher params, batch, dropout key)
# -> (loss sum, weight sum). The teacher's parameters travel in `frozen` under TEACHER_KEY.
TeacherLossFn = Callable[[dict, dict, dict, jax.Array], tuple[jax.Array, jax.Array]]
TEACHER_KEY = "distillation_teacher"
TRAIN_INPUTS = (*MODEL_INPUTS, "labels", "label_weights", "weights")


def rows_from(batch: dict, first_row) -> dict:
  """A contiguous part of a packed batch whose first row is `first_row` of the whole batch:
  its examples' rows counted from its own first row (unpacked batches pass through)."""
  if not is_packed(batch):
    return batch
  return {**batch, "example_row": batch["example_row"] - first_row}


def init_state(params: dict, tx: optax.GradientTransformation, seed: int) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": jax.random.PRNGKey(seed)}


NONFINITE_GUARDS = ("cond", "select")


def nonfinite_guard_for(platform: str) -> str:
  """How a step keeps parameters and optimizer state when its gradient is not finite.

  On the CPU a lax.cond around the update: a select per leaf made XLA:CPU copy the whole
  optimizer state every step. On GPU and TPU a select fused into the update: a conditional
  there copies its predicate to the host and blocks every step (and splits the step's command
  buffer on GPUs).
  """
  return "cond" if platform == "cpu" else "select"


def make_train_step(logits_fn: LogitsFn, loss_fn: LossFn, tx: optax.GradientTransformation,
                    learning_rate: Callable[[dict], jax.Array], grad_accum_steps: int,
                    reduce_axis: Optional[str] = None, dropout_rng: str = "hash",
                    nonfinite_guard: str = "cond", teacher_loss: Optional[TeacherLossFn] = None):
  """Returns train_step(state, frozen, batch) -> (state, metrics); jit it with donation.

  `loss_fn(logits, batch)` is the task's (jaxft.tasks): a summed loss and the summed weight it
  is averaged over (examples, or scored tokens). `learning_rate(state)`: the rate of the state's
  step, for the metrics (jaxft.optim.make_optimizer).

  Under `jax.pmap`, pass the mapped axis name as `reduce_axis`: the summed losses, weights and
  gradients of every device are then added up with `lax.psum` before dividing, which gives the
  same update as one device seeing the whole batch. Under `jax.jit` the batch is one global array
  and XLA does that reduction itself.

  With gradient accumulation the global batch is split into `grad_accum_steps` micro-batches that
  run one after another (lax.scan); summed losses and weights make the result the same as one pass
  over the whole batch.

  `dropout_rng` picks the generator of dropout masks (jaxft.hash_rng: "hash" is a fused
  counter hash, "threefry" JAX's default); the state always keeps a threefry key. With "hash",
  masks are a function of the global example and position, so pmap draws what jit draws.

  `nonfinite_guard` ("cond" or "select", see `nonfinite_guard_for`): how a step whose loss or
  gradient is not finite leaves the state as it was.

  `teacher_loss` (distillation) replaces `loss_fn`: `frozen` then also holds the teacher's
  parameters under TEACHER_KEY, a constant of the step like the rest of `frozen`.
  """
  if nonfinite_guard not in NONFINITE_GUARDS:
    raise ValueError(f"nonfinite_guard={nonfinite_guard!r}; use one of {NONFINITE_GUARDS}")
  tx = optax.with_extra_args_support(tx)  # any optax transformation; ours read grad_norm

  def summed_loss(params, frozen, micro, rng, block):
    key = hash_rng.dropout_key(rng, dropout_rng, block)
    if teacher_loss is not None:
      teacher = frozen[TEACHER_KEY]
      frozen = {k: v for k, v in frozen.items() if k != TEACHER_KEY}
      return teacher_loss(combine(params, frozen), teacher, micro, key)
    return loss_fn(logits_fn(combine(params, frozen), micro, key, True), micro)

  # Differentiates the trainable `params` only (argument 0); `frozen` is a constant.
  loss_and_grads = jax.value_and_grad(summed_loss, has_aux=True)

  def train_step(state: dict, frozen: dict, batch: dict):
    rng = jax.random.fold_in(state["rng"], state["step"])
    block = 0
    batch = {k: batch[k] for k in TRAIN_INPUTS if k in batch}
    if reduce_axis is not None:
      device = jax.lax.axis_index(reduce_axis)
      batch = rows_from(batch, device * batch["input_ids"].shape[0])
      if dropout_rng == "hash":  # this device's block of the global batch: jit's masks
        block = device
      else:  # threefry cannot draw by global position: each device draws its own masks
        rng = jax.random.fold_in(rng, jax.lax.axis_index(reduce_axis))
    if grad_accum_steps == 1:
      (loss, weight), grads = loss_and_grads(state["params"], frozen, batch, rng, block)
    else:
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)
      micro_rows = batch["input_ids"].shape[0] // grad_accum_steps

      def accumulate(carry, xs):
        i, mb = xs
        mb = rows_from(mb, i * micro_rows)
        (l, w), g = loss_and_grads(state["params"], frozen, mb, jax.random.fold_in(rng, i),
                                   block)
        acc_l, acc_w, acc_g = carry
        return (acc_l + l, acc_w + w, jax.tree_util.tree_map(jnp.add, acc_g, g)), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
      (loss, weight, grads), _ = jax.lax.scan(
          accumulate, (jnp.zeros(()), jnp.zeros(()), zeros), (jnp.arange(grad_accum_steps), micro))
    if is_packed(batch):  # every token of a segment is an example's
      tokens = jnp.sum(batch["segment_ids"] > 0)
    else:
      tokens = jnp.sum(batch["attention_mask"] * (batch["weights"][:, None] > 0))
    examples = jnp.sum(batch["weights"])
    if reduce_axis is not None:
      loss, weight, grads, tokens, examples = jax.lax.psum(
          (loss, weight, grads, tokens, examples), reduce_axis)
    denom = jnp.maximum(weight, 1.0)
    # The mean gradient is formed where it is read (the norm, the update), never stored: on the
    # CPU a stored copy was one more pass over memory per parameter. A product, not a quotient,
    # so that XLA repeats it in each reader rather than storing it.
    scale = 1.0 / denom
    mean = lambda grads: jax.tree_util.tree_map(lambda g: g * scale, grads)
    # A non-finite loss or gradient leaves parameters and optimizer state as they were; the loop
    # then stops or skips (train.nonfinite).
    grad_norm = optax.tree.norm(mean(grads))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(grads, opt_state, params):
      # The norm goes along for clipping (jaxft.optim.adamw), which need not compute it again.
      updates, opt_state = tx.update(mean(grads), opt_state, params, grad_norm=grad_norm)
      return optax.apply_updates(params, updates), opt_state

    def keep(grads, opt_state, params):
      return params, opt_state

    if nonfinite_guard == "cond":
      params, opt_state = jax.lax.cond(finite, update, keep, grads, state["opt_state"],
                                       state["params"])
    else:
      new = update(grads, state["opt_state"], state["params"])
      params, opt_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new,
                                                 (state["params"], state["opt_state"]))
    metrics = {"loss": loss / denom, "grad_norm": grad_norm,
               "learning_rate": learning_rate(state), "examples": examples,
               "tokens": tokens, "finite": finite}
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "rng": state["rng"]}
    return new_state, metrics

  return train_step


def make_eval_step(logits_fn: LogitsFn, outputs_fn: Callable[[jax.Array, dict], dict]):
  """Returns eval_step(params, frozen, batch) -> the task's per-row outputs (jaxft.tasks)."""

  def eval_step(params: dict, frozen: dict, batch: dict) -> dict:
    batch = {k: batch[k] for k in TRAIN_INPUTS if k in batch}
    logits = logits_fn(combine(params, frozen), batch, None, False)
    return outputs_fn(logits, batch)

  return eval_step
