"""Labels: inferring the label set from training data and mapping values to ids (classification,
multilabel, tags), or reading numbers (regression). Every error names the row."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jaxft.errors import fail


def _as_int(value: str) -> Optional[int]:
  try:
    return int(value)
  except (TypeError, ValueError):
    return None


def infer_label_names(values: Sequence, path: str) -> tuple[str, ...]:
  """The sorted distinct labels of the training data (numerically when they are all integers)."""
  names = sorted({str(v).strip() for v in values})
  if len(names) < 2:
    fail(f"the label column of {path} holds {len(names)} distinct value(s) {names}; "
         "classification needs at least two (or set data.label_names)")
  if all(_as_int(n) is not None for n in names):
    names = sorted(names, key=int)
  else:
    for row, value in enumerate(values):
      text = str(value).strip()
      if _as_int(text) is None and _as_float(text) is not None:
        fail(f"{path} data row {row + 1}: label {str(value).strip()!r} is a number but not an "
             "integer: is this a regression file? Set task.kind=regression, or give class labels")
  return tuple(names)


def _as_float(value: str) -> Optional[float]:
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def regression_targets(values: Sequence, path: str) -> np.ndarray:
  """The float target of every row."""
  out = np.empty(len(values), np.float32)
  for row, value in enumerate(values):
    number = _as_float(str(value).strip()) if value is not None else None
    if number is None or not np.isfinite(number):
      fail(f"{path} data row {row + 1}: regression target {value!r} is not a number; fix the "
           "row, or use task.kind=classification for class labels")
    out[row] = number
  return out


def split_multilabel(values: Sequence, delimiter: str, path: str) -> list[list[str]]:
  """Each row's labels: a list (JSON) or a delimited string ("sports,politics"); "" = none."""
  rows = []
  for row, value in enumerate(values):
    if isinstance(value, (list, tuple)):
      rows.append([str(v).strip() for v in value])
    elif value is None:
      fail(f"{path} data row {row + 1}: the label column is empty; write an empty string for "
           "no labels")
    else:
      rows.append([v.strip() for v in str(value).split(delimiter) if v.strip()])
  return rows


def infer_tag_names(rows: Sequence[Sequence[str]], path: str, what: str) -> tuple[str, ...]:
  """Sorted distinct labels (multilabel) or tags (token classification) of the training data."""
  names = sorted({v for row in rows for v in row})
  if len(names) < 2:
    fail(f"{path} holds {len(names)} distinct {what} {names}; at least two are needed (or set "
         "data.label_names)")
  return tuple(names)


def encode_multihot(rows: Sequence[Sequence[str]], label_names: Sequence[str],
                    path: str) -> np.ndarray:
  index = {name: i for i, name in enumerate(label_names)}
  out = np.zeros((len(rows), len(label_names)), np.float32)
  for row, labels in enumerate(rows):
    for label in labels:
      if label not in index:
        fail(f"{path} data row {row + 1}: label {label!r} is not one of data.label_names "
             f"{list(label_names)}; fix the row or set --config.data.label_names")
      out[row, index[label]] = 1.0
  return out


def encode_labels(values: Sequence, label_names: Sequence[str], path: str) -> np.ndarray:
  """Maps each label to its index in `label_names`.

  A value matches a name, or, failing that, is an integer index into `label_names` (so a file with
  0/1 labels can be given the names ("negative", "positive")).
  """
  index = {name: i for i, name in enumerate(label_names)}
  ids = np.empty(len(values), np.int32)
  for row, value in enumerate(values):
    text = str(value).strip()
    if text in index:
      ids[row] = index[text]
      continue
    as_int = _as_int(text)
    if as_int is not None and 0 <= as_int < len(label_names):
      ids[row] = as_int
      continue
    fail(f"{path} data row {row + 1}: label {text!r} is not one of data.label_names "
         f"{list(label_names)}; fix the row or set --config.data.label_names")
  return ids
