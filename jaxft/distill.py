"""Knowledge distillation: a frozen teacher inside the student's jitted train step.

`train.distill.teacher` names a jaxft workdir or an exported folder. Its parameters join the
step's frozen parameters (jaxft.step.TEACHER_KEY), laid out on the student's mesh by the same
sharding rules, so the teacher has no gradients and no optimizer state and is never
checkpointed. The step's loss becomes `objective`: per example (per scored token for token
classification)

  (1 - alpha) x task loss + alpha x teacher term

where the teacher term is temperature^2 x KL(teacher || student) of the temperature-softened
distributions (softmax; per label Bernoulli for multilabel) and the squared difference to the
teacher's value for regression. Unlabelled transfer examples (`train.distill.transfer_file`,
labels -1 or NaN: jaxft.data.encode.read_unlabelled_examples) have no task loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxft import inference, parallel, storage, tasks
from jaxft import step as step_lib
from jaxft.data.packing import is_packed
from jaxft.errors import fail


@dataclasses.dataclass(frozen=True)
class Teacher:
  params: dict  # the whole tree (trainable and frozen parts), on the student's mesh
  shardings: dict
  loss: step_lib.TeacherLossFn  # the student's objective with this teacher


# ---- the loss -------------------------------------------------------------------------------
def teacher_term(kind: str, student: jax.Array, teacher: jax.Array,
                 temperature: float) -> jax.Array:
  """Per example (per token): how far the student's outputs are from the teacher's."""
  if kind == "regression":
    return jnp.square(student[..., 0] - teacher[..., 0])
  t, s = teacher / temperature, student / temperature
  if kind == "multilabel":  # each label a Bernoulli: KL of the two, averaged over labels
    p = jax.nn.sigmoid(t)
    kl = (p * (jax.nn.log_sigmoid(t) - jax.nn.log_sigmoid(s))
          + (1 - p) * (jax.nn.log_sigmoid(-t) - jax.nn.log_sigmoid(-s)))
    return temperature ** 2 * kl.mean(-1)
  log_p, log_q = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
  # temperature^2 keeps the gradient's scale independent of the temperature (Hinton et al.)
  return temperature ** 2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)


def label_term(task: tasks.Task, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The task loss per example (token); 0 where the label is unknown (-1 ids, NaN targets)."""
  if task.kind in ("regression", "multilabel"):
    known = jnp.isfinite(labels)
    losses = task.losses(logits, jnp.where(known, labels, 0.0))
    known = known if task.kind == "regression" else known.all(-1)
  else:
    known = labels >= 0
    losses = task.losses(logits, jnp.maximum(labels, 0))
  return jnp.where(known, losses, 0.0)


