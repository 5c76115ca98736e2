"""A counter-based hash PRNG for dropout masks: cheap on every backend, and it fuses.

Why: JAX's threefry (and RBG) random bits are costly on XLA's CPU backend, and a train step
draws tens of millions of them for its dropout masks (benchmarks/README.md has the numbers).
Here every random word is a pure function of (key, element index): an integer hash
(MurmurHash3's 32-bit finaliser, twice, with the key mixed in) of an iota, a handful of integer
ops that XLA fuses into the dropout multiply, so the masks cost almost nothing and are never
materialised.

Dropout needs independent, unbiased bits, not cryptographic ones; the tests check the keep rate,
neighbour correlation and key sensitivity. Splitting and folding keys reuse threefry on the tiny
key words, so `split`/`fold_in` behave exactly like JAX's default. The choice is
`train.dropout_rng` ("hash", the default, or "threefry" for JAX's own bits).

The bits are those of the element's index in the whole global batch: a key carries a block
index (a third word). Under pmap each device holds block d of every batch-leading array (rows,
or a packed batch's example slots, jaxft.data.packing), so the leading index of its 2-D and 3-D
masks ([batch, features], [batch, length, hidden]) is shifted by d times their leading size,
and every layout draws the masks one device would draw for the whole batch. 4-D masks
(attention probabilities, broadcast over the batch) take no offset: they are shared.
"""

from __future__ import annotations

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B1)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser: every input bit flips each output bit with probability ~1/2."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _element_index(shape: tuple[int, ...]) -> jax.Array:
  """The row-major index of every element (uint32, wrapping past 2**32 elements)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * _as_uint32(stride)
    stride = stride * shape[dim]
  return index


def _as_uint32(size) -> jax.Array:
  """A size as a uint32 factor (modulo 2**32). A symbolic size (the batch width of a step
  traced once for all widths, see jaxft.experiment) becomes a traced value that wraps alike."""
  if isinstance(size, (int, np.integer)):
    return np.uint32(int(size) % 2**32)
  return jnp.asarray(size).astype(jnp.uint32)


def _global_index(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The element's row-major index in the global batch: its index in `shape`, shifted by the
  key's block of batch-leading (2-D and 3-D) masks (block d starts at d x shape[0] rows)."""
  index = _element_index(shape)
  if 2 <= len(shape) <= 3:
    block_size = 1
    for dim in shape:
      block_size = block_size * dim  # may be symbolic (a step traced for all widths)
    index = index + key[2] * _as_uint32(block_size)
  return index


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
  word = _fmix32(_fmix32(_global_index(key, shape) * _GOLDEN ^ key[0]) + key[1])
  if bit_width == 64:
    high = _fmix32(word ^ key[0] + _GOLDEN)
    return (high.astype(jnp.uint64) << 32) | word.astype(jnp.uint64)
  return word.astype(jnp.dtype(f"uint{bit_width}"))


def _as_threefry(key: jax.Array) -> jax.Array:
  return jax.random.wrap_key_data(key[..., :2], impl="threefry2x32")


def _with_offset(threefry_data: jax.Array, key: jax.Array) -> jax.Array:
  """Threefry key words with `key`'s block index appended (split and fold_in keep it)."""
  offset = jnp.broadcast_to(key[..., 2:], threefry_data.shape[:-1] + (1,))
  return jnp.concatenate([threefry_data, offset.astype(threefry_data.dtype)], axis=-1)


def _seed(seed) -> jax.Array:
  data = jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))
  return jnp.concatenate([data, jnp.zeros((1,), data.dtype)])


HASH_IMPL = jax.extend.random.define_prng_impl(
    key_shape=(3,),  # threefry's two words, and the block index
    seed=_seed,
    split=lambda key, shape: _with_offset(
        jax.random.key_data(jax.random.split(_as_threefry(key), shape)), key),
    random_bits=_random_bits,
    fold_in=lambda key, data: _with_offset(
        jax.random.key_data(jax.random.fold_in(_as_threefry(key), data)), key),
    name="jaxft_hash32_rows",
    tag="hsr")


def dropout_key(key: jax.Array, kind: str, block=0) -> jax.Array:
  """The key the model's dropout draws from: `key` (a raw threefry key) as a `kind` key;
  `block`: which equal block of the global batch the arrays it draws for are (pmap: the
  device's index)."""
  if kind == "threefry":
    return key
  data = jax.random.key_data(key)
  offset = jnp.asarray(block, data.dtype).reshape(1)
  return jax.random.wrap_key_data(jnp.concatenate([data, offset]), impl=HASH_IMPL)
