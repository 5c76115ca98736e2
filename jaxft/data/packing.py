"""Sequence packing: several examples share one row, each with its own segment id, so rows are
nearly full and the step's shape hardly varies.

Why: bucketing still pads about a third of SST-2's tokens and compiles a program per bucket.
Packed rows hold real tokens end to end; attention stays within each example (block-diagonal,
jaxft.attention), positions restart at each example and sequence heads read each example's own
first token, so a packed example's logits equal its unpacked logits.

Two ways to batch (`data.packing`), both pure functions of (seed, epoch, step):
- "examples": the unpacked order's `train.batch_size` examples per step, packed into as few
  rows as they fit, the row count rounded up to a few fitted sizes (hyperparameters keep their
  meaning; a few shapes).
- "tokens": a fixed number of rows per step (one shape for the run), filled from the shuffled
  stream by first-fit decreasing; the number of examples per step varies around batch_size.

A batch is laid out in `groups` equal blocks of rows and example slots (the data-parallel
shards times the gradient-accumulation micro-batches), each example inside its own block, so
any contiguous split of the batch (devices, hosts, micro-batches) keeps every example whole
(`example_row` is a row of the whole batch: a part subtracts its first row, jaxft.step).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxft.data import batching
from jaxft.data.encode import Encoded

MODES = ("off", "examples", "tokens")


@dataclasses.dataclass(frozen=True)
class Shape:
  """The arrays of a packed batch: `rows` x `length` tokens and `slots` example slots, in
  `groups` equal blocks."""
  rows: int
  length: int
  slots: int
  groups: int = 1


def is_packed(batch: dict) -> bool:
  """Whether `batch` holds packed rows (make_packed_batch), not one example per row."""
  return "segment_ids" in batch


def first_fit_decreasing(lengths: np.ndarray, length: int, max_per_row: int
                         ) -> list[list[int]]:
  """Positions (into `lengths`) of the examples of each row: longest first, each into the first
  row with room for it and fewer than `max_per_row` examples. Deterministic."""
  order = np.argsort(-np.asarray(lengths), kind="stable")
  room = np.zeros(0, np.int64)
  counts = np.zeros(0, np.int64)
  rows: list[list[int]] = []
  for i in order:
    n = min(int(lengths[i]), length)
    fits = np.nonzero((room >= n) & (counts < max_per_row))[0]
    if len(fits):
      r = int(fits[0])
    else:
      r = len(rows)
      rows.append([])
      room = np.append(room, length)
      counts = np.append(counts, 0)
    rows[r].append(int(i))
    room[r] -= n
    counts[r] += 1
  return rows


def split_groups(indices: np.ndarray, groups: int) -> list[np.ndarray]:
  """`indices` cut into `groups` contiguous parts of (nearly) equal size."""
  return np.array_split(np.asarray(indices), groups)


def pack_step(data_lengths: np.ndarray, indices: np.ndarray, length: int, groups: int,
              max_per_row: int) -> list[list[list[int]]]:
  """Mode "examples": per group, the rows (lists of example indices) of one step's examples."""
  out = []
  for part in split_groups(indices, groups):
    rows = first_fit_decreasing(data_lengths[part], length, max_per_row)
    out.append([[int(part[i]) for i in row] for row in rows])
  return out


def rows_needed(placement: list[list[list[int]]]) -> int:
  """Rows per group a placement needs (the fullest group's)."""
  return max(len(g) for g in placement)


