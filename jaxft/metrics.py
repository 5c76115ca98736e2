"""Task metrics (scikit-learn's definitions), from a model's outputs over a dataset, and the
writers: metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import sys
from typing import Optional

import numpy as np

from jaxft import storage


def classification_metrics(labels: np.ndarray, predictions: np.ndarray,
                           num_labels: int) -> dict:
  """accuracy, macro_f1, mcc; binary_f1 (F1 of class 1) for two-class tasks; and the confusion
  matrix (rows gold, columns predicted). scikit-learn's definitions (zero_division=0), computed
  from the confusion matrix here: importing sklearn.metrics takes longer than evaluating
  SST-2's dev set on a GPU."""
  confusion = np.zeros((num_labels, num_labels), np.int64)
  np.add.at(confusion, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
  f1 = _f1_per_class(confusion)
  out = {
      "accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
      "macro_f1": float(f1.mean()),
      "mcc": _matthews_corrcoef(confusion),
  }
  if num_labels == 2:
    out["binary_f1"] = float(f1[1])
  out["confusion_matrix"] = confusion.tolist()
  return out


def _f1_per_class(confusion: np.ndarray) -> np.ndarray:
  """2 TP / (2 TP + FP + FN) of each class; 0 for a class neither in the gold labels nor
  predicted."""
  true_positives = np.diag(confusion).astype(np.float64)
  denominator = confusion.sum(0) + confusion.sum(1)  # (TP + FP) + (TP + FN)
  return np.divide(2 * true_positives, denominator, out=np.zeros_like(true_positives),
                   where=denominator > 0)


def _matthews_corrcoef(confusion: np.ndarray) -> float:
  """The multiclass Matthews correlation (Gorodkin's R_K); 0 when either side is constant."""
  c = confusion.astype(np.float64)
  n, correct = c.sum(), np.trace(c)
  gold, predicted = c.sum(1), c.sum(0)
  cov_gold_predicted = correct * n - gold @ predicted
  cov_predicted = n * n - predicted @ predicted
  cov_gold = n * n - gold @ gold
  if cov_predicted * cov_gold == 0:
    return 0.0
  return float(cov_gold_predicted / np.sqrt(cov_gold * cov_predicted))


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict:
  """pearson, spearman (scipy), mse. A constant prediction has no correlation: reported as 0."""
  from scipy import stats
  constant = np.allclose(predictions, predictions[0]) or np.allclose(targets, targets[0])
  return {
      "pearson": 0.0 if constant else float(stats.pearsonr(targets, predictions)[0]),
      "spearman": 0.0 if constant else float(stats.spearmanr(targets, predictions)[0]),
      "mse": float(np.mean(np.square(predictions - targets))),
  }


def multilabel_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict:
  """micro_f1, macro_f1 over labels, and exact_match (every label of the example right)."""
  from sklearn import metrics as skm
  return {
      "micro_f1": float(skm.f1_score(targets, predictions, average="micro", zero_division=0)),
      "macro_f1": float(skm.f1_score(targets, predictions, average="macro", zero_division=0)),
      "exact_match": float(np.mean(np.all(targets == predictions, axis=1))),
  }


def entity_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict:
  """Entity-level micro precision / recall / f1 with seqeval's (conlleval's) conventions, a
  per-type report, and token_accuracy over words."""
  from seqeval import metrics as sqm
  report = sqm.classification_report(gold, predicted, output_dict=True, zero_division=0)
  per_type = {name: {"precision": float(r["precision"]), "recall": float(r["recall"]),
                     "f1": float(r["f1-score"]), "support": int(r["support"])}
              for name, r in report.items() if not name.endswith(" avg")}
  words = sum(len(s) for s in gold)
  right = sum(g == p for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps))
  return {
      "precision": float(sqm.precision_score(gold, predicted, zero_division=0)),
      "recall": float(sqm.recall_score(gold, predicted, zero_division=0)),
      "f1": float(sqm.f1_score(gold, predicted, zero_division=0)),
      "token_accuracy": right / max(words, 1),
      "per_type": per_type,
  }


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def log_softmax(x: np.ndarray) -> np.ndarray:
  m = x.max(-1, keepdims=True)
  return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def task_metrics(task, outputs: dict, data) -> dict:
  """The task's metrics (jaxft.config.TASK_METRICS) from the per-example eval outputs of a
  jaxft.tasks.Task and the gold labels in `data` (jaxft.data.encode.Encoded)."""
  if task.kind == "mlm":
    count = float(np.sum(outputs["count"]))
    loss = float(np.sum(outputs["nll"])) / max(count, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
            "accuracy": float(np.sum(outputs["correct"])) / max(count, 1.0)}
  if task.kind == "token_classification":
    return token_metrics(task, outputs["logits"], data)
  logits = np.stack(outputs["logits"])
  predictions = task.predictions(logits)
  if task.kind == "regression":
    result = regression_metrics(data.labels, predictions)
    result["loss"] = result["mse"]
  elif task.kind == "multilabel":
    result = multilabel_metrics(data.labels.astype(np.int32), predictions)
    p = np.clip(sigmoid(logits), 1e-7, 1 - 1e-7)
    result["loss"] = float(-np.mean(data.labels * np.log(p) + (1 - data.labels) * np.log(1 - p)))
  else:
    result = classification_metrics(data.labels, predictions, len(task.label_names))
    log_probs = log_softmax(logits)
    result["loss"] = float(-log_probs[np.arange(len(data)), data.labels].mean())
  return result


