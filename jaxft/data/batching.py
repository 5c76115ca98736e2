"""Batches as a pure function of (seed, epoch, step), padded to a few bucket lengths.

Why this shape:
- Exact resume and multi-host splitting need the batch at any step to be computable without
  replaying the run: `epoch_batches(lengths, ..., seed, epoch)` is deterministic.
- Padding every sentence to max_seq_length wastes most of the compute on short-text tasks, and
  padding to each batch's own length compiles a new program per length. Sorting by length inside
  large shuffled windows and padding to a few bucket lengths (fitted to the training data by
  `fit_bucket_lengths`, else a fixed ladder) gives little padding and a bounded number of
  compiled shapes.
- Every batch has the full batch size: the last partial batch is filled with padding examples of
  weight 0, so no example is dropped and no new shape appears.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxft.data.encode import Encoded

# Without training data to fit them to (and no configured lengths): this ladder.
_LADDER = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket_lengths(max_seq_length: int, configured: Sequence[int] = ()) -> tuple[int, ...]:
  """The padded lengths a batch may take, ascending, always ending at max_seq_length."""
  chosen = configured or [b for b in _LADDER if b < max_seq_length]
  return tuple(sorted(set(chosen) | {max_seq_length}))


def fit_bucket_lengths(batch_maxima: Sequence[int], max_seq_length: int, count: int,
                       multiple: int = 8) -> tuple[int, ...]:
  """The `count` padded lengths (multiples of `multiple`) that pad batches whose longest
  examples are `batch_maxima` to the fewest tokens; max_seq_length is added for longer input
  (evaluation, prediction), so at most count + 1 lengths.

  Why fit them: a fixed ladder fits no dataset well. SST-2's 2,000 first sentences (13 word
  pieces on average) padded to 16/32/48/64 cost 45,056 tokens an epoch; the fitted 8/16/32/56
  cost 38,912 with as many compiled shapes. Exact dynamic programming over the candidates.
  """
  candidates = sorted({min(max_seq_length, -(-int(m) // multiple) * multiple)
                       for m in batch_maxima} | {max_seq_length})
  maxima = np.minimum(np.asarray(batch_maxima, np.int64), max_seq_length)
  # in_range[i]: batches whose padded length would be candidates[i] if every candidate was a bucket
  lower = np.array([0, *candidates[:-1]])
  in_range = np.array([np.sum((maxima > lo) & (maxima <= c)) for lo, c in zip(lower, candidates)])
  below = np.concatenate([[0], np.cumsum(in_range)])  # batches at or below candidate i-1
  n = len(candidates)
  # cost[k][i]: fewest padded batch widths covering every batch up to candidates[i] with k+1
  # buckets, the largest being candidates[i]; choice[k][i]: the previous bucket's index.
  cost = np.full((count, n), np.inf)
  choice = np.zeros((count, n), np.int64)
  cost[0] = np.array(candidates) * below[1:]
  for k in range(1, count):
    for i in range(n):
      for j in range(i):
        c = cost[k - 1][j] + candidates[i] * (below[i + 1] - below[j + 1])
        if c < cost[k][i]:
          cost[k][i], choice[k][i] = c, j
  top = int(np.nonzero(in_range)[0].max()) if in_range.any() else n - 1
  k = int(np.argmin(cost[:, top]))  # fewer buckets when more would not help
  chosen, i = [candidates[top]], top
  while k > 0:
    i, k = int(choice[k][i]), k - 1
    chosen.append(candidates[i])
  return tuple(sorted(set(chosen) | {max_seq_length}))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if length <= b:
      return b
  return buckets[-1]


def first_of_each_width(maxima, buckets) -> np.ndarray:
  """Positions of the first of `maxima` (each batch's longest example) in each bucket, by
  ascending width: a batch is padded to the bucket of its longest example, so these are the
  batches that meet every shape. Training batches can mix any examples, so for training the
  maxima are the single examples' lengths, all of them: hence vectorised, with searchsorted
  being bucket_for over the ascending buckets (longer than all: the last)."""
  positions = np.minimum(np.searchsorted(buckets, maxima), len(buckets) - 1)
  return np.unique(positions, return_index=True)[1]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return -(-num_examples // batch_size)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  window_batches: int) -> list[np.ndarray]:
  """Example indices of every training batch of one epoch, in order.

  Shuffle all examples, sort each window of `window_batches` batches by length, cut into batches,
  shuffle the batches. The last batch may be short (it is padded with weight-0 rows).
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  window = window_batches * batch_size
  if window_batches > 1:
    parts = [order[i:i + window] for i in range(0, len(order), window)]
    order = np.concatenate([p[np.argsort(lengths[p], kind="stable")] for p in parts])
  batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  perm = rng.permutation(len(batches))
  return [batches[i] for i in perm]


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """Example indices of every evaluation batch: sorted by length, every example exactly once."""
  order = np.argsort(lengths, kind="stable")
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def make_batch(data: Encoded, indices: np.ndarray, batch_size: int,
               buckets: Sequence[int]) -> dict[str, np.ndarray]:
  """Pads the examples at `indices` into arrays of shape [batch_size, bucket length].

  Rows past len(indices) are padding: weight 0, label 0, an empty sequence attending to one
  token. `index` maps each row back to its example (-1 for padding rows). Labels keep the shape
  the task gives them: per example ([B], [B, labels]) or per token ([B, T] with label_weights).
  """
  n = len(indices)
  width = bucket_for(max(len(data.input_ids[i]) for i in indices), buckets)
  input_ids = np.zeros((batch_size, width), np.int32)
  token_type_ids = np.zeros((batch_size, width), np.int32)
  attention_mask = np.zeros((batch_size, width), np.int32)
  for row, i in enumerate(indices):
    ids = data.input_ids[i][:width]
    input_ids[row, :len(ids)] = ids
    token_type_ids[row, :len(ids)] = data.token_type_ids[i][:width]
    attention_mask[row, :len(ids)] = 1
  attention_mask[n:, 0] = 1  # padding rows attend to one token so softmax stays finite
  weights = np.zeros((batch_size,), np.float32)
  weights[:n] = 1.0
  index = np.full((batch_size,), -1, np.int64)
  index[:n] = indices
  batch = {"input_ids": input_ids, "token_type_ids": token_type_ids,
           "attention_mask": attention_mask, "weights": weights, "index": index}
  if data.label_weights is not None:  # per-token labels (token classification)
    batch["labels"] = np.zeros((batch_size, width), np.int32)
    batch["label_weights"] = np.zeros((batch_size, width), np.float32)
    for row, i in enumerate(indices):
      if data.labels is not None:  # None: prediction input
        k = min(len(data.labels[i]), width)
        batch["labels"][row, :k] = data.labels[i][:k]
      k = min(len(data.label_weights[i]), width)
      batch["label_weights"][row, :k] = data.label_weights[i][:k]
  elif data.labels is not None:  # one label (or label vector) per example
    labels = np.zeros((batch_size, *data.labels.shape[1:]), data.labels.dtype)
    labels[:n] = data.labels[indices]
    batch["labels"] = labels
  return batch


def host_rows(batch: dict[str, np.ndarray], process_index: int,
              process_count: int) -> dict[str, np.ndarray]:
  """This host's contiguous share of a global batch (every host computes the same indices):
  of each array's leading axis (rows, or a packed batch's example slots)."""
  def share(v):
    n = len(v) // process_count
    return v[process_index * n:(process_index + 1) * n]
  return {k: share(v) for k, v in batch.items()}
