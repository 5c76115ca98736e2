"""Task metrics (from scikit-learn) and the metric writers: metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np


def classification_metrics(labels: np.ndarray, predictions: np.ndarray,
                           num_labels: int) -> dict[str, float]:
  """accuracy, macro_f1, mcc; and binary_f1 (F1 of class 1) for two-class tasks."""
  from sklearn import metrics as skm  # imported here: it costs ~2 s at every process start
  all_labels = list(range(num_labels))
  out = {
      "accuracy": float(skm.accuracy_score(labels, predictions)),
      "macro_f1": float(skm.f1_score(labels, predictions, average="macro", labels=all_labels,
                                     zero_division=0)),
      "mcc": float(skm.matthews_corrcoef(labels, predictions)),
  }
  if num_labels == 2:
    out["binary_f1"] = float(skm.f1_score(labels, predictions, pos_label=1, zero_division=0))
  return out


class MetricWriter:
  """Appends {"step", "split", ...} lines to metrics.jsonl and scalars to TensorBoard (tb/)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after `step` (a resumed run logs those steps again)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in values.items():
      if isinstance(value, (int, float, np.floating, np.integer)):
        self._tb.add_scalar(f"{split}/{key}", float(value), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  return value


def read_metrics(workdir: str, split: Optional[str] = None) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if split is None or r.get("split") == split]
