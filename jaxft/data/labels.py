"""Class labels: inferring the label set from training data and mapping values to ids."""

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
    for i, name in enumerate(names):
      try:
        float(name)
      except ValueError:
        continue
      fail(f"label {name!r} in {path} is a number but not an integer: is this a regression file? "
           "task.kind=classification needs class labels")
  return tuple(names)


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