def _layer_mapping(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
  """(student layer, teacher layer) pairs: each student layer matches the teacher layer that
  ends its share of the teacher's depth."""
  return [(i, math.ceil((i + 1) * teacher_layers / student_layers) - 1)
          for i in range(student_layers)]


@contextlib.contextmanager
def _layer_outputs(into: list):
  """Appends the hidden states each encoder layer returns (BERT-family `...Layer` modules,
  DistilBERT's `TransformerBlock`, named by their index) to `into`, in call order."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    name = type(module).__name__
    if (context.method_name == "__call__" and str(module.name).isdigit()
        and name.endswith(("Layer", "TransformerBlock"))):
      into.append(out[0] if isinstance(out, tuple) else out)
    return out

  with nn.intercept_methods(interceptor):
    yield


def _hidden_error(student: list, teacher: list, batch: dict) -> jax.Array:
  """The squared difference of mapped layers' hidden states, averaged over the width and the
  layers, summed over real tokens: a sum, so that devices' shares add up exactly."""
  mask = (batch["segment_ids"] if is_packed(batch) else batch["attention_mask"]) > 0
  errors = [jnp.mean(jnp.square(student[i].astype(jnp.float32)
                                - teacher[j].astype(jnp.float32)), -1)
            for i, j in _layer_mapping(len(student), len(teacher))]
  return jnp.sum(jnp.mean(jnp.stack(errors), 0) * mask)


def objective(task: tasks.Task, student_logits: Callable, teacher_logits: Callable,
              distill_config) -> step_lib.TeacherLossFn:
  """The distillation loss of the train step (jaxft.step.make_train_step's `teacher_loss`):
  (student params, teacher params, batch, dropout key) -> (summed loss, summed weight)."""
  temperature, alpha = float(distill_config.temperature), float(distill_config.alpha)
  hidden_weight = float(distill_config.hidden_weight)

  def loss(params: dict, teacher_params: dict, batch: dict, key) -> tuple[jax.Array, jax.Array]:
    student_states, teacher_states = [], []
    with _layer_outputs(student_states) if hidden_weight else contextlib.nullcontext():
      logits = student_logits(params, batch, key, True)
    with _layer_outputs(teacher_states) if hidden_weight else contextlib.nullcontext():
      target = jax.lax.stop_gradient(teacher_logits(teacher_params, batch, None, False))
    teacher_states = [jax.lax.stop_gradient(h) for h in teacher_states]
    per_example = ((1.0 - alpha) * label_term(task, logits, batch["labels"])
                   + alpha * teacher_term(task.kind, logits, target, temperature))
    weights = task.loss_weights(batch)
    total, weight = jnp.sum(per_example * weights), jnp.sum(weights)
    if hidden_weight:
      total = total + hidden_weight * _hidden_error(student_states, teacher_states, batch)
    return total, weight

  return loss


# ---- the teacher ----------------------------------------------------------------------------
def load_teacher(student) -> Teacher:
  """The teacher of `student` (a jaxft.experiment.Experiment whose config sets
  train.distill.teacher): restored, checked against the student, on the student's mesh."""
  d = student.config.train.distill
  source = d.teacher
  devices = list(student.mesh.devices.flat)
  mesh = dict(zip(student.mesh.axis_names, student.mesh.devices.shape))
  if os.path.isdir(source) and os.path.exists(os.path.join(source, inference.EXPORT_CONFIG_FILE)):
    exp, params = inference.load_exported(source, devices, mesh)
  elif storage.exists(storage.join(source, "config.json")) and storage.exists(
      storage.join(source, "checkpoints")):
    exp, _, params = inference.restore(source, d.checkpoint, devices, mesh)
  else:
    fail(f"config train.distill.teacher={source} is neither a jaxft workdir (config.json and "
         "checkpoints/) nor a folder written by jaxft-export --format=hf; train or export the "
         "teacher first")
  _check_fits(student, exp, source)
  whole = step_lib.combine(params, exp.frozen_init)
  shardings = parallel.param_shardings(whole, student.mesh,
                                       student.config.parallel.param_rules)
  return Teacher(jax.device_put(whole, shardings), shardings,
                 objective(student.task, student.logits, exp.logits, d))


def _check_fits(student, teacher, source: str) -> None:
  """The teacher must read the student's inputs and predict what the student predicts."""
  s, t = student.config, teacher.config
  if s.task.kind != t.task.kind:
    fail(f"the teacher {source} was trained for task.kind={t.task.kind}, this run is "
         f"task.kind={s.task.kind}; distil from a teacher of the same task")
  if tuple(student.label_names) != tuple(teacher.label_names):
    fail(f"the teacher {source} predicts labels {list(teacher.label_names)}, this run's are "
         f"{list(student.label_names)}; set data.label_names to the teacher's (same order)")
  if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
    fail(f"the teacher {source} uses another vocabulary than the student "
         f"({len(teacher.tokenizer)} vs {len(student.tokenizer)} tokens); the teacher reads the "
         "student's token ids, so both must share a tokenizer")
  positions = getattr(teacher.model.hf_config, "max_position_embeddings", None)
  if positions is not None and s.data.max_seq_length > positions:
    fail(f"config data.max_seq_length={s.data.max_seq_length} exceeds the teacher's "
         f"max_position_embeddings={positions}; lower it")
  width = getattr(student.model.hf_config, "hidden_size", None)
  if s.train.distill.hidden_weight and width != getattr(teacher.model.hf_config,
                                                        "hidden_size", None):
    fail(f"config train.distill.hidden_weight needs the teacher's hidden size "
         f"({teacher.model.hf_config.hidden_size}) to equal the student's ({width}); set it to 0")
