"""From a data file to token ids and labels: the examples a task trains and evaluates on.

`read_split` is the one entry: it reads the file the way the task needs (sentence or pair
columns, word/tag sequences, plain text), checks every row, and tokenizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jaxft import config as config_lib
from jaxft.data import files, labels, tokens
from jaxft.errors import fail


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Tokenized examples, unpadded: one int32 array of ids per example (a window, for token
  classification)."""
  input_ids: list
  token_type_ids: list
  # classification [N] int32; regression [N] float32; multilabel [N, labels] float32;
  # token classification: one int32 tag id per position; mlm / unlabelled input: None.
  labels: Any = None
  label_weights: Optional[list] = None  # token classification: 1 where a position is scored
  words: Optional[tokens.WordMap] = None  # token classification: windows -> sentence words
  texts: Optional[list] = None  # sequence tasks: the raw text columns (for prediction output)

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


def _tokenize(tokenizer, texts: list[list[str]], max_seq_length: int) -> tuple[list, list]:
  out = tokenizer(*texts, truncation=True, max_length=max_seq_length,
                  return_token_type_ids=True, return_attention_mask=False)
  return ([np.asarray(x, np.int32) for x in out["input_ids"]],
          [np.asarray(x, np.int32) for x in out["token_type_ids"]])


def encode_texts(tokenizer, texts: Sequence[str], max_seq_length: int) -> Encoded:
  """Single texts as unlabelled examples (label descriptions, jaxft.fewshot)."""
  input_ids, token_type_ids = _tokenize(tokenizer, [list(texts)], max_seq_length)
  return Encoded(input_ids, token_type_ids, texts=[list(texts)])


def _sequence_labels(kind: str, raw: list, label_names, config, path: str):
  """(label array, label names) for the sequence-level tasks."""
  if kind == "regression":
    return labels.regression_targets(raw, path), ()
  if kind == "multilabel":
    rows = labels.split_multilabel(raw, config.data.label_delimiter, path)
    names = label_names or labels.infer_tag_names(rows, path, "labels")
    return labels.encode_multihot(rows, names, path), names
  names = label_names or labels.infer_label_names(raw, path)
  return labels.encode_labels(raw, names, path), names


def _read_sequences(path, config, tokenizer, label_names, max_rows, labelled, subset=None):
  d = config.data
  columns = files.read_columns(path, d.format, has_header=d.has_header,
                               column_names=d.column_names, max_rows=max_rows)
  texts = [_texts(columns, name, path) for name in d.text_fields]
  label_array = None
  if labelled:
    raw = _column(columns, d.label_field, path, "label_field")
    label_array, label_names = _sequence_labels(config.task.kind, raw, label_names, config, path)
    if subset is not None:  # chosen by label before tokenizing (few-shot: a few of many rows)
      rows = subset(label_array, tuple(label_names))
      texts, label_array = [[column[i] for i in rows] for column in texts], label_array[rows]
  input_ids, token_type_ids = _tokenize(tokenizer, texts, d.max_seq_length)
  return Encoded(input_ids, token_type_ids, label_array, texts=texts), tuple(label_names or ())


def read_tagged_sentences(path: str, config, max_rows: Optional[int],
                          labelled: bool = True) -> files.TaggedSentences:
  """Words and tags from CoNLL files, or from list columns (JSON, JSONL, saved datasets)."""
  d = config.data
  if files.infer_format(path, d.format) == "conll":
    return files.read_conll(path, d.token_column, d.tag_column if labelled else None, max_rows)
  columns = files.read_columns(path, d.format, max_rows=max_rows)
  words = _column(columns, d.text_fields[0], path, "text_fields")
  tags = _column(columns, d.label_field, path, "label_field") if labelled else None
  for row, sentence in enumerate(words):
    if not isinstance(sentence, list) or not sentence:
      fail(f"{path} data row {row + 1}: column {d.text_fields[0]!r} must hold a non-empty list "
           "of words for task.kind=token_classification")
    if tags is not None and (not isinstance(tags[row], list) or len(tags[row]) != len(sentence)):
      fail(f"{path} data row {row + 1}: {len(sentence)} words but tags {tags[row]!r}; give one "
           "tag per word")
  return files.TaggedSentences([[str(w) for w in s] for s in words],
                               None if tags is None else [[str(t) for t in s] for s in tags],
                               list(range(1, len(words) + 1)))