def token_budget_steps(lengths: np.ndarray, shape: Shape, max_per_row: int, seed: int,
                       epoch: int, window_steps: int = 8) -> list[list[list[list[int]]]]:
  """Mode "tokens": every step of one epoch as a placement (per group, per row, example
  indices), each step `shape.rows` rows of `shape.length` tokens and at most `shape.slots`
  examples. Shuffle all examples; pack windows of about `window_steps` steps' worth by first-fit
  decreasing; rows go to steps in order, the window's steps in shuffled order. Until the last
  window, the rows that still have room for a typical example (at most one step's worth, the
  emptiest) and a last partly filled step wait for the next window, whose examples fill them.
  Every example appears exactly once."""
  rng = np.random.default_rng([seed, epoch, 7])  # 7: another stream than batching's
  order = rng.permutation(len(lengths))
  rows_per_group = shape.rows // shape.groups
  slots_per_group = shape.slots // shape.groups
  per_step = max(1, int(shape.rows * shape.length / max(1.0, float(np.mean(lengths)))))
  typical = int(np.median(lengths)) if len(lengths) else 1
  tokens = lambda row: sum(min(int(lengths[i]), shape.length) for i in row)
  steps, carry, start = [], np.zeros(0, np.int64), 0
  while start < len(order) or len(carry):
    take = order[start:start + window_steps * per_step]
    start += len(take)
    last_window = start >= len(order)
    pool = np.concatenate([carry, take])
    rows = [[int(pool[i]) for i in row]
            for row in first_fit_decreasing(lengths[pool], shape.length, max_per_row)]
    rows.sort(key=lambda r: -tokens(r))
    window: list = []
    waiting: list[list[int]] = []
    if not last_window:
      roomy = [k for k, r in enumerate(rows) if shape.length - tokens(r) >= typical]
      held = set(roomy[-shape.rows:])  # the emptiest, at most one step's rows
      waiting = [r for k, r in enumerate(rows) if k in held]
      rows = [r for k, r in enumerate(rows) if k not in held]
    while rows:
      step, rest = fill_step(rows, rows_per_group, slots_per_group, shape.groups)
      if not last_window and _fullness(step, rows_per_group * shape.groups) < 1.0:
        waiting += [r for g in step for r in g] + rest  # a partly filled step
        break
      window.append(step)
      rows = rest
    # Rows came longest first: in shuffled order, no stretch of steps is all long examples.
    steps.extend(window[i] for i in rng.permutation(len(window)))
    carry = np.array([i for r in waiting for i in r], np.int64)
  return steps


def fill_step(rows: list[list[int]], rows_per_group: int, slots_per_group: int,
               groups: int) -> tuple[list[list[list[int]]], list[list[int]]]:
  """One step's rows taken from `rows` (round robin over groups, each group's example slots
  respected), and the rows left."""
  step = [[] for _ in range(groups)]
  used = [0] * groups
  rest = []
  g = 0
  for row in rows:
    placed = False
    for k in range(groups):
      target = (g + k) % groups
      if len(step[target]) < rows_per_group and used[target] + len(row) <= slots_per_group:
        step[target].append(row)
        used[target] += len(row)
        g = (target + 1) % groups
        placed = True
        break
    if not placed:
      rest.append(row)
  return step, rest


def _fullness(step, total_rows: int) -> float:
  return sum(len(g) for g in step) / total_rows


