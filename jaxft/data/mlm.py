"""Dynamic masking for masked-LM training, drawn per batch from a seeded generator.

The generator is keyed on (seed, epoch, batch index in the epoch), so the masks change every
epoch yet any batch can be rebuilt exactly: resume stays exact and every host draws the same
masks for the global batch. Evaluation uses one fixed key, so validation perplexity is comparable
between evaluations.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

EVAL_EPOCH = -1  # the key's epoch for evaluation masks


def mask_tokens(batch: dict, rng: np.random.Generator, probability: float, mask_id: int,
                vocab_size: int, special_ids: Sequence[int]) -> dict:
  """BERT's recipe: choose `probability` of the real, non-special tokens; of those 80% become
  [MASK], 10% a random token, 10% stay. Chosen positions are the ones scored."""
  ids = batch["input_ids"]
  candidates = ((batch["attention_mask"] == 1) & ~np.isin(ids, np.asarray(special_ids))
                & (batch["weights"][:, None] > 0))
  chosen = candidates & (rng.random(ids.shape) < probability)
  action = rng.random(ids.shape)
  random_ids = rng.integers(0, vocab_size, ids.shape, dtype=np.int32)
  masked = np.where(chosen & (action < 0.8), mask_id, ids)
  masked = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
  return {**batch, "input_ids": masked.astype(np.int32), "labels": ids,
          "label_weights": chosen.astype(np.float32)}


def rng_for(seed: int, epoch: int, batch_index: int) -> np.random.Generator:
  return np.random.default_rng([seed, epoch + 1, batch_index])  # +1: keys must be >= 0