def _tag_ids(sentences: files.TaggedSentences, tag_names: Sequence[str],
             path: str) -> list[np.ndarray]:
  index = {name: i for i, name in enumerate(tag_names)}
  out = []
  for sentence, (tags, line) in enumerate(zip(sentences.tags, sentences.first_lines)):
    for k, tag in enumerate(tags):
      if tag not in index:
        fail(f"{path} sentence {sentence + 1} (line {line + k}): tag {tag!r} is not one of the "
             f"tags {list(tag_names)}; fix the file or set --config.data.label_names")
    out.append(np.asarray([index[t] for t in tags], np.int32))
  return out


def _read_tagged(path, config, tokenizer, label_names, max_rows, labelled):
  d = config.data
  sentences = read_tagged_sentences(path, config, max_rows, labelled)
  tag_ids = None
  if labelled:
    label_names = label_names or labels.infer_tag_names(sentences.tags, path, "tags")
    tag_ids = _tag_ids(sentences, label_names, path)
  (input_ids, token_type_ids, tag_labels, weights, window_sentence,
   position_word) = tokens.encode_windows(tokenizer, sentences.words, tag_ids, label_names or (),
                                          d.max_seq_length, d.window_overlap,
                                          d.label_all_subtokens)
  words = tokens.WordMap(sentences.words, sentences.tags, window_sentence, position_word)
  return (Encoded(input_ids, token_type_ids, tag_labels if labelled else None, weights, words),
          tuple(label_names or ()))


def _read_text(path, config, tokenizer, max_rows):
  d = config.data
  if files.infer_format(path, d.format) == "text":
    texts = files.read_lines(path, max_rows)
  else:
    columns = files.read_columns(path, d.format, has_header=d.has_header,
                                 column_names=d.column_names, max_rows=max_rows)
    texts = _texts(columns, d.text_fields[0], path)
  input_ids, token_type_ids = _tokenize(tokenizer, [texts], d.max_seq_length)
  return Encoded(input_ids, token_type_ids, texts=[texts]), ()


def _read_plain_inputs(path, config, tokenizer, label_names):
  """Prediction input as plain text, one example per line: the text fields tab-separated
  (a sentence pair), or, for token classification, words separated by spaces."""
  d = config.data
  lines = files.read_lines(path)
  if config.task.kind == "token_classification":
    words = [line.split() for line in lines]
    (input_ids, token_type_ids, _, weights, window_sentence,
     position_word) = tokens.encode_windows(tokenizer, words, None, label_names,
                                            d.max_seq_length, d.window_overlap, False)
    return Encoded(input_ids, token_type_ids, None, weights,
                   tokens.WordMap(words, None, window_sentence, position_word))
  fields = [line.split("\t") for line in lines]
  for row, parts in enumerate(fields):
    if len(parts) != len(d.text_fields):
      fail(f"{path} line {row + 1} has {len(parts)} tab-separated field(s); this model reads "
           f"{len(d.text_fields)} ({', '.join(d.text_fields)}): write them tab-separated")
  texts = [list(column) for column in zip(*fields)]
  input_ids, token_type_ids = _tokenize(tokenizer, texts, d.max_seq_length)
  return Encoded(input_ids, token_type_ids, texts=texts)


def read_inputs(path: str, config, tokenizer, label_names: Sequence[str],
                fmt: Optional[str] = None) -> Encoded:
  """Unlabelled examples to predict on: plain text (.txt), a file in a training format holding
  the training text fields (TSV, CSV, JSON, JSONL, parquet), or CoNLL / JSON word lists (token
  classification). The format comes from `fmt`, else from the file's extension."""
  fmt = files.infer_format(path, fmt)
  if fmt == "text":
    shorter, count, before = _room_for_virtual_tokens(config)
    return with_virtual_tokens(_read_plain_inputs(path, shorter, tokenizer, label_names),
                               count, before)
  as_format = config_lib.replace(config, {"data.format": fmt})
  return read_split(path, as_format, tokenizer, label_names, None, labelled=False)[0]


