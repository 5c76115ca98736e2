"""The attention core as a fused C++ kernel for XLA's CPU backend (attention_cpu.cc).

Why: XLA:CPU runs attention's small per-head batched dots far below its matmul rate, and
materialises the [batch, heads, q, k] probabilities between them. Here each (batch row, heads)
task computes scores, softmax, dropout and mixing in one pass that stays in the core's cache,
keeps only each query row's softmax statistics (max, 1 / sum) for the backward pass, and runs
asynchronously beside the rest of the step. The values are those of jaxft.attention's JAX path
(Hugging Face's); tests/test_attention.py compares them.

It takes float32 with a head depth that is a multiple of 16, one padding bias per key, a
dropout multiplier shared by the batch and, for sequence packing (several examples in one row),
segment ids per position, which confine each query to the keys of its own segment;
`fused_attention` returns None for anything else, and the caller takes the JAX path.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxft.cpu import native

TARGETS = ("jaxft_attention_cpu_forward", "jaxft_attention_cpu_backward")
_SYMBOLS = ("JaxftAttentionForward", "JaxftAttentionBackward")
_loaded = []  # the library whose handlers XLA holds: kept alive for the process


@functools.cache
def _register() -> Optional[native.BuildError]:
  try:
    library = ctypes.cdll.LoadLibrary(native.build(native.ATTENTION))
  except native.BuildError as e:
    return e
  except OSError as e:
    return native.BuildError(f"cannot load the attention kernel: {e}")
  for target, symbol in zip(TARGETS, _SYMBOLS):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  _loaded.append(library)
  return None


def targets() -> tuple[str, str]:
  """The FFI targets (forward, backward), registered with XLA for the CPU once per process;
  BuildError where the kernel cannot be built (remembered: a process tries once)."""
  error = _register()
  if error is not None:
    raise error
  return TARGETS


def registered_targets() -> tuple[str, ...]:
  """The kernel's FFI targets if this process has registered them, else ()."""
  return TARGETS if _register.cache_info().currsize and _register() is None else ()


def _operands(q: jax.Array, bias: Optional[jax.Array], multiplier: Optional[jax.Array],
              segments: Optional[jax.Array] = None):
  """(bias, multiplier, segments) in the kernel's layout, [batch or 0, length], [heads or 1 or
  0, length, length] and [batch or 0, length] (0 rows: none), or None where the kernel does not
  apply. `segments`: None, or [batch, length] integer segment ids (0: padding, 1..n: the
  examples packed in the row); ValueError for another shape."""
  batch, length, heads, depth = q.shape
  if segments is None:
    segments = jnp.zeros((0, length), jnp.float32)
  elif segments.shape == (batch, length):
    segments = segments.astype(jnp.float32)  # ids below 2**24 stay exact
  else:
    raise ValueError(f"segments must be [batch, length] = {(batch, length)}, not "
                     f"{segments.shape}")
  if q.dtype != jnp.float32 or depth % 16:
    return None
  if bias is None:
    bias = jnp.zeros((0, length), q.dtype)
  elif bias.shape == (batch, 1, 1, length):
    bias = bias.reshape(batch, length).astype(q.dtype)
  else:
    return None
  if multiplier is None:
    return bias, jnp.zeros((0, length, length), q.dtype), segments
  if multiplier.ndim != 4 or multiplier.shape[0] != 1 or multiplier.shape[1] not in (1, heads):
    return None
  per_head = multiplier.shape[1]
  multiplier = jnp.broadcast_to(multiplier, (1, per_head, length, length))
  return bias, multiplier.reshape(per_head, length, length).astype(q.dtype), segments


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array],
                    multiplier: Optional[jax.Array],
                    segments: Optional[jax.Array] = None) -> Optional[jax.Array]:
  """jaxft.attention.attention by the kernel, or None where the kernel does not apply.

  `segments` (sequence packing): None, or [batch, length] integer segment ids, 0 for padding and
  1..n for the examples packed in a row; query i then sees key j only where their ids are equal
  (for the JAX path: a bias of 0 there and the lowest float elsewhere, [batch, 1, q, k]).
  """
  operands = _operands(q, bias, multiplier, segments)
  return None if operands is None else _kernel_attention(q, k, v, *operands)


@jax.custom_vjp
def _kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                      multiplier: jax.Array, segments: jax.Array) -> jax.Array:
  return _forward(q, k, v, bias, multiplier, segments)[0]


def _forward(q, k, v, bias, multiplier, segments):
  forward, _ = targets()
  batch, length, heads, _ = q.shape
  stats = jax.ShapeDtypeStruct((batch, heads, length, 2), q.dtype)  # each row's max, 1 / sum
  out, stats = jax.ffi.ffi_call(forward, (jax.ShapeDtypeStruct(q.shape, q.dtype), stats))(
      q, k, v, bias, multiplier, segments)
  return out, (q, k, v, bias, multiplier, segments, stats)


def _backward(residuals, g):
  q, k, v, bias, multiplier, segments, stats = residuals
  _, backward = targets()
  like_q = jax.ShapeDtypeStruct(q.shape, q.dtype)
  dq, dk, dv = jax.ffi.ffi_call(backward, (like_q, like_q, like_q))(q, k, v, bias, multiplier,
                                                                     segments, stats, g)
  return dq, dk, dv, None, None, None


_kernel_attention.defvjp(_forward, _backward)
