"""Token classification input: word pieces aligned with word-level tags, and long sentences cut
into windows so that every word (and so every gold entity) is scored exactly once.

A word's tag goes on its first word piece; the other pieces are not scored (or, with
`data.label_all_subtokens`, carry the word's tag, B-X turned into I-X). A sentence longer than
`data.max_seq_length` becomes several windows: each scores the words after the previous window's
and repeats up to `data.window_overlap` pieces before them as left context. Predictions are read
back from the first piece of each scored word (`position_word`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class WordMap:
  """How windows map back to sentences: what prediction and entity scoring need."""
  words: list[list[str]]  # the words of every sentence
  tags: Optional[list[list[str]]]  # gold tags (None for unlabelled input)
  window_sentence: np.ndarray  # [windows]: the sentence each window comes from
  position_word: list[np.ndarray]  # per window, per position: the word scored there, or -1

  def sentence_predictions(self, window_values: Sequence[np.ndarray],
                           fill=0) -> list[np.ndarray]:
    """Per sentence, per word: the value at the word's first piece in the window scoring it.
    `window_values[i]` holds one value (or row) per position of window i."""
    sample = np.asarray(window_values[0])
    out = [np.full((len(words), *sample.shape[1:]), fill, sample.dtype) for words in self.words]
    for window, (sentence, positions) in enumerate(zip(self.window_sentence,
                                                         self.position_word)):
      scored = positions >= 0
      out[sentence][positions[scored]] = np.asarray(window_values[window])[scored]
    return out


def word_pieces(tokenizer, sentences: Sequence[Sequence[str]]) -> list[list[list[int]]]:
  """The word-piece ids of every word of every sentence, in one batched tokenizer call.

  A word the tokenizer turns into nothing (a zero-width space, a control character) becomes
  [UNK], so that every word keeps a position and a prediction.
  """
  encoded = tokenizer([list(s) for s in sentences], is_split_into_words=True,
                      add_special_tokens=False, return_attention_mask=False)
  out = []
  for i, words in enumerate(sentences):
    pieces: list[list[int]] = [[] for _ in words]
    for token, word in zip(encoded["input_ids"][i], encoded.word_ids(i)):
      if word is not None:
        pieces[word].append(token)
    for p in pieces:
      if not p:
        p.append(tokenizer.unk_token_id)
    out.append(pieces)
  return out


def windows(piece_counts: Sequence[int], capacity: int,
            overlap: int) -> list[tuple[int, int, int]]:
  """(context start, first scored word, end) of each window over one sentence's words.

  Greedy: each window scores as many words as fit after at most `overlap` pieces of left
  context (at most half the window); a single word longer than the window is cut to fit.
  """
  overlap = min(overlap, capacity // 2)
  out, start, n = [], 0, len(piece_counts)
  while start < n:
    context, used = start, 0
    while start > 0 and context > 0 and used + piece_counts[context - 1] <= overlap:
      context -= 1
      used += piece_counts[context]
    end, total = start, used
    while end < n and total + piece_counts[end] <= capacity:
      total += piece_counts[end]
      end += 1
    if end == start:  # one word with more pieces than the window holds
      context, end = start, start + 1
    out.append((context, start, end))
    start = end
  return out


def inside_tag_ids(tag_names: Sequence[str]) -> np.ndarray:
  """For each tag id, the id to put on a word's later pieces: I-X for B-X when I-X exists."""
  index = {name: i for i, name in enumerate(tag_names)}
  return np.array([index.get("I-" + name[2:], i) if name.startswith("B-") else i
                   for i, name in enumerate(tag_names)], np.int32)


def encode_windows(tokenizer, words: list[list[str]], tag_ids: Optional[list[np.ndarray]],
                   tag_names: Sequence[str], max_seq_length: int, overlap: int,
                   label_all_subtokens: bool):
  """Windows of word pieces with special tokens. Returns (input_ids, token_type_ids, labels,
  label_weights, window_sentence, position_word), one entry per window."""
  built = tokenizer.build_inputs_with_special_tokens([-1])
  lead, capacity = built.index(-1), max_seq_length - (len(built) - 1)
  inside = inside_tag_ids(tag_names)
  pieces_of = word_pieces(tokenizer, words)
  input_ids, labels, label_weights, window_sentence, position_word = [], [], [], [], []
  for sentence, pieces in enumerate(pieces_of):
    for context, start, end in windows([len(p) for p in pieces], capacity, overlap):
      ids, tag, weight, word_at = [], [], [], []
      for w in range(context, end):
        p = pieces[w][:capacity - len(ids)]
        scored = w >= start
        tag_id = int(tag_ids[sentence][w]) if tag_ids is not None else 0
        for k, piece in enumerate(p):
          ids.append(piece)
          first = k == 0
          tag.append(tag_id if first else int(inside[tag_id]))
          weight.append(1.0 if scored and (first or label_all_subtokens) else 0.0)
          word_at.append(w if scored and first else -1)
      full = tokenizer.build_inputs_with_special_tokens(ids)
      pad_after = len(full) - lead - len(ids)
      input_ids.append(np.asarray(full, np.int32))
      labels.append(np.asarray([0] * lead + tag + [0] * pad_after, np.int32))
      label_weights.append(np.asarray([0.0] * lead + weight + [0.0] * pad_after, np.float32))
      position_word.append(np.asarray([-1] * lead + word_at + [-1] * pad_after, np.int32))
      window_sentence.append(sentence)
  token_type_ids = [np.zeros_like(x) for x in input_ids]
  return (input_ids, token_type_ids, labels, label_weights,
          np.asarray(window_sentence, np.int64), position_word)