def _unknown_labels(kind: str, data: Encoded, num_labels: int):
  """Labels that mark every example of `data` as unlabelled: class or tag id -1, NaN targets."""
  n = len(data)
  if kind == "classification":
    return np.full((n,), -1, np.int32)
  if kind == "regression":
    return np.full((n,), np.nan, np.float32)
  if kind == "multilabel":
    return np.full((n, num_labels), np.nan, np.float32)
  return [np.full(len(ids), -1, np.int32) for ids in data.input_ids]


def read_unlabelled_examples(path: str, config, tokenizer, label_names: Sequence[str],
                             max_rows: Optional[int]) -> Encoded:
  """Training examples without labels (distillation's transfer data, jaxft.distill): the
  inputs of `path` with labels that say unknown (-1 ids, NaN targets), so that a loss can tell
  them from labelled ones."""
  data, _ = read_split(path, config, tokenizer, label_names, max_rows, labelled=False)
  return dataclasses.replace(data, labels=_unknown_labels(config.task.kind, data,
                                                          len(label_names)))


def concatenate(first: Encoded, second: Encoded) -> Encoded:
  """Training examples of both (labels of the same kind); word maps, which only evaluation and
  prediction read, are dropped."""
  def joined(a, b):
    if a is None or b is None:
      return None
    if isinstance(a, np.ndarray):
      return np.concatenate([a, b])
    return list(a) + list(b)

  texts = None
  if first.texts is not None and second.texts is not None:
    texts = [list(a) + list(b) for a, b in zip(first.texts, second.texts)]
  return Encoded(joined(first.input_ids, second.input_ids),
                 joined(first.token_type_ids, second.token_type_ids),
                 joined(first.labels, second.labels),
                 joined(first.label_weights, second.label_weights), None, texts)


def _room_for_virtual_tokens(config):
  """(config whose data.max_seq_length leaves room for the virtual tokens, their count, before
  the text?): prompt and prefix tuning's tokens count towards the length."""
  count, before = config_lib.virtual_tokens(config.peft)
  if count:
    config = config_lib.replace(config, {"data.max_seq_length":
                                         config.data.max_seq_length - count})
  return config, count, before


def with_virtual_tokens(data: Encoded, count: int, before: bool) -> Encoded:
  """Every example with `count` virtual token positions, ids -1, -2, ... (jaxft.peft: prompt
  tuning puts them before the text, prefix tuning after it), token type 0, never scored."""
  if not count:
    return data
  virtual = -np.arange(1, count + 1, dtype=np.int32)

  def joined(arrays, filler):  # filler None: the virtual ids themselves
    if arrays is None:
      return None

    def one(x):
      extra = virtual if filler is None else np.full((count,), filler, x.dtype)
      return np.concatenate([extra, x] if before else [x, extra])

    return [one(x) for x in arrays]

  per_token = isinstance(data.labels, list)  # token classification: a label per position
  words = data.words
  if words is not None:
    words = dataclasses.replace(words, position_word=joined(words.position_word, -1))
  return dataclasses.replace(
      data, input_ids=joined(data.input_ids, None), token_type_ids=joined(data.token_type_ids, 0),
      labels=joined(data.labels, 0) if per_token else data.labels,
      label_weights=joined(data.label_weights, 0.0), words=words)


def read_split(path: str, config, tokenizer, label_names: Optional[Sequence[str]],
               max_rows: Optional[int], labelled: bool = True,
               subset: Optional[Callable] = None) -> tuple[Encoded, tuple[str, ...]]:
  """Reads, checks and tokenizes one split. Returns the examples and the label names used
  (inferred from this file when `label_names` is None). `labelled=False` reads inputs only.
  `subset(labels, label_names)` (sequence tasks) picks the rows to keep. Prompt and prefix
  tuning's virtual tokens are added, within data.max_seq_length."""
  shorter, count, before = _room_for_virtual_tokens(config)
  data, names = _read_split(path, shorter, tokenizer, label_names, max_rows, labelled, subset)
  return with_virtual_tokens(data, count, before), names


def _read_split(path, config, tokenizer, label_names, max_rows, labelled, subset):
  kind = config.task.kind
  if kind == "token_classification":
    return _read_tagged(path, config, tokenizer, label_names, max_rows, labelled)
  if kind == "mlm":
    return _read_text(path, config, tokenizer, max_rows)
  return _read_sequences(path, config, tokenizer, label_names, max_rows, labelled, subset)
