"""What differs between tasks, in one place: the head's width, the loss, what the eval step pulls
from the devices, the metrics, and the default model-selection metric.

The train step, parallel modes, PEFT masks and checkpoints are shared by every task; only the
functions here change. Losses return (sum over the batch, weight total) so that gradient
accumulation, data parallelism and weight-0 padding rows all give the mean over real examples
(sequence tasks) or real scored tokens (token classification, MLM).

| kind                 | logits           | labels in a batch                  | selection metric |
|----------------------|------------------|------------------------------------|------------------|
| classification       | [B, classes]     | [B] int class ids                  | accuracy (max)   |
| regression           | [B, 1]           | [B] float targets                  | pearson (max)    |
| multilabel           | [B, labels]      | [B, labels] multi-hot floats       | micro_f1 (max)   |
| token_classification | [B, T, tags]     | [B, T] tag ids + label_weights     | f1 (max)         |
| mlm                  | [B, T, vocab]    | [B, T] token ids + label_weights   | perplexity (min) |
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

KINDS = ("classification", "regression", "multilabel", "token_classification", "mlm")
SEQUENCE_KINDS = ("classification", "regression", "multilabel")  # one prediction per example
TOKEN_KINDS = ("token_classification", "mlm")  # one prediction per token

# The metrics each task reports (all of them numbers; "loss" everywhere), and the default
# model-selection metric with its direction.
METRICS = {
    "classification": ("accuracy", "macro_f1", "mcc", "binary_f1", "loss"),
    "regression": ("pearson", "spearman", "mse", "loss"),
    "multilabel": ("micro_f1", "macro_f1", "exact_match", "loss"),
    "token_classification": ("precision", "recall", "f1", "token_accuracy", "loss"),
    "mlm": ("perplexity", "loss", "accuracy"),
}
DEFAULT_SELECTION = {
    "classification": ("accuracy", "max"),
    "regression": ("pearson", "max"),
    "multilabel": ("micro_f1", "max"),
    "token_classification": ("f1", "max"),
    "mlm": ("perplexity", "min"),
}


@dataclasses.dataclass(frozen=True)
class Task:
  kind: str
  label_names: tuple[str, ...] = ()  # classes, labels or tags; () for regression and mlm
  threshold: float = 0.5  # multilabel: a label is predicted when its probability exceeds this

  @property
  def num_outputs(self) -> int:
    """The head's width (mlm: the model's own vocabulary head, so 0 here)."""
    return 1 if self.kind == "regression" else len(self.label_names)

  # ---- on the devices (pure, jitted inside the steps) -----------------------------------------
  def loss(self, logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(summed loss, summed weight) over the batch; padding rows and unscored tokens weigh 0."""
    weights = batch["weights"]
    if self.kind == "classification":
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    elif self.kind == "regression":
      losses = jnp.square(logits[:, 0] - batch["labels"])
    elif self.kind == "multilabel":
      losses = optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean(-1)
    else:  # token-level: every scored token counts once
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
      weights = batch["label_weights"] * weights[:, None]
    return jnp.sum(losses * weights), jnp.sum(weights)

  def eval_outputs(self, logits: jax.Array, batch: dict) -> dict:
    """What evaluation pulls to the host per row: logits, except for mlm, whose [B, T, vocab]
    logits are reduced on the devices to a summed negative log-likelihood per row."""
    if self.kind != "mlm":
      return {"logits": logits}
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (logits.argmax(-1) == batch["labels"]).astype(jnp.float32)
    w = batch["label_weights"]
    return {"nll": jnp.sum(nll * w, -1), "correct": jnp.sum(correct * w, -1),
            "count": jnp.sum(w, -1)}

  # ---- on the host ---------------------------------------------------------------------------
  def predictions(self, logits: np.ndarray) -> np.ndarray:
    """Class ids (classification, token classification), values (regression) or a multi-hot
    matrix (multilabel) from logits."""
    if self.kind == "regression":
      return logits[..., 0]
    if self.kind == "multilabel":
      return (sigmoid(logits) > self.threshold).astype(np.int32)
    return logits.argmax(-1)


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def log_softmax(x: np.ndarray) -> np.ndarray:
  m = x.max(-1, keepdims=True)
  return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def selection(kind: str, metric, mode) -> tuple[str, str]:
  """The model-selection metric and direction: the configured ones, else the task's default."""
  default_metric, default_mode = DEFAULT_SELECTION[kind]
  if metric is None:
    return default_metric, mode or default_mode
  if mode is None:
    mode = "min" if metric in ("loss", "mse", "perplexity") else "max"
  return metric, mode


def make(kind: str, label_names: Sequence[str] = (), threshold: float = 0.5) -> Task:
  return Task(kind, tuple(label_names), threshold)
