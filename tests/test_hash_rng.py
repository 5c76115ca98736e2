"""The hash PRNG behind dropout masks: unbiased, uncorrelated, key-sensitive, usable by flax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import hash_rng


def _key(seed):
  return hash_rng.dropout_key(jax.random.PRNGKey(seed), "hash")


def test_bits_are_uniform_and_uncorrelated():
  bits = np.asarray(jax.jit(lambda k: jax.random.bits(k, (256, 4096), jnp.uint32))(_key(0)))
  u = bits.astype(np.float64) / 2**32
  assert abs(u.mean() - 0.5) < 0.002  # 1M samples: sd of the mean 0.0003
  assert abs(u.var() - 1 / 12) < 0.001
  for axis in (0, 1):  # neighbours along either axis of the counter
    a, b = np.moveaxis(u, axis, 0)[:-1].ravel(), np.moveaxis(u, axis, 0)[1:].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.005
  for bit in range(32):  # every bit is a fair coin
    assert abs(((bits >> bit) & 1).mean() - 0.5) < 0.003


def test_keys_give_independent_masks_and_fold_in_like_threefry():
  keep = lambda k: np.asarray(jax.random.bernoulli(k, 0.9, (64, 128, 384)))
  a, b = keep(_key(0)), keep(_key(1))
  assert abs(a.mean() - 0.9) < 0.002 and abs(b.mean() - 0.9) < 0.002
  assert abs((a & b).mean() - 0.81) < 0.003  # independent: P(both kept) = 0.9 * 0.9
  np.testing.assert_array_equal(keep(_key(0)), a)  # a pure function of the key
  folded = jax.random.fold_in(_key(0), 7)
  expected = jax.random.fold_in(jax.random.PRNGKey(0), 7)
  np.testing.assert_array_equal(jax.random.key_data(folded)[:2], expected)
  assert not np.array_equal(keep(folded), a)


def test_a_block_index_draws_the_global_batchs_rows():
  """pmap's device d (its key's block index) draws exactly its block of the mask one device
  draws for the global batch, whatever the leading size (rows, or packed example slots);
  shared 4-D (attention) masks take no offset; the block survives fold_in and split, as flax's
  make_rng uses them."""
  base = jax.random.PRNGKey(4)
  full = np.asarray(jax.random.bernoulli(hash_rng.dropout_key(base, "hash"), 0.5, (8, 5, 6)))
  for device in range(4):
    key = hash_rng.dropout_key(base, "hash", block=device)
    rows = np.asarray(jax.random.bernoulli(key, 0.5, (2, 5, 6)))
    np.testing.assert_array_equal(rows, full[device * 2:device * 2 + 2])
    two_d = np.asarray(jax.random.bits(jax.random.fold_in(key, 3), (2, 30)))
    np.testing.assert_array_equal(two_d, np.asarray(jax.random.bits(
        jax.random.fold_in(hash_rng.dropout_key(base, "hash"), 3), (8, 30)))[device * 2:][:2])
    shared = lambda k: np.asarray(jax.random.bits(jax.random.split(k)[1], (1, 1, 4, 4)))
    np.testing.assert_array_equal(shared(key), shared(hash_rng.dropout_key(base, "hash")))
    slots = np.asarray(jax.random.bits(key, (3, 7)))  # another leading size: 3 per device
    np.testing.assert_array_equal(slots, np.asarray(jax.random.bits(
        hash_rng.dropout_key(base, "hash"), (12, 7)))[device * 3:device * 3 + 3])


def test_flax_dropout_draws_from_it_inside_jit():
  x = jnp.ones((32, 128, 384))
  out = jax.jit(lambda k: nn.Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": k}))(
      _key(3))
  out = np.asarray(out)
  assert abs((out == 0).mean() - 0.1) < 0.002
  np.testing.assert_allclose(out[out != 0], 1 / 0.9, rtol=1e-6)


def test_threefry_keeps_the_key_as_it_is():
  key = jax.random.PRNGKey(5)
  assert hash_rng.dropout_key(key, "threefry") is key
