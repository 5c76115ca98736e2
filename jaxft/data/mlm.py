"""Dynamic masking for masked-LM training, drawn per batch from a seeded generator.

Each example's masks come from a generator keyed on (seed, epoch, example), so the masks change
every epoch yet any batch can be rebuilt exactly: resume stays exact, every host draws the same
masks for the global batch, and an example is masked alike whether its row is padded or packed
with others. Evaluation uses one fixed epoch, so validation perplexity is comparable between
evaluations (and between packed and unpacked evaluation).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxft.data import packing

EVAL_EPOCH = -1  # the key's epoch for evaluation masks


def _example_spans(batch: dict) -> list[tuple[int, int, int, int]]:
  """(example, row, first position, length) of every example in `batch`, padded or packed."""
  if packing.is_packed(batch):
    return [(int(batch["index"][k]), int(batch["example_row"][k]),
             int(batch["example_start"][k]), int(batch["example_length"][k]))
            for k in np.nonzero(batch["index"] >= 0)[0]]
  return [(int(batch["index"][r]), r, 0, int(batch["attention_mask"][r].sum()))
          for r in np.nonzero(batch["index"] >= 0)[0]]


def mask_tokens(batch: dict, seed: int, epoch: int, probability: float, mask_id: int,
                vocab_size: int, special_ids: Sequence[int]) -> dict:
  """BERT's recipe: choose `probability` of the real, non-special tokens; of those 80% become
  [MASK], 10% a random token, 10% stay. Chosen positions are the ones scored."""
  ids = batch["input_ids"]
  chosen = np.zeros(ids.shape, bool)
  action = np.zeros(ids.shape)
  random_ids = np.zeros(ids.shape, np.int32)
  special = np.asarray(special_ids)
  for example, row, start, length in _example_spans(batch):
    rng = np.random.default_rng([seed, epoch + 1, example])  # +1: keys must be >= 0
    span = slice(start, start + length)
    chosen[row, span] = ~np.isin(ids[row, span], special) & (rng.random(length) < probability)
    action[row, span] = rng.random(length)
    random_ids[row, span] = rng.integers(0, vocab_size, length, dtype=np.int32)
  masked = np.where(chosen & (action < 0.8), mask_id, ids)
  masked = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
  return {**batch, "input_ids": masked.astype(np.int32), "labels": ids,
          "label_weights": chosen.astype(np.float32)}
