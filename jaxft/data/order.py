"""Which examples each training step sees, and how each evaluation step packs: a pure function
of (seed, epoch, step) for every `data.packing` mode, so resume and multi-host stay exact.

- "off": `batching.epoch_batches`, padded to bucket lengths (a fixed number of steps per epoch).
- "examples": the same examples per step, packed (`packing.pack_step`), rows rounded up to a
  few fitted row counts.
- "tokens": a fixed shape per step (`packing.token_budget_steps`); an epoch's step count
  depends on how its examples pack, so a step is located by counting the epochs before it.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from jaxft.data import batching, packing


class TrainOrder:
  """The steps of a run over `lengths` (the training examples' token counts)."""

  def __init__(self, mode: str, lengths: np.ndarray, batch_size: int, seed: int,
               window_batches: int, max_length: int, groups: int, rows: int = 0,
               length: int = 0, num_row_counts: int = 4):
    """`max_length`: the longest rows to fit (data.max_seq_length); `rows`, `length`: the
    configured packed shape (0: fitted to `lengths`)."""
    self.mode, self.lengths, self.batch_size, self.seed = mode, lengths, batch_size, seed
    self.window_batches, self.groups = window_batches, groups
    self.length = length or max_length
    self.row_counts: tuple[int, ...] = ()
    self.shape: Optional[packing.Shape] = None
    if mode == "examples":
      self.length, self.row_counts = packing.fit_examples_layout(
          lengths, batch_size, max_length, groups, seed, window_batches, num_row_counts, length)
    elif mode == "tokens":
      self.shape = packing.token_budget_shape(lengths, batch_size, max_length, groups, rows,
                                              length)
      self.length = self.shape.length
    self.per_row = packing.max_per_row(lengths, self.length)

  @functools.lru_cache(maxsize=2)
  def epoch(self, epoch: int) -> list:
    """Every step of `epoch`: example indices (off, examples) or placements (tokens)."""
    if self.mode == "tokens":
      return packing.token_budget_steps(self.lengths, self.shape, self.per_row, self.seed,
                                        epoch)
    return batching.epoch_batches(self.lengths, self.batch_size, self.seed, epoch,
                                  self.window_batches)

  @functools.lru_cache(maxsize=None)
  def steps_in_epoch(self, epoch: int) -> int:
    if self.mode != "tokens":
      return batching.steps_per_epoch(len(self.lengths), self.batch_size)
    return len(self.epoch(epoch))

  @property
  def steps_per_epoch(self) -> int:
    """Epoch 0's steps (every epoch's, except in "tokens" mode, where they differ by a few)."""
    return self.steps_in_epoch(0)

  def num_steps(self, num_epochs: float) -> int:
    """The steps of `num_epochs` epochs (whole epochs counted exactly, the rest by epoch 0)."""
    whole = int(num_epochs)
    steps = sum(self.steps_in_epoch(e) for e in range(whole))
    return max(1, steps + int(np.ceil((num_epochs - whole) * self.steps_per_epoch)))

  def locate(self, step: int) -> tuple[int, int]:
    """(epoch, step within the epoch) of a global step."""
    if self.mode != "tokens":
      return divmod(step, self.steps_per_epoch)
    epoch = 0
    while step >= self.steps_in_epoch(epoch):
      step -= self.steps_in_epoch(epoch)
      epoch += 1
    return epoch, step

  def step(self, step: int):
    """What step `step` takes: (example indices, None) unpacked, else (placement, shape)."""
    epoch, index = self.locate(step)
    chosen = self.epoch(epoch)[index]
    if self.mode == "off":
      return chosen, None
    if self.mode == "tokens":
      return chosen, self.shape
    placement = packing.pack_step(self.lengths, chosen, self.length, self.groups, self.per_row)
    return placement, packing.examples_shape(placement, self.row_counts, self.batch_size,
                                             self.length, self.groups)

  def shapes(self) -> list[packing.Shape]:
    """Every packed shape a step can take (what to compile before the first step)."""
    if self.mode == "tokens":
      return [self.shape]
    slots = packing.round_up(self.batch_size, self.groups)
    return [packing.Shape(r * self.groups, self.length, slots, self.groups)
            for r in self.row_counts]


def eval_steps(lengths: np.ndarray, batch_size: int, max_length: int, groups: int,
               length: int = 0) -> tuple[list, packing.Shape]:
  """Evaluation packed: every example exactly once, in steps of one shape (fitted as training's
  "tokens" shape is, to `batch_size` examples of the mean length); (placements, shape)."""
  shape = packing.token_budget_shape(lengths, batch_size, max_length, groups, length=length)
  length = shape.length
  per_row = packing.max_per_row(lengths, length)
  rows = [list(r) for r in packing.first_fit_decreasing(lengths, length, per_row)]
  steps = []
  while rows:
    step, rows = packing.fill_step(rows, shape.rows // groups, shape.slots // groups, groups)
    steps.append(step)
  return steps, shape
