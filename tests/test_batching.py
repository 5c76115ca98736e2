"""Deterministic, bucketed batches that count every example."""

import numpy as np
import pytest

from jaxft.data import batching
from jaxft.data.encode import Encoded


def _lengths(n, seed=0):
  return np.random.default_rng(seed).integers(3, 120, size=n).astype(np.int32)


def test_epoch_batches_are_a_pure_function_of_seed_and_epoch():
  lengths = _lengths(1000)
  a = batching.epoch_batches(lengths, 32, seed=7, epoch=3, window_batches=10)
  b = batching.epoch_batches(lengths, 32, seed=7, epoch=3, window_batches=10)
  c = batching.epoch_batches(lengths, 32, seed=7, epoch=4, window_batches=10)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("window", [1, 10, 1000])
def test_every_example_appears_once_per_epoch(window):
  lengths = _lengths(1001)
  batches = batching.epoch_batches(lengths, 32, seed=0, epoch=0, window_batches=window)
  assert len(batches) == batching.steps_per_epoch(1001, 32) == 32
  assert sorted(np.concatenate(batches).tolist()) == list(range(1001))


def test_bucketing_cuts_padding_against_random_batches():
  lengths = _lengths(4000)
  buckets = batching.bucket_lengths(128)

  def padded_tokens(batches):
    return sum(batching.bucket_for(int(lengths[b].max()), buckets) * 32 for b in batches)

  random_order = batching.epoch_batches(lengths, 32, 0, 0, window_batches=1)
  bucketed = batching.epoch_batches(lengths, 32, 0, 0, window_batches=50)
  assert padded_tokens(bucketed) < 0.75 * padded_tokens(random_order)


def test_bucket_ladder_ends_at_max_length():
  assert batching.bucket_lengths(128) == (16, 32, 48, 64, 96, 128)
  assert batching.bucket_lengths(100, (20, 40)) == (20, 40, 100)
  assert batching.bucket_for(17, (16, 32)) == 32
  assert batching.bucket_for(16, (16, 32)) == 16


def test_make_batch_pads_short_batch_with_weightless_rows():
  data = Encoded([np.arange(1, 6, dtype=np.int32), np.arange(1, 20, dtype=np.int32)],
                 [np.zeros(5, np.int32), np.zeros(19, np.int32)], np.array([1, 0], np.int32))
  batch = batching.make_batch(data, np.array([1, 0]), 4, (16, 32))
  assert batch["input_ids"].shape == (4, 32)
  assert batch["weights"].tolist() == [1, 1, 0, 0]
  assert batch["index"].tolist() == [1, 0, -1, -1]
  assert batch["attention_mask"][0].sum() == 19 and batch["attention_mask"][1].sum() == 5
  assert batch["labels"][:2].tolist() == [0, 1]


def test_eval_batches_cover_every_example_once():
  lengths = _lengths(203)
  batches = batching.eval_batches(lengths, 64)
  assert [len(b) for b in batches] == [64, 64, 64, 11]
  assert sorted(np.concatenate(batches).tolist()) == list(range(203))


def test_host_rows_split_a_global_batch_evenly():
  batch = {"x": np.arange(8)}
  parts = [batching.host_rows(batch, i, 4)["x"].tolist() for i in range(4)]
  assert parts == [[0, 1], [2, 3], [4, 5], [6, 7]]