def make_packed_batch(data: Encoded, placement: list[list[list[int]]], shape: Shape
                      ) -> dict[str, np.ndarray]:
  """The packed batch of `placement` (per group, per row, example indices) in `shape`.

  Arrays: per token [rows, length]: input_ids, token_type_ids, position_ids (restarting at
  each example; the model adds its own offset), segment_ids (1, 2, ... per row; 0 for
  padding), attention_mask (segment_ids > 0); per example slot [slots]: example_row,
  example_start, example_length, weights (0 for empty slots), index (the example, -1 for empty
  slots), and labels for sequence tasks; token tasks carry labels and label_weights per token.
  """
  rows_per_group, slots_per_group = shape.rows // shape.groups, shape.slots // shape.groups
  L = shape.length
  ids = np.zeros((shape.rows, L), np.int32)
  types = np.zeros((shape.rows, L), np.int32)
  positions = np.zeros((shape.rows, L), np.int32)
  segments = np.zeros((shape.rows, L), np.int32)
  # Empty slots point into their own group's first row.
  example_row = (np.arange(shape.slots) // slots_per_group * rows_per_group).astype(np.int32)
  example_start = np.zeros((shape.slots,), np.int32)
  example_length = np.zeros((shape.slots,), np.int32)
  index = np.full((shape.slots,), -1, np.int64)
  per_token = data.label_weights is not None
  if per_token:
    tags = np.zeros((shape.rows, L), np.int32)
    tag_weights = np.zeros((shape.rows, L), np.float32)
  for g, rows in enumerate(placement):
    if len(rows) > rows_per_group or sum(map(len, rows)) > slots_per_group:
      raise ValueError(f"group {g} holds {len(rows)} rows and {sum(map(len, rows))} examples; "
                       f"the shape allows {rows_per_group} and {slots_per_group}")
    slot = g * slots_per_group
    for r, row in enumerate(rows):
      at = g * rows_per_group + r
      start = 0
      for segment, i in enumerate(row, 1):
        n = min(len(data.input_ids[i]), L - start)
        span = slice(start, start + n)
        ids[at, span] = data.input_ids[i][:n]
        types[at, span] = data.token_type_ids[i][:n]
        positions[at, span] = np.arange(n)
        segments[at, span] = segment
        if per_token:
          if data.labels is not None:
            tags[at, span] = data.labels[i][:n]
          tag_weights[at, span] = data.label_weights[i][:n]
        example_row[slot], example_start[slot], example_length[slot] = at, start, n
        index[slot] = i
        slot += 1
        start += n
  weights = (index >= 0).astype(np.float32)
  batch = {"input_ids": ids, "token_type_ids": types, "position_ids": positions,
           "segment_ids": segments, "attention_mask": (segments > 0).astype(np.int32),
           "example_row": example_row, "example_start": example_start,
           "example_length": example_length, "weights": weights, "index": index}
  if per_token:
    if data.labels is not None:
      batch["labels"] = tags
    batch["label_weights"] = tag_weights
  elif data.labels is not None:
    labels = np.zeros((shape.slots, *data.labels.shape[1:]), data.labels.dtype)
    labels[index >= 0] = data.labels[index[index >= 0]]
    batch["labels"] = labels
  return batch


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
  return 1.0 - float(np.mean(batch["segment_ids"] > 0))


# ---- the layout a run packs in ---------------------------------------------------------------
def max_per_row(lengths: np.ndarray, length: int) -> int:
  """At most this many examples share a row: as many of the shortest as fit."""
  return max(1, length // max(1, int(np.min(lengths)) if len(lengths) else 1))


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _fill_target(lengths: np.ndarray, batch_size: int) -> float:
  """Tokens a step should hold: `batch_size` examples of the mean length, at the 99% fill
  first-fit decreasing reaches on short-text data."""
  return batch_size * float(np.mean(lengths)) / 0.99


def token_budget_shape(lengths: np.ndarray, batch_size: int, max_length: int, groups: int,
                       rows: int = 0, length: int = 0) -> Shape:
  """Mode "tokens": rows x length holding `batch_size` examples of the mean length, so a step
  averages about `batch_size` examples (hyperparameters keep their meaning); example slots for
  as many of the shortest as the rows hold. Unless given, rows are the fewest of at most
  `max_length` tokens that hold them, and the length is fitted to those rows (a multiple of 8,
  at least the longest example). Rows and slots are multiples of `groups`."""
  longest = round_up(int(np.max(lengths)) if len(lengths) else 8, 8)
  target = _fill_target(lengths, batch_size)
  if not length:
    rows = rows or int(np.ceil(target / max(max_length, longest)))
    length = max(longest, min(max(max_length, longest), round_up(int(np.ceil(target / rows)), 8)))
  rows = round_up(max(rows or int(round(target / length)), 1), groups)
  return Shape(rows, length, round_up(rows * max_per_row(lengths, length), groups), groups)


def fit_examples_layout(lengths: np.ndarray, batch_size: int, max_length: int, groups: int,
                        seed: int, window_batches: int, count: int, length: int = 0
                        ) -> tuple[int, tuple[int, ...]]:
  """Mode "examples": (row length, row counts per group) that pad epoch 0's steps least: for
  each candidate length (multiples of 16 from the longest example to `max_length`, or the given
  one), at most `count` row counts fitted like bucket lengths."""
  longest = round_up(int(np.max(lengths)), 16)
  candidates = [length] if length else list(range(longest, max(max_length, longest) + 1, 16))
  batches = batching.epoch_batches(lengths, batch_size, seed, 0, window_batches)
  best = None
  for L in candidates:
    per_row = max_per_row(lengths, L)
    needed = [rows_needed(pack_step(lengths, b, L, groups, per_row)) for b in batches]
    counts = batching.fit_bucket_lengths(needed, max(needed), count, multiple=1)
    cost = L * sum(batching.bucket_for(n, counts) for n in needed)
    if best is None or cost < best[0]:
      best = (cost, L, counts)
  return best[1], best[2]


def examples_shape(placement: list[list[list[int]]], row_counts: Sequence[int],
                   batch_size: int, length: int, groups: int) -> Shape:
  """Mode "examples": the shape of one step, its rows per group rounded up to `row_counts`
  (a step that needs more than the largest, which epoch 0 never did, gets its own shape)."""
  needed = rows_needed(placement)
  per_group = needed if needed > max(row_counts) else batching.bucket_for(needed, row_counts)
  return Shape(per_group * groups, length, round_up(batch_size, groups), groups)
