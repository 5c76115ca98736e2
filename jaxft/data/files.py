"""Reading data files into column dictionaries.

CSV and TSV files are read here with Python's csv module; JSON, JSON lines, Parquet and folders
written by `save_to_disk` through Hugging Face `datasets`, imported only for them: importing it
(with pandas and pyarrow) is a noticeable share of a short run's start.

Every column of a delimited file is read as text (labels included) so that label handling is one
code path, and so that sentences such as "null" or "NA" are kept as written. Delimited files are
read with quoting off: GLUE's TSV files hold bare quote characters that would otherwise swallow
rows; CSV files keep standard quoting so that a quoted field may hold commas.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import os
from typing import Optional, Sequence

from jaxft.errors import UserError, fail

_EXTENSION_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl",
                      ".parquet": "parquet", ".conll": "conll", ".txt": "text"}


def infer_format(path: str, fmt: Optional[str]) -> str:
  if fmt:
    return fmt
  if os.path.isdir(path):
    check_readable(path, "dataset")  # a folder is only readable as a save_to_disk dataset
    return "dataset"
  ext = os.path.splitext(path)[1].lower()
  if ext not in _EXTENSION_FORMATS:
    fail(f"cannot tell the format of {path} from its extension; set --config.data.format to one "
         f"of {sorted(set(_EXTENSION_FORMATS.values()))}")
  return _EXTENSION_FORMATS[ext]


def _is_saved_dataset(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, name))
             for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def check_readable(path: str, fmt: Optional[str] = None) -> None:
  if not os.path.exists(path):
    fail(f"data file {path} does not exist; check the data.*_file paths in the config")
  if os.path.isdir(path) and fmt == "dataset" and _is_saved_dataset(path):
    return
  if os.path.isdir(path):
    fail(f"data file {path} is a folder; point data.*_file at a file (or at a folder written "
         "by datasets' save_to_disk)")
  if not os.access(path, os.R_OK):
    fail(f"data file {path} is not readable; check its permissions")
  if os.path.getsize(path) == 0:
    fail(f"data file {path} is empty")


def _quoting(delimiter: str) -> int:
  # TSV: quoting off (GLUE files hold bare quotes). CSV: standard quoting, so "a, b" is one field.
  return csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL


def _column_names(path: str, delimiter: str, has_header: bool,
                  column_names: Optional[Sequence[str]]) -> list[str]:
  """Column names from config, else the header line, else "0", "1", ... for headerless files."""
  with open(path, encoding="utf-8-sig", errors="replace") as f:
    first = f.readline().rstrip("\r\n")
    if has_header and not any(line.strip() for line in f):
      fail(f"data file {path} holds no rows (only a header line)")
  found = next(csv.reader([first], delimiter=delimiter, quoting=_quoting(delimiter)))
  if column_names:
    if len(column_names) != len(found):
      fail(f"data.column_names names {len(column_names)} columns but the first line of {path} "
           f"has {len(found)}; check data.column_names and the delimiter")
    return list(column_names)
  if not has_header:
    return [str(i) for i in range(len(found))]
  if len(set(found)) != len(found) or any(not n.strip() for n in found):
    fail(f"the header of {path} has empty or repeated column names {found}; fix it or set "
         "data.has_header=False with data.column_names")
  return found


@functools.cache
def _datasets():
  """Hugging Face `datasets`, imported and quietened once, on first use."""
  import datasets
  datasets.disable_progress_bars()
  datasets.logging.set_verbosity_error()
  logging.getLogger("datasets").setLevel(logging.ERROR)
  return datasets


def _read_delimited(path: str, fmt: str, has_header: bool,
                    column_names: Optional[Sequence[str]],
                    max_rows: Optional[int]) -> dict[str, list]:
  """Every column as text, as written ("NA" stays "NA"); blank lines are skipped, a row with
  fewer fields than the header gets empty strings for the missing ones, one with more is an
  error (as pandas' reader, which jaxft used before, did)."""
  delimiter = "\t" if fmt == "tsv" else ","
  names = _column_names(path, delimiter, has_header, column_names)
  columns: dict[str, list] = {name: [] for name in names}
  csv.field_size_limit(2**31 - 1)  # the default, 128 KiB, would reject a long document
  rows = 0
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f, delimiter=delimiter, quoting=_quoting(delimiter))
    if has_header:
      next(reader, None)
    for row in reader:
      if not row:
        continue
      if max_rows is not None and rows >= max_rows:
        break
      if len(row) > len(names):
        fail(f"line {reader.line_num} of {path} has {len(row)} fields where the "
             f"{'header' if has_header else 'first line'} has {len(names)}; check the file's "
             f"delimiter (data.format={fmt}) and data.has_header")
      row += [""] * (len(names) - len(row))
      for column, value in zip(columns.values(), row):
        column.append(value)
      rows += 1
  return columns


