"""What differs between tasks on the devices: the head's width, the loss, what the eval step
pulls from the devices, and predictions from logits. (The metric names and the default
model-selection metric of each task are config values: jaxft.config.TASK_METRICS.)

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

from jaxft import metrics
from jaxft.data.packing import is_packed


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
    weights = self.loss_weights(batch)
    return jnp.sum(self.losses(logits, batch["labels"]) * weights), jnp.sum(weights)

  def losses(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The loss of each example (sequence tasks) or token (token tasks)."""
    if self.kind == "regression":
      return jnp.square(logits[:, 0] - labels)
    if self.kind == "multilabel":
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  def loss_weights(self, batch: dict) -> jax.Array:
    """What each example (sequence tasks) or token (token tasks: every scored token counts
    once) weighs in the loss; padding weighs 0."""
    if self.kind not in ("token_classification", "mlm"):
      return batch["weights"]
    if is_packed(batch):  # packed rows: padding already weighs 0 per token
      return batch["label_weights"]
    return batch["label_weights"] * batch["weights"][:, None]

  def eval_outputs(self, logits: jax.Array, batch: dict) -> dict:
    """What evaluation pulls to the host per row: logits, except for mlm, whose [B, T, vocab]
    logits are reduced on the devices to a summed negative log-likelihood per row (per token
    for packed rows, which hold several examples)."""
    if self.kind != "mlm":
      return {"logits": logits}
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (logits.argmax(-1) == batch["labels"]).astype(jnp.float32)
    w = batch["label_weights"]
    if is_packed(batch):  # packed rows: per token, the host sums each example's span
      return {"nll": nll * w, "correct": correct * w, "count": w}
    return {"nll": jnp.sum(nll * w, -1), "correct": jnp.sum(correct * w, -1),
            "count": jnp.sum(w, -1)}

  # ---- on the host ---------------------------------------------------------------------------
  def predictions(self, logits: np.ndarray) -> np.ndarray:
    """Class ids (classification, token classification), values (regression) or a multi-hot
    matrix (multilabel) from logits."""
    if self.kind == "regression":
      return logits[..., 0]
    if self.kind == "multilabel":
      return (metrics.sigmoid(logits) > self.threshold).astype(np.int32)
    return logits.argmax(-1)


def make(kind: str, label_names: Sequence[str] = (), threshold: float = 0.5) -> Task:
  return Task(kind, tuple(label_names), threshold)
