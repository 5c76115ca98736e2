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


def _padded(maxima, buckets):
  return sum(batching.bucket_for(int(m), buckets) for m in maxima)


def test_fitted_bucket_lengths_are_the_best_choice_of_that_many():
  """Checked against trying every choice of lengths (multiples of 8) by brute force."""
  import itertools
  rng = np.random.default_rng(3)
  for trial in range(20):
    maxima = np.minimum(rng.geometric(1 / rng.uniform(8, 40), size=60) + 2, 128)
    count = int(rng.integers(1, 5))
    fitted = batching.fit_bucket_lengths(maxima, 128, count)
    assert fitted[-1] == 128 and len(fitted) <= count + 1 and all(b % 8 == 0 for b in fitted)
    top = -(-int(maxima.max()) // 8) * 8
    best = min(_padded(maxima, (*c, top, 128))
               for k in range(count) for c in itertools.combinations(range(8, top, 8), k))
    assert _padded(maxima, fitted) == best, (trial, fitted)


def test_fitted_buckets_never_pad_more_than_the_ladder_with_as_many_shapes():
  """The ladder's lengths are one of the choices the fit weighs, so it can only do better."""
  rng = np.random.default_rng(0)
  for mean in (6, 11, 25, 60):
    lengths = np.minimum(rng.geometric(1 / mean, size=4000) + 2, 128)
    maxima = [int(lengths[b].max()) for b in batching.epoch_batches(lengths, 32, 0, 0, 50)]
    ladder_used = {batching.bucket_for(m, batching.bucket_lengths(128)) for m in maxima}
    fitted = batching.fit_bucket_lengths(maxima, 128, len(ladder_used))
    assert len({batching.bucket_for(m, fitted) for m in maxima}) <= len(ladder_used)
    fitted_cost, ladder_cost = _padded(maxima, fitted), _padded(maxima, sorted(ladder_used))
    assert fitted_cost <= ladder_cost, (mean, fitted, ladder_used)
    if mean <= 11:  # short text: the ladder's 16-wide first step wastes most
      assert fitted_cost < 0.97 * ladder_cost, (mean, fitted, ladder_used)