def token_metrics(task, window_logits: list, data) -> dict:
  """Entity scores over every word of every sentence (windows mapped back to words), and the
  token loss over scored positions."""
  log_probs = [log_softmax(x) for x in window_logits]
  nll = sum(-float(np.sum(lp[np.arange(len(lp)), y[:len(lp)]] * w[:len(lp)]))
            for lp, y, w in zip(log_probs, data.labels, data.label_weights))
  scored = sum(float(np.sum(w)) for w in data.label_weights)
  predicted_ids = data.words.sentence_predictions([x.argmax(-1) for x in window_logits])
  names = task.label_names
  predicted = [[names[i] for i in sentence] for sentence in predicted_ids]
  result = entity_metrics(data.words.tags, predicted)
  result["loss"] = nll / max(scored, 1.0)
  return result


def scalars(values: dict) -> dict:
  """The plain-number entries of a metrics dict (what TensorBoard and checkpoints record)."""
  return {k: v for k, v in values.items()
          if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}


class MetricWriter:
  """Appends {"step", "split", ...} lines to metrics.jsonl and scalars to TensorBoard (tb/)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = storage.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      writer_class = _summary_writer_class()  # first: it keeps tensorboardX from importing torch
      _register_remote_event_files()
      self._tb = writer_class(storage.join(workdir, "tb"))

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after `step` (a resumed run logs those steps again)."""
    if not self.enabled or not storage.exists(self.path):
      return
    kept = [line for line in storage.read_text(self.path).splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= step]
    storage.write_text(self.path, "".join(kept))

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in values.items()}}
    storage.append_text(self.path, json.dumps(record) + "\n")
    for key, value in scalars(values).items():
      self._tb.add_scalar(f"{split}/{key}", float(value), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _RemoteEventFile:
  """An event file at a remote URL. An object is written whole when it closes, so flushing
  has nothing to do (and the file has no descriptor for tensorboardX to fsync)."""

  def __init__(self, path: str):
    self._file = storage.open_file(path, "wb")

  def write(self, data: bytes) -> None:
    self._file.write(data)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self._file.close()


class _RemoteEventFiles:
  """tensorboardX's writer factory for remote URLs (its own for gs:// needs
  google-cloud-storage): event files through jaxft.storage. A remote event file becomes
  visible when the writer closes; metrics.jsonl has every value meanwhile."""

  def open(self, path: str) -> _RemoteEventFile:
    return _RemoteEventFile(path)

  def directory_check(self, path: str) -> None:
    storage.makedirs(path)


def _register_remote_event_files() -> None:
  from tensorboardX import record_writer
  for scheme in ("gs", "s3"):
    record_writer.register_writer_factory(scheme, _RemoteEventFiles())


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch at import time whenever it is installed (to accept torch tensors,
  which jaxft never passes), seconds of every run's start. Where torch is
  not loaded yet, the import sees it as absent; torch stays importable afterwards.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def _plain(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  return value


def read_metrics(workdir: str, split: Optional[str] = None) -> list[dict]:
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return []
  records = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
  return [r for r in records if split is None or r.get("split") == split]
