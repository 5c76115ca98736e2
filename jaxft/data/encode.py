"""From a data file to token ids and labels: the examples a task trains and evaluates on."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from jaxft.data import files, labels
from jaxft.errors import fail


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Tokenized examples, unpadded: one int32 array of ids per example."""
  input_ids: list
  token_type_ids: list
  labels: np.ndarray  # int32 class ids

  def __len__(self) -> int:
    return len(self.input_ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.fromiter((len(x) for x in self.input_ids), np.int32, len(self.input_ids))


def _column(columns: dict, name: str, path: str, role: str) -> list:
  if name not in columns:
    fail(f"{path} has no column {name!r} ({role}); its columns are {list(columns)}; "
         f"set data.{role} to one of them")
  return columns[name]


def _texts(columns: dict, name: str, path: str) -> list[str]:
  values = _column(columns, name, path, "text_fields")
  for row, value in enumerate(values):
    if value is None or not str(value).strip():
      fail(f"{path} data row {row + 1}: text column {name!r} is empty; remove or fill the row")
  return [str(v) for v in values]


def read_split(path: str, config, tokenizer, label_names: Optional[Sequence[str]],
               max_rows: Optional[int]) -> tuple[Encoded, tuple[str, ...]]:
  """Reads, checks and tokenizes one split. Returns the examples and the label names used."""
  d = config.data
  columns = files.read_columns(path, d.format, has_header=d.has_header,
                               column_names=d.column_names, max_rows=max_rows)
  texts = [_texts(columns, name, path) for name in d.text_fields]
  raw_labels = _column(columns, d.label_field, path, "label_field")
  if label_names is None:
    label_names = labels.infer_label_names(raw_labels, path)
  label_ids = labels.encode_labels(raw_labels, label_names, path)
  tokens = tokenizer(*texts, truncation=True, max_length=d.max_seq_length,
                     return_token_type_ids=True, return_attention_mask=False)
  input_ids = [np.asarray(x, np.int32) for x in tokens["input_ids"]]
  token_type_ids = [np.asarray(x, np.int32) for x in tokens["token_type_ids"]]
  return Encoded(input_ids, token_type_ids, label_ids), tuple(label_names)
