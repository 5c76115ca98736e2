"""The CPU layer's fused attention kernel with segment ids (sequence packing: several examples in
one row, each attending only to itself): values and gradients equal jaxft.attention's JAX path
with the equivalent block-diagonal bias, and calls without segments are unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import attention
from jaxft.cpu import attention as cpu_attention

LOWEST = jnp.finfo(jnp.float32).min
ROWS = ("packed", "packed then padding", "one segment", "one segment then padding")


def _segment_row(kind: str, length: int, rng) -> np.ndarray:
  """One row's segment ids: 1..n for the examples, 0 for trailing padding. Packed rows hold
  three or more examples, one of them a single position (it sees only itself)."""
  row = np.zeros(length, np.int32)
  used = length - (length // 4 if kind.endswith("padding") else 0)
  if kind.startswith("one segment"):
    row[:used] = 1
    return row
  cuts = np.sort(rng.choice(np.arange(2, used - 1), size=min(3, used - 3), replace=False))
  lengths = np.diff(np.concatenate([[0], cuts, [used]]))
  lengths = np.concatenate([[1], lengths[1:], [lengths[0] - 1]])  # a one-position example
  lengths = lengths[lengths > 0]
  row[:used] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
  return row


def _inputs(batch, length, heads, depth, multiplier: str, seed=0):
  """q, k, v, the output's gradient, segment ids [batch, length] (row kinds cycling through
  ROWS) and a dropout-like multiplier ([1, 1 or heads, length, length], or None)."""
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.standard_normal((batch, length, heads, depth), np.float32))
                for _ in range(4))
  segments = np.stack([_segment_row(ROWS[b % len(ROWS)], length, rng) for b in range(batch)])
  m = None
  if multiplier == "shared":
    m = jnp.asarray((rng.random((1, 1, length, length)) > 0.2) / 0.8, jnp.float32)
  elif multiplier == "per head":
    m = jnp.asarray((rng.random((1, heads, length, length)) > 0.2) / 0.8, jnp.float32)
  return q, k, v, g, jnp.asarray(segments), m


def _block_diagonal(segments: jax.Array) -> jax.Array:
  """The JAX path's bias for `segments`: 0 where query and key share a segment, else the lowest
  float; [batch, 1, q, k]."""
  same = segments[:, None, :, None] == segments[:, None, None, :]
  return jnp.where(same, 0.0, LOWEST)


def _assert_close(ours, theirs):
  """The tolerances of tests/test_attention.py's kernel test: values, then gradients."""
  out, grads = ours
  out_ref, grads_ref = theirs
  np.testing.assert_allclose(out, out_ref, atol=2e-6, rtol=2e-5)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))), rtol=1e-4)


def _values_and_grads(f, q, k, v, g, jit_vjp=False):
  out, vjp = jax.vjp(f, q, k, v)
  return out, (jax.jit(vjp) if jit_vjp else vjp)(g)


@pytest.mark.parametrize("batch,length,heads,depth,multiplier", [
    (4, 37, 3, 16, "none"),
    (4, 37, 2, 32, "shared"),
    (3, 64, 4, 16, "per head"),
    (4, 128, 2, 32, "shared"),
    (2, 128, 1, 16, "none"),
    (4, 21, 4, 32, "per head"),
])
def test_packed_rows_match_the_jax_path(batch, length, heads, depth, multiplier):
  """Rows of several segments, with and without trailing padding (segment 0, which then
  attends to padding only), and rows of one segment."""
  q, k, v, g, segments, m = _inputs(batch, length, heads, depth, multiplier, seed=length)
  assert len(np.unique(np.asarray(segments[0]))) >= 3  # the draw packs several examples
  assert (np.asarray(segments[1, -1]) == 0) if batch > 1 else True
  assert cpu_attention._operands(q, None, m, segments) is not None
  ours = _values_and_grads(
      lambda q, k, v: cpu_attention.fused_attention(q, k, v, None, m, segments), q, k, v, g,
      jit_vjp=True)
  theirs = _values_and_grads(
      lambda q, k, v: attention.attention(q, k, v, _block_diagonal(segments), m), q, k, v, g)
  _assert_close(ours, theirs)
  # The mask matters here: the kernel without it differs (the test could fail).
  unpacked = cpu_attention.fused_attention(q, k, v, None, m)
  assert not np.allclose(unpacked, ours[0], atol=1e-3)


def test_packed_rows_with_a_padding_bias():
  """Segments together with Hugging Face's padding bias (the lowest float on segment 0): the
  real positions' values and all gradients are those of the JAX path with both masks (padding
  queries' outputs are don't-cares, finite, and get no gradient)."""
  q, k, v, g, segments, m = _inputs(4, 37, 2, 16, "shared", seed=5)
  real = segments > 0
  padding_bias = jnp.where(real, 0.0, LOWEST)[:, None, None, :]
  g = g * real[:, :, None, None]
  both = jnp.where((segments[:, None, :, None] == segments[:, None, None, :])
                   & real[:, None, None, :], 0.0, LOWEST)
  out, grads = _values_and_grads(
      lambda q, k, v: cpu_attention.fused_attention(q, k, v, padding_bias, m, segments),
      q, k, v, g, jit_vjp=True)
  out_ref, grads_ref = _values_and_grads(lambda q, k, v: attention.attention(q, k, v, both, m),
                                         q, k, v, g)
  assert np.all(np.isfinite(out))
  keep = np.asarray(real)[:, :, None, None]
  _assert_close((np.where(keep, out, 0), grads), (np.where(keep, out_ref, 0), grads_ref))


def test_without_segments_nothing_changes():
  """segments=None passes the kernel an empty [0, length] operand; a row that is one segment
  gives bitwise the same values and gradients (the per-query bias is then the key bias)."""
  q, k, v, g, _, m = _inputs(3, 37, 3, 16, "per head", seed=2)
  padding_bias = jnp.zeros((3, 1, 1, 37)).at[0, ..., 30:].set(LOWEST)
  bias, mult, segments = cpu_attention._operands(q, padding_bias, m)
  assert segments.shape == (0, 37) and segments.dtype == jnp.float32
  default = _values_and_grads(
      lambda q, k, v: cpu_attention.fused_attention(q, k, v, padding_bias, m), q, k, v, g)
  explicit = _values_and_grads(
      lambda q, k, v: cpu_attention._kernel_attention(q, k, v, bias, mult, segments), q, k, v, g)
  one_segment = _values_and_grads(
      lambda q, k, v: cpu_attention.fused_attention(q, k, v, padding_bias, m,
                                                    jnp.ones((3, 37), jnp.int32)), q, k, v, g)
  for other in (explicit, one_segment):
    for a, b in zip(jax.tree_util.tree_leaves(default), jax.tree_util.tree_leaves(other)):
      np.testing.assert_array_equal(a, b)


def test_segments_of_the_wrong_shape():
  q, k, v, _, segments, _ = _inputs(2, 21, 2, 16, "none")
  with pytest.raises(ValueError, match="segments must be"):
    cpu_attention._operands(q, None, None, segments[:, :-1])
  bias, mult, _ = cpu_attention._operands(q, None, None)
  with pytest.raises(Exception, match=r"segments must be \[batch or 0, length\]"):
    jax.block_until_ready(cpu_attention._kernel_attention(
        q, k, v, bias, mult, jnp.zeros((2, 20), jnp.float32)))