def _load(path: str, fmt: str):
  """A `datasets.Dataset` of a JSON, JSON lines or Parquet file or a save_to_disk folder."""
  datasets = _datasets()
  if fmt == "dataset":
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
      fail(f"{path} holds several splits {list(ds)}; point data.*_file at one split's folder "
           f"(e.g. {os.path.join(path, next(iter(ds)))})")
    return ds
  if fmt in ("conll", "text"):
    fail(f"data.format={fmt} is read by the task's own reader, not as columns")
  builder = "json" if fmt in ("json", "jsonl") else fmt
  return datasets.load_dataset(builder, data_files={"data": path}, split="data")


def _class_label_names(ds, column: str) -> Optional[list[str]]:
  """The names behind a ClassLabel column (or a sequence of them), as Hugging Face datasets
  such as conll2003 store tags; None for plain columns."""
  feature = ds.features.get(column)
  inner = getattr(feature, "feature", feature)  # Sequence(ClassLabel) -> ClassLabel
  if isinstance(feature, list) and feature:
    inner = feature[0]
  return list(inner.names) if isinstance(inner, _datasets().ClassLabel) else None


def _named_labels(ds) -> dict[str, list]:
  """Columns as lists, with ClassLabel ids replaced by their names."""
  columns = ds.to_dict()
  for name in columns:
    names = _class_label_names(ds, name)
    if names is not None:
      columns[name] = [[names[i] for i in v] if isinstance(v, list) else names[v]
                       for v in columns[name]]
  return columns


def _read_with_datasets(path: str, fmt: str, max_rows: Optional[int]) -> dict[str, list]:
  ds = _load(path, fmt)
  if max_rows is not None and max_rows < len(ds):
    ds = ds.select(range(max_rows))
  return _named_labels(ds)


def read_columns(path: str, fmt: Optional[str], *, has_header: bool = True,
                 column_names: Optional[Sequence[str]] = None,
                 max_rows: Optional[int] = None) -> dict[str, list]:
  """Reads the first `max_rows` rows of a data file as {column name: list of values}."""
  fmt = infer_format(path, fmt)
  check_readable(path, fmt)
  try:
    if fmt in ("csv", "tsv"):
      columns = _read_delimited(path, fmt, has_header, column_names, max_rows)
    else:
      columns = _read_with_datasets(path, fmt, max_rows)
  except UserError:
    raise
  except UnicodeDecodeError as e:
    fail(f"data file {path} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8")
  except Exception as e:  # datasets wraps parser errors in its own types; the cause says more
    cause = e.__cause__ or e
    if isinstance(cause, UnicodeDecodeError):
      fail(f"data file {path} is not valid UTF-8 (byte {cause.start}); re-encode it as UTF-8")
    fail(f"cannot read {path} as {fmt}: {type(cause).__name__}: {cause}; "
         "check data.format, data.has_header and the file's delimiter")
  if not columns or not next(iter(columns.values())):
    fail(f"data file {path} holds no rows")
  return columns


def read_lines(path: str, max_rows: Optional[int] = None) -> list[str]:
  """Plain text, one example per line; blank lines are skipped."""
  check_readable(path)
  try:
    with open(path, encoding="utf-8") as f:
      lines = [line.strip() for line in f]
  except UnicodeDecodeError as e:
    fail(f"data file {path} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8")
  lines = [line for line in lines if line]
  if not lines:
    fail(f"data file {path} holds no text lines")
  return lines[:max_rows] if max_rows else lines


@dataclasses.dataclass(frozen=True)
class TaggedSentences:
  """Word-level examples: the words and tags of each sentence, and the line each started on."""
  words: list[list[str]]
  tags: Optional[list[list[str]]]
  first_lines: list[int]


def read_conll(path: str, token_column: int, tag_column: Optional[int],
               max_rows: Optional[int] = None) -> TaggedSentences:
  """CoNLL-style files: one token per line, whitespace- or tab-separated columns; any
  whitespace-only line ends a sentence; `-DOCSTART-` lines are skipped. `tag_column=None` reads
  words only (prediction input)."""
  check_readable(path)
  words, tags, first_lines = [], [], []
  sentence_words, sentence_tags, first = [], [], 0

  def close_sentence():
    if sentence_words:
      words.append(sentence_words)
      tags.append(sentence_tags)
      first_lines.append(first)

  try:
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        fields = line.split()
        if not fields:  # blank, or only spaces / tabs: a sentence break
          close_sentence()
          sentence_words, sentence_tags = [], []
          if max_rows and len(words) >= max_rows:
            break
          continue
        if fields[0] == "-DOCSTART-":
          continue
        try:
          word = fields[token_column]
          tag = fields[tag_column] if tag_column is not None else None
        except IndexError:
          fail(f"{path} line {number} has {len(fields)} column(s) {fields}; data.token_column="
               f"{token_column} and data.tag_column={tag_column} must index into them")
        if not sentence_words:
          first = number
        sentence_words.append(word)
        sentence_tags.append(tag)
      else:
        close_sentence()
  except UnicodeDecodeError as e:
    fail(f"data file {path} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8")
  if not words:
    fail(f"data file {path} holds no sentences (token lines separated by blank lines)")
  words, tags, first_lines = words[:max_rows or None], tags[:max_rows or None], first_lines[
      :max_rows or None]
  return TaggedSentences(words, tags if tag_column is not None else None, first_lines)
